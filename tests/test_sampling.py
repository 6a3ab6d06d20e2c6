"""The sampling loop over diffusers schedulers: a deterministic sampler steps along what its thresholded x0
predictions imply."""

from __future__ import annotations

import itertools

import torch

from dalle_lightning.diffusion.objectives import training_scheduler
from dalle_lightning.diffusion.sampling import guided_sample, sampling_scheduler


def thresholded(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding as the schedulers' config states it: per sample, s = the `ratio` quantile of
    |x0| within [1, max_value]; x0 clipped to [-s, s] and divided by s."""
    s = x0.abs().flatten(1).quantile(ratio, dim=1).clamp(1, max_value)[:, None, None, None]
    return x0.clamp(-s, s) / s


def test_ddim_with_thresholding_steps_from_the_thresholded_x0():
    train = training_scheduler(prediction_type="v_prediction")
    scheduler = sampling_scheduler("ddim", train, 6, dynamic_thresholding=0.995)
    calls: list[tuple[torch.Tensor, int]] = []
    v = -2.0  # x0 = sqrt(a) x_t - sqrt(1 - a) v: out of [-1, 1] wherever the noise is high

    def denoise(x: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
        calls.append((x.clone(), int(t)))
        return torch.full_like(x, v)

    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    guided_sample(denoise, noise, scheduler)
    assert len(calls) == 6
    alphas = train.alphas_cumprod
    config = scheduler.config
    clipped = 0
    for (x, t), (x_next, t_next) in itertools.pairwise(calls):
        a, a_next = alphas[t], alphas[t_next]
        raw = a.sqrt() * x - (1 - a).sqrt() * v
        x0 = thresholded(raw, config.dynamic_thresholding_ratio, config.sample_max_value)
        clipped += int(not torch.equal(x0, raw))
        # DDIM (eta 0): x_{t'} = sqrt(a') x0 + sqrt(1 - a') eps, with eps the noise that x_t and this x0 imply;
        # stepping with the model's own eps instead drifts off the thresholded x0 at every step.
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        torch.testing.assert_close(x_next, a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, atol=1e-5, rtol=1e-4)
    assert clipped >= 3, "the test's denoiser should push x0 out of range at most steps"
