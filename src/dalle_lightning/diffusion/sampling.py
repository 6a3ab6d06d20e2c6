"""Sampling loops over diffusers schedulers.

Sampling takes any diffusers scheduler built from the training schedule's betas (`objectives`): DPM-Solver++
with few steps by default, DDIM and DDPM too. Classifier-free guidance runs the
conditional and unconditional passes as one batched forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from dalle_lightning.errors import UserError

SAMPLERS = {"dpmsolver++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def sampling_scheduler(name: str, train: DDPMScheduler, steps: int, dynamic_thresholding: float | None = None):
    """A sampler named `name` over the training schedule's betas, set to `steps` steps. `dynamic_thresholding`
    (a percentile such as 0.995; falsy: off) turns on diffusers' thresholding of each predicted x0 with Imagen's
    s (that percentile of |x0|) capped at 1 (`sample_max_value`, images in [-1, 1]): x0 is clipped to [-1, 1] at
    every step. Uncapped, s > 1 divides the whole x0 and greys a black background (docs/experiments.md)."""
    if name not in SAMPLERS:
        raise UserError(f"sampler '{name}' is unknown: use one of {', '.join(SAMPLERS)}")
    thresholding = {}
    if dynamic_thresholding:
        thresholding = dict(thresholding=True, dynamic_thresholding_ratio=dynamic_thresholding, sample_max_value=1.0)
    scheduler = SAMPLERS[name].from_config(train.config, **thresholding)
    scheduler.set_timesteps(steps)
    return scheduler


def guided_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor],
    noise: torch.Tensor,
    scheduler,
    guidance_scale: float = 1.0,
    progress: bool = False,
    generator: torch.Generator | None = None,
    after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run `scheduler` from `noise` (seeded by `generator`). `denoise(x, t, with_uncond)` returns the model
    output for x, or for [x, x] (conditional then unconditional halves) when `with_uncond`, so guidance is
    one forward pass. `after_step(x, i)` may edit the sample after step `i` (inpainting pins known pixels). A model
    with more output channels than the sample has learned its variance in them (`variance_type="learned_range"`)."""
    x = noise * scheduler.init_noise_sigma
    guide = guidance_scale != 1.0
    # DDIM's default steps with the model's own noise estimate even when thresholding has changed its x0, so the
    # sample drifts from what the thresholded x0 implies (at 50 steps the colours wash out: docs/experiments.md).
    options = {"use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}
    # DDPM reads a learned variance from the model's extra channels, DPM-Solver drops them itself.
    learns_variance = scheduler.config.get("variance_type") in ("learned", "learned_range")
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
        model_input = scheduler.scale_model_input(x, t)
        if guide:
            conditional, unconditional = denoise(torch.cat([model_input, model_input]), t, True).chunk(2)
            output = unconditional + guidance_scale * (conditional - unconditional)
            if output.ndim == 4 and output.shape[1] > x.shape[1]:  # a learned variance is not guided (GLIDE, unCLIP)
                output = torch.cat([output[:, : x.shape[1]], conditional[:, x.shape[1] :]], 1)
        else:
            output = denoise(model_input, t, False)
        if output.ndim == 4 and output.shape[1] > x.shape[1] and not learns_variance:
            output = output[:, : x.shape[1]]  # a sampler that takes no variance (DDIM) steps with ε alone
        # The generator also seeds the fresh noise of stochastic samplers (DDPM), so a seed fixes the result.
        x = scheduler.step(output, t, x, generator=generator, **options).prev_sample
        if after_step is not None:
            x = after_step(x, i)
    return x
