"""The training side of diffusion: the forward (noising) process, what the model predicts, and how each
timestep's loss is weighted.

The model predicts the clean sample (x₀, `sample`), the noise (ε, `epsilon`) or the velocity
(`v_prediction`), as the scheduler's `prediction_type` says. Min-SNR weighting (Hang et al. 2023) caps the
weight of low-noise timesteps, whose easy denoising otherwise dominates the gradient.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from dalle_lightning.errors import UserError

PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")


def training_scheduler(
    num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2", prediction_type: str = "sample"
) -> DDPMScheduler:
    """The forward process used in training (`prediction_type`: sample = x0, epsilon, v_prediction)."""
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction_type='{prediction_type}' is unknown: use one of {', '.join(PREDICTION_TYPES)}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def diffusion_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model should output for x_t = add_noise(x0, noise, t)."""
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return x0
    if kind == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, t)


TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def sample_timesteps(
    n: int,
    num_train_timesteps: int,
    scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training timesteps (n,): uniform, or logit-normal (SD3): t/T = sigmoid(N(mean, std)), which spends the
    steps on the middle noise levels, where the layout and shapes of an image are decided, and few on the
    nearly clean and nearly pure-noise ends."""
    if check_timestep_sampling(scheme) == "uniform":
        return torch.randint(0, num_train_timesteps, (n,), device=device, generator=generator)
    u = torch.sigmoid(logit_mean + logit_std * torch.randn((n,), device=device, generator=generator))
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def check_timestep_sampling(scheme: str) -> str:
    if scheme not in TIMESTEP_SAMPLING:
        raise UserError(f"timestep_sampling='{scheme}' is unknown: use one of {', '.join(TIMESTEP_SAMPLING)}")
    return scheme


def min_snr_weight(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights: min(SNR, γ) expressed for the prediction type (1 everywhere when γ is None)."""
    if gamma is None:
        return torch.ones(t.shape, device=t.device)
    alphas_cumprod = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    capped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return capped
    if kind == "epsilon":
        return capped / snr
    return capped / (snr + 1)


def diffusion_loss(
    prediction: torch.Tensor,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error against the target, weighted per sample by min-SNR."""
    target = diffusion_target(scheduler, x0, noise, t)
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * min_snr_weight(scheduler, t, min_snr_gamma)).mean()
