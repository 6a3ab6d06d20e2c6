"""Metrics of generated images: CLIP score and Fréchet distance, as torchmetrics `Metric`s that sync across ranks.

Both run on a frozen CLIP (`models.clip.FrozenClip`: the project's own, or any transformers CLIP). The Fréchet
distance uses Inception (torchmetrics' FID over torch-fidelity's network) when the user has its weights locally,
otherwise the CLIP image encoder ("FD in CLIP space"); the name it is logged under says which.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

from dalle_lightning.models.clip import FrozenClip

log = logging.getLogger(__name__)

# torch-fidelity's Inception weights, where torch.hub caches them after a download elsewhere.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def default_inception_weights() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


class ClipImageFeatures(nn.Module):
    """Images in [-1, 1] → L2-normalised CLIP image embeddings: a feature extractor for torchmetrics' FID."""

    def __init__(self, clip: FrozenClip):
        super().__init__()
        self.clip = clip  # no submodule (see FrozenClip): its owner moves it
        self.num_features = clip.projection_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_images(images.float())


def frechet_distance(clip: FrozenClip, inception_weights: str | Path | None = None) -> tuple[str, Metric]:
    """(metric name, metric): `fid_inception` when the Inception weights file exists and torch-fidelity is
    installed, else `fd_clip` on the CLIP's image embeddings. Both take images in [-1, 1] (`update(x, real)`)."""
    weights = Path(inception_weights) if inception_weights else default_inception_weights()
    if weights.is_file() and importlib.util.find_spec("torch_fidelity") is not None:
        return "fid_inception", _InceptionFID(str(weights))
    if inception_weights and not weights.is_file():
        log.warning("no Inception weights at %s: Fréchet distance in CLIP space instead (val/fd_clip)", weights)
    return "fd_clip", FrechetInceptionDistance(feature=ClipImageFeatures(clip), sync_on_compute=True)


class _InceptionFID(FrechetInceptionDistance):
    """torchmetrics' FID on images in [-1, 1] (it wants [0, 1] with `normalize=True`)."""

    def __init__(self, weights_path: str):
        super().__init__(feature=2048, normalize=True, feature_extractor_weights_path=weights_path)

    def update(self, imgs: torch.Tensor, real: bool) -> None:
        super().update(((imgs.float() + 1) / 2).clamp(0, 1), real)


@torch.no_grad()
def clip_scores(
    clip: FrozenClip, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Each pair's CLIP score, `100 * max(cos(image, text), 0)`, for images in [-1, 1] and caption tokens."""
    image = clip.encode_images(images.float())
    text = clip.encode_texts(input_ids, attention_mask)
    return 100 * (image * text).sum(-1).clamp_min(0)


class ClipScore(Metric):
    """`100 * max(cos(image, text), 0)` averaged over pairs (Hessel et al. 2021), on a given CLIP."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, clip: FrozenClip, **kwargs):
        super().__init__(**kwargs)
        self.clip = clip
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Images in [-1, 1] and the token ids of their captions (the CLIP's own tokenizer)."""
        self.score_sum += clip_scores(self.clip, images, input_ids, attention_mask).double().sum()
        self.count += images.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.score_sum / self.count.clamp_min(1)).float()
