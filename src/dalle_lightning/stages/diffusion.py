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
    variance_type = "fixed_small"  # "learned_range": the UNet's extra output channels are its variance
    needs_text_tower = False  # of the frozen CLIP (its image tower is needed to train: FD in CLIP space)

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
        # The image tower when the CLIP has one: training needs it (FD in CLIP space, and embeddings computed on the
        # fly), sampling from an export does not (a text-only CLIP such as Karlo's serves the pipeline).
        self.clip = frozen_clip(clip, "stage.clip", text=self.needs_text_tower, image=None)
        self.noise = training_scheduler(
            model["timesteps"], model["beta_schedule"], model["prediction_type"], self.variance_type
        )
        self.min_snr_gamma = model["min_snr_gamma"]
        # Exports written before presets stated it trained uniformly, as the presets that do not say otherwise.
        self.timestep_sampling = check_timestep_sampling(model.get("timestep_sampling", "uniform"))
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
        if self.clip.image_encoder is None:
            raise UserError(
                f"stage.clip='{self.clip.source}' is a text-only CLIP (no image_encoder/): training the "
                f"{self.stage_name} needs its image tower (FD in CLIP space); give the whole CLIP it conditions on"
            )
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
        return self.objective(self.denoise(noisy, t, condition), x0, noise, t, noisy)

    def objective(
        self, output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, noisy: torch.Tensor
    ) -> torch.Tensor:
        """The loss of the model's `output` for `noisy` = x0 noised with `noise` to `t`: the target MSE, min-SNR
        weighted."""
        return diffusion_loss(output, self.noise, x0, noise, t, self.min_snr_gamma)

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

    # --- sampling ------------------------------------------------------------------------------------------

    def pin_known(self, scheduler, images: torch.Tensor, holes: torch.Tensor, generator: torch.Generator | None):
        """Inpainting by replacement, for `guided_sample`'s `after_step`: after each step, outside the holes (1 =
        generate) the sample is set to the known image noised to the level of the next step (clean after the
        last), so the generated region grows to fit what surrounds it. Works with any UNet, no training needed."""
        images, holes = images.to(self.device), holes.to(self.device, images.dtype)
        timesteps = scheduler.timesteps

        def pin(x: torch.Tensor, i: int) -> torch.Tensor:
            if i + 1 < len(timesteps):
                fresh = torch.randn(images.shape, generator=generator, device=self.device)
                level = self.noise.add_noise(images, fresh, timesteps[i + 1].repeat(images.shape[0]))
            else:
                level = images
            return holes * x + (1 - holes) * level

        return pin

    # --- export --------------------------------------------------------------------------------------------

    def sampling_defaults(self) -> dict[str, Any]:
        keys = ("sampler", "sample_steps", "guidance_scale", "dynamic_thresholding")
        return {k: self.config.get(k) for k in keys if k in self.config}
