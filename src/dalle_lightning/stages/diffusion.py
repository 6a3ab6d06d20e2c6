"""What the image diffusion stages (decoder, upsampler) share.

The training step noises the stage's target image at a random timestep and regresses the UNet's output on
the configured objective (ε, x₀ or v) with min-SNR weighting. Validation logs the same loss with fixed noise
(comparable across epochs), and every `metrics.every_n_epochs` samples `metrics.num_samples` images from the
validation batches — with the EMA weights when the EMA callback is on, since it swaps them in for validation —
and scores them against the real images: a Fréchet distance (`val/fid_inception` or `val/fd_clip`) and
whatever the stage adds. A frozen CLIP (`stage.clip`: our CLIP export or any transformers CLIP) provides the
metrics' features (and the decoder's embeddings); it is no submodule (`FrozenClip`), so neither checkpoints, the
optimizer nor EMA's copy of the module hold it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dalle_lightning.diffusion.objectives import (
    check_timestep_sampling,
    diffusion_loss,
    sample_timesteps,
    training_scheduler,
)
from dalle_lightning.errors import UserError
from dalle_lightning.metrics.image import frechet_distance
from dalle_lightning.models.clip import FrozenClip, frozen_clip
from dalle_lightning.stages.base import StageModule, evaluation_epoch

Condition = dict[str, torch.Tensor]


def first(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first `n` samples of a batch (tensors and lists alike)."""
    return {k: v[:n] if isinstance(v, torch.Tensor | list) else v for k, v in batch.items()}


class ImageDiffusionModule(StageModule):
    """Subclasses say how a batch becomes (target image, condition), how the UNet is called, how to sample
    for a batch, what else to measure on samples, and what a preview row shows."""

    frozen_prefixes = ("image_metrics.",)
    compiled_networks = ("unet",)
    checkpointed_networks = ("unet",)
    stage_name = ""  # the config group its model preset is in: model.<stage_name>
    needs_text_tower = False  # of the frozen CLIP (the image tower is always needed: FD in CLIP space)

    def __init__(
        self,
        model: Mapping[str, Any],
        clip: str | FrozenClip,
        optim: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ):
        super().__init__(optim, scheduler)
        self.config = dict(model)
        self.metrics_config = dict(metrics or {})
        self.clip = frozen_clip(clip, "stage.clip", text=self.needs_text_tower, image=True)
        self.noise = training_scheduler(model["timesteps"], model["beta_schedule"], model["prediction_type"])
        self.min_snr_gamma = model["min_snr_gamma"]
        self.timestep_sampling = check_timestep_sampling(model["timestep_sampling"])
        # logit_normal's (mean, std): only presets that sample so carry them
        self.timestep_logit = (
            (float(model["timestep_logit_mean"]), float(model["timestep_logit_std"]))
            if self.timestep_sampling == "logit_normal"
            else (0.0, 1.0)
        )
        self.fd_name, fd = frechet_distance(self.clip, self.metrics_config.get("inception_weights"))
        self.image_metrics = nn.ModuleDict({"fd": fd, **self.extra_metrics()})
        self._metric_samples = 0

    # --- what a stage defines ------------------------------------------------------------------------------

    def extra_metrics(self) -> dict[str, nn.Module]:
        return {}

    def diffusion_inputs(
        self, batch: Mapping[str, Any], train: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Condition]:
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def update_extra_metrics(self, batch: Mapping[str, Any], samples: torch.Tensor) -> None:
        pass

    def preview_rows(self, batch: Mapping[str, Any], n: int) -> list[tuple[str, Sequence[torch.Tensor]]]:
        raise NotImplementedError

    def target_images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The batch's images, checked to be at the stage's resolution."""
        images = batch["image"]
        if images.shape[-1] != self.image_size:
            raise UserError(
                f"the batches hold {images.shape[-1]} px images but model.{self.stage_name}.image_size="
                f"{self.image_size}: set data.image_size={self.image_size} (the stage's image_size)"
            )
        return images

    # --- training ------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        if self.device.type == "cuda" and self.config["channels_last"]:
            self.unet.to(memory_format=torch.channels_last)

    def loss(
        self, x0: torch.Tensor, condition: Condition, generator: torch.Generator | None = None, train: bool = True
    ) -> torch.Tensor:
        """The objective at random timesteps: drawn as the config's `timestep_sampling` says in training, uniformly
        in validation, so that val/loss is the same average over noise levels whatever the training sampled."""
        t = sample_timesteps(
            x0.shape[0],
            self.noise.config.num_train_timesteps,
            self.timestep_sampling if train else "uniform",
            *self.timestep_logit,
            device=x0.device,
            generator=generator,
        )
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        noisy = self.noise.add_noise(x0, noise, t)
        if noisy.device.type == "cuda" and self.config["channels_last"]:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        prediction = self.denoise(noisy, t, condition)
        return diffusion_loss(prediction, self.noise, x0, noise, t, self.min_snr_gamma)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0, condition = self.diffusion_inputs(batch, train=True)
        loss = self.loss(x0, condition)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # --- validation ----------------------------------------------------------------------------------------

    def metrics_due(self) -> bool:
        """Sampled-image metrics run on evaluation epochs; the same answer on every rank, so the metrics'
        collectives match."""
        every = int(self.metrics_config.get("every_n_epochs", 1))
        return int(self.metrics_config.get("num_samples", 0)) > 0 and evaluation_epoch(self.trainer, every)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator(self.device).manual_seed(batch_idx)  # the same noise every epoch
        x0, condition = self.diffusion_inputs(batch, train=False, generator=generator)
        self.log("val/loss", self.loss(x0, condition, generator, train=False), batch_size=x0.shape[0], sync_dist=True)
        if not self.metrics_due():
            return
        per_rank = math.ceil(int(self.metrics_config["num_samples"]) / self.trainer.world_size)
        take = min(x0.shape[0], per_rank - self._metric_samples)
        if take <= 0:
            return
        part = first(batch, take)
        samples = self.sample(part, generator=generator)
        self.image_metrics["fd"].update(part["image"], real=True)
        self.image_metrics["fd"].update(samples, real=False)
        self.update_extra_metrics(part, samples)
        self._metric_samples += take

    def on_validation_epoch_end(self) -> None:
        if not self.metrics_due():
            return
        # Every rank computes (a collective), logs the synced value, and resets.
        for name, metric in self.image_metrics.items():
            value = metric.compute()
            self.log(f"val/{self.fd_name if name == 'fd' else name}", value, rank_zero_only=False)
            metric.reset()
        self._metric_samples = 0

    # --- export --------------------------------------------------------------------------------------------

    def sampling_defaults(self) -> dict[str, Any]:
        keys = ("sampler", "sample_steps", "guidance_scale", "dynamic_thresholding")
        return {k: self.config.get(k) for k in keys if k in self.config}
