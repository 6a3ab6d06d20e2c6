"""Stage 4: the diffusion upsampler, low → high resolution (64 → 256 px; 32 → 64 px in the tiny preset).

The UNet sees the noisy high-resolution image concatenated with the low-resolution one (bicubic-upscaled to
the same size), and is unconditional on text. As in DALL-E 2 and Imagen, the conditioning image is corrupted
in training so that the upsampler tolerates the decoder's imperfect outputs: a Gaussian blur of random width,
then noise at a random level of the diffusion's own schedule ("noise conditioning augmentation"), with the
level given to the UNet as a second timestep. At sampling the level is an argument (`noise_aug`). Being fully
convolutional, the UNet can train on random crops (`train_crop`) and still sample whole images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from dalle_lightning.diffusion.sampling import guided_sample, sampling_scheduler
from dalle_lightning.errors import UserError
from dalle_lightning.models.clip import FrozenClip
from dalle_lightning.models.upsampler import build_karlo_upsampler_unet, build_upsampler_unet, load_karlo_upsampler_unet
from dalle_lightning.stages.diffusion import Condition, ImageDiffusionModule, first


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Blur each image (N, C, H, W) with its own Gaussian width `sigma` (N,), separably, reflecting at edges."""
    n, c, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma[:, None].clamp_min(1e-3)) ** 2)
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, K)
    x = F.pad(images.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernels[:, None, :, None], groups=n * c)
    x = F.conv2d(x, kernels[:, None, None, :], groups=n * c)
    return x.reshape(n, c, h, w)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


