"""dalle-lightning: train the DALL-E 2 (unCLIP) stack with Lightning and Hydra on webdataset shards."""

__version__ = "0.1.0"
