"""OmegaConf resolvers used by the configs (`${dl.NAME:}`); imported by the entry points before Hydra runs."""

from omegaconf import OmegaConf


def auto_precision() -> str:
    """bf16 mixed precision where the GPU supports it, full fp32 elsewhere (CPUs here lack fast bf16)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


OmegaConf.register_new_resolver("dl.auto_precision", auto_precision, replace=True)
