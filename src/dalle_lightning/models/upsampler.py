"""The upsampler's network: diffusers' `UNet2DModel` on the noisy high-resolution image concatenated with the
upscaled low-resolution one (6 input channels), with the low-resolution input's augmentation level as a second
timestep (`class_embed_type="timestep"`), built from `conf/model/upsampler/*`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import UNet2DModel


def build_upsampler_unet(preset: Mapping[str, Any]) -> UNet2DModel:
    return UNet2DModel(
        sample_size=int(preset["image_size"]),
        in_channels=6,
        out_channels=3,
        class_embed_type="timestep",
        **preset["unet"],
    )
