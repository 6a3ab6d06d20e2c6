"""Model construction from config presets, wrapping transformers and diffusers."""
