"""The training side of diffusion: the forward (noising) process, what the model predicts, and how each
timestep's loss is weighted.

The model predicts the clean sample (x₀, `sample`), the noise (ε, `epsilon`) or the velocity
(`v_prediction`), as the scheduler's `prediction_type` says. Min-SNR weighting (Hang et al. 2023) caps the
weight of low-noise timesteps, whose easy denoising otherwise dominates the gradient. A model that also learns
its variance (improved DDPM, GLIDE, Karlo's decoder) trains on the hybrid loss: ε MSE plus the variational bound.
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler

from dalle_lightning.errors import UserError

PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")


def training_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "squaredcos_cap_v2",
    prediction_type: str = "sample",
    variance_type: str = "fixed_small",
) -> DDPMScheduler:
    """The forward process used in training (`prediction_type`: sample = x0, epsilon, v_prediction;
    `variance_type="learned_range"` for a model whose extra output channels interpolate the log variance)."""
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction_type='{prediction_type}' is unknown: use one of {', '.join(PREDICTION_TYPES)}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        variance_type=variance_type,
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


# --- learned variance: the hybrid loss (Nichol & Dhariwal 2021, "improved DDPM"), as GLIDE and Karlo train -------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).pow(2) * torch.exp(-logvar2)
    )


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log p(x) of images in [-1, 1] quantised to 256 levels under N(mean, exp(log_scale)²), elementwise, in nats:
    the decoder term of the bound at t = 0."""

    def cdf(v: torch.Tensor) -> torch.Tensor:  # a fast approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))

    centred, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centred + 1 / 255)), cdf(inv_std * (centred - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
    return -log_probs


def variational_bound(
    scheduler: DDPMScheduler, output: torch.Tensor, x0: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Per sample, the bound's term at `t` in bits per dimension: KL between the true posterior q(x_{t-1} | x_t, x0)
    and the model's p(x_{t-1} | x_t), the decoder's NLL at t = 0. `output` is the model's [ε, v] (channels split in
    halves) with ε detached, so that this term trains the variance only (the mean learns from the MSE). `v` in
    [-1, 1] interpolates the log variance between the posterior's (clipped at t = 0) and β_t, as diffusers'
    `variance_type="learned_range"` reads it at sampling."""
    eps, v = output.float().chunk(2, dim=1)
    eps = eps.detach()
    betas = scheduler.betas.to(t.device, torch.float64)
    alphas_cumprod = scheduler.alphas_cumprod.to(t.device, torch.float64)
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
    posterior_log_variance = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    coef_x0 = betas * previous.sqrt() / (1 - alphas_cumprod)
    coef_xt = (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod)

    def at(values: torch.Tensor) -> torch.Tensor:
        return values[t].float().view(-1, *([1] * (x0.ndim - 1)))

    x0, noisy = x0.float(), noisy.float()
    true_mean = at(coef_x0) * x0 + at(coef_xt) * noisy
    true_log_variance = at(posterior_log_variance)
    predicted_x0 = (noisy - at((1 - alphas_cumprod).sqrt()) * eps) / at(alphas_cumprod.sqrt())
    model_mean = at(coef_x0) * predicted_x0 + at(coef_xt) * noisy
    fraction = (v + 1) / 2
    model_log_variance = fraction * at(torch.log(betas)) + (1 - fraction) * true_log_variance
    kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).flatten(1).mean(1)
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_log_variance).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def hybrid_loss(
    output: torch.Tensor,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    noisy: torch.Tensor,
) -> torch.Tensor:
    """Improved DDPM's hybrid objective for an ε model with learned variance (`output`: [ε, v]): the ε MSE plus
    the variational bound scaled by T/1000 (its "rescaled MSE", what Karlo's decoder trained on)."""
    eps = output[:, : output.shape[1] // 2]
    mse = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
    bound = variational_bound(scheduler, output, x0, noisy, t) * scheduler.config.num_train_timesteps / 1000.0
    return (mse + bound).mean()
