"""The upsampler's network: diffusers' `UNet2DModel` on the noisy high-resolution image concatenated with the
upscaled low-resolution one (6 input channels), with the low-resolution input's augmentation level as a second
timestep (`class_embed_type="timestep"`), built from `conf/model/upsampler/*`. Karlo's super-resolution UNet
(`conf/model/upsampler/karlo.yaml`) takes no augmentation level; it loads from a Karlo-layout folder's
`super_res_first/`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers import UNet2DModel

from dalle_lightning.errors import UserError
from dalle_lightning.models.pretrained import component_folder, load_component

KARLO_UPSAMPLER_LAYOUT = (
    "a Karlo-layout folder with super_res_first/ (UNet2DModel on 6 channels: noisy image and upscaled input), as "
    "kakaobrain/karlo-v1-alpha ships"
)


def build_upsampler_unet(preset: Mapping[str, Any]) -> UNet2DModel:
    return UNet2DModel(
        sample_size=int(preset["image_size"]),
        in_channels=6,
        out_channels=3,
        class_embed_type="timestep",
        **preset["unet"],
    )


def build_karlo_upsampler_unet(preset: Mapping[str, Any]) -> UNet2DModel:
    """Karlo's super-resolution UNet at the preset's size: [noisy, upscaled low-resolution] in, ε out."""
    return UNet2DModel(sample_size=int(preset["image_size"]), in_channels=6, out_channels=3, **preset["unet"])


def load_karlo_upsampler_unet(path: str | Path, option: str, component: str = "super_res_first") -> UNet2DModel:
    """Karlo's super-resolution UNet (`super_res_first/`, or `super_res_last/`, the one of Karlo's last step)."""
    folder = component_folder(path, component, "UNet2DModel", option, KARLO_UPSAMPLER_LAYOUT)
    unet = load_component(UNet2DModel, folder, option)
    if unet.config.in_channels != 2 * unet.config.out_channels or unet.config.class_embed_type is not None:
        raise UserError(
            f"{option}='{path}': {component}/ is not Karlo's super-resolution UNet ({unet.config.in_channels} input "
            f"channels, class_embed_type={unet.config.class_embed_type}): expected {KARLO_UPSAMPLER_LAYOUT}"
        )
    return unet