class UpsamplerModule(ImageDiffusionModule):
    """Batches hold `image` at the output size (`model.image_size`); the low-resolution input is made from it."""

    stage_name = "upsampler"
    unet_folder = "unet"  # where export() writes the UNet
    # What export() writes, for loading.load_stage_export.
    export_weights: ClassVar[dict[str, str]] = {"unet": f"{unet_folder}/diffusion_pytorch_model.safetensors"}

    def __init__(
        self,
        model: Mapping[str, Any],
        clip: str | FrozenClip,
        optim: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
    ):
        super().__init__(model, clip, optim, scheduler, metrics)
        self.save_hyperparameters(ignore=["tokenizer", "clip"])  # the CLIP is in the run's config and the export's
        self.image_size = int(model["image_size"])
        self.low_res_size = int(model["low_res_size"])
        if self.image_size % self.low_res_size:
            raise UserError(
                f"model.upsampler.image_size={self.image_size} is not a multiple of low_res_size={self.low_res_size}"
            )
        self.factor = self.image_size // self.low_res_size
        self.train_crop = model["train_crop"]
        if self.train_crop and (self.train_crop > self.image_size or self.train_crop % self.factor):
            raise UserError(
                f"model.upsampler.train_crop={self.train_crop}: use a multiple of {self.factor} up to {self.image_size}"
            )
        self.blur_sigma = tuple(model["blur_sigma"])
        self.noise_aug_max = float(model["noise_aug_max"])
        self.unet = self.build_unet(model)

    def build_unet(self, model: Mapping[str, Any]) -> nn.Module:
        return build_upsampler_unet(model)

    def extra_metrics(self) -> dict[str, nn.Module]:
        return {"psnr": MeanMetric(), "psnr_bicubic": MeanMetric()}

    # --- the low-resolution input --------------------------------------------------------------------------

    def downsample(self, images: torch.Tensor) -> torch.Tensor:
        """High-resolution images → the low-resolution input (area averaging: no aliasing for integer factors)."""
        size = images.shape[-1] // self.factor
        return F.interpolate(images, size=(size, size), mode="area")

    def upscale(self, low: torch.Tensor) -> torch.Tensor:
        size = low.shape[-1] * self.factor
        return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)

    def noise_level(self, fraction: float) -> int:
        return min(int(fraction * self.noise.config.num_train_timesteps), self.noise.config.num_train_timesteps - 1)

    def condition(
        self, low: torch.Tensor, aug_level: torch.Tensor, generator: torch.Generator | None = None
    ) -> Condition:
        """Upscale the low-resolution input and noise it to `aug_level` (N,) timesteps."""
        upscaled = self.upscale(low)
        noise = torch.randn(upscaled.shape, device=upscaled.device, generator=generator)
        return {"low": self.noise.add_noise(upscaled, noise, aug_level), "class_labels": aug_level}

    def random_crops(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """One random `size` crop per image, on the low-resolution grid so the crop downsamples exactly."""
        positions = torch.randint(0, (images.shape[-1] - size) // self.factor + 1, (images.shape[0], 2))
        positions = (positions * self.factor).tolist()
        return torch.stack([image[:, y : y + size, x : x + size] for image, (y, x) in zip(images, positions)])

    def diffusion_inputs(
        self, batch: Mapping[str, Any], train: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Condition]:
        high = self.target_images(batch)
        n = high.shape[0]
        if train:
            if self.train_crop and self.train_crop < self.image_size:
                high = self.random_crops(high, self.train_crop)
            low = self.downsample(high)
            sigma = torch.empty(n, device=self.device).uniform_(*self.blur_sigma)
            low = gaussian_blur(low, sigma)
            aug_level = torch.randint(0, self.noise_level(self.noise_aug_max) + 1, (n,), device=self.device)
        else:  # validation: what sampling sees, a clean low-resolution image at the sampling noise level
            low = self.downsample(high)
            aug_level = torch.full((n,), self.noise_level(self.config["sample_noise_aug"]), device=self.device)
        return high, self.condition(low, aug_level, generator)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return self.unet(
            torch.cat([x, condition["low"].to(x.dtype)], 1), t, class_labels=condition["class_labels"]
        ).sample

    # --- sampling ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        low_res: torch.Tensor,
        noise_aug: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        dynamic_thresholding: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        noise: torch.Tensor | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """High-resolution images in [-1, 1] for low-resolution images (N, 3, l, l) in [-1, 1]; `noise_aug` is
        the conditioning noise level as a fraction of the schedule (0: trust the input as it is); `noise` the
        starting noise, when it should not come from `generator`. `known = (images, holes)` at the output size
        keeps the images outside the holes (1 = generate) by replacement (`pin_known`)."""
        config = self.config
        steps = steps or int(config["sample_steps"])
        noise_aug = float(config["sample_noise_aug"] if noise_aug is None else noise_aug)
        threshold = config["dynamic_thresholding"] if dynamic_thresholding is None else dynamic_thresholding
        low_res = low_res.to(self.device).float()
        n, size = low_res.shape[0], low_res.shape[-1] * self.factor
        aug_level = torch.full((n,), self.noise_level(noise_aug), device=self.device)
        condition = self.condition(low_res, aug_level, generator)
        scheduler = sampling_scheduler(sampler or config["sampler"], self.noise, steps, threshold)
        if noise is None:
            noise = torch.randn((n, 3, size, size), generator=generator, device=self.device)
        denoise = lambda x, t, with_uncond: self.denoise(x, t, condition)  # noqa: E731 (no guidance: no text)
        pin = None if known is None else self.pin_known(scheduler, *known, generator)
        images = guided_sample(denoise, noise, scheduler, 1.0, progress=progress, generator=generator, after_step=pin)
        return images.clamp(-1, 1)

    def sample(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Upsampled versions of the batch's images, downsampled."""
        return self.generate(self.downsample(batch["image"]), generator=generator)

    def update_extra_metrics(self, batch: Mapping[str, Any], samples: torch.Tensor) -> None:
        real = batch["image"]
        self.image_metrics["psnr"].update(psnr(samples, real))
        self.image_metrics["psnr_bicubic"].update(psnr(self.upscale(self.downsample(real)), real))

    def preview_rows(self, batch: Mapping[str, Any], n: int) -> list[tuple[str, Sequence[torch.Tensor]]]:
        """Each row: the low-resolution input, the upsampler's output, the real image."""
        part = first(batch, n)
        output = self.sample(part, generator=torch.Generator(self.device).manual_seed(0))
        low = self.downsample(part["image"])
        captions = part.get("caption") or [""] * part["image"].shape[0]
        return [(caption, [low[i], output[i], part["image"][i]]) for i, caption in enumerate(captions)]

    # --- export --------------------------------------------------------------------------------------------

    def export(self, path: Path) -> None:
        """diffusers' format for the UNet and the noise schedule, plus the sizes and sampling defaults."""
        self.unet.save_pretrained(str(path / self.unet_folder), safe_serialization=True)
        self.noise.save_pretrained(str(path / "scheduler"))
        config = {
            "image_size": self.image_size,
            "low_res_size": self.low_res_size,
            "sample_noise_aug": float(self.config["sample_noise_aug"]),
            **self.sampling_defaults(),
        }
        (path / "upsampler_config.json").write_text(json.dumps(config, indent=2))


class KarloUpsamplerModule(UpsamplerModule):
    """Karlo's super-resolution stage (`model/upsampler=karlo`): a `UNet2DModel` on [noisy image, low-resolution
    input upscaled as `UnCLIPPipeline` upscales it (antialiased bicubic)], with no augmentation level among its
    inputs: the input is blurred in training, never noised. `pretrained` loads a Karlo-layout folder's
    `super_res_first/`; the export has that layout too. (Karlo's own last step runs `super_res_last`, a copy
    fine-tuned with adversarial and perceptual losses; this stage trains the one UNet of every step.)"""

    unet_folder = "super_res_first"
    export_weights: ClassVar[dict[str, str]] = {"unet": f"{unet_folder}/diffusion_pytorch_model.safetensors"}

    def build_unet(self, model: Mapping[str, Any]) -> nn.Module:
        if not model["pretrained"]:
            return build_karlo_upsampler_unet(model)
        unet = load_karlo_upsampler_unet(model["pretrained"], "model.upsampler.pretrained")
        if unet.config.sample_size != self.image_size:
            size = unet.config.sample_size
            raise UserError(
                f"model.upsampler.pretrained='{model['pretrained']}' makes {size} px images but "
                f"model.upsampler.image_size={self.image_size}: set model.upsampler.image_size={size}"
            )
        return unet

    def upscale(self, low: torch.Tensor) -> torch.Tensor:
        size = low.shape[-1] * self.factor
        return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False, antialias=True)

    def condition(
        self, low: torch.Tensor, aug_level: torch.Tensor, generator: torch.Generator | None = None
    ) -> Condition:
        return {"low": self.upscale(low), "class_labels": None}
