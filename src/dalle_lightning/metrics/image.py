"""Metrics of generated images: CLIP score and Fréchet distance, as torchmetrics `Metric`s that sync across ranks.

Both run on a frozen CLIP (`models.clip.FrozenClip`: the project's own, or any transformers CLIP). The Fréchet
distance uses Inception (torchmetrics' FID over torch-fidelity's network) when the user has its weights locally,
otherwise the CLIP image encoder ("FD in CLIP space"); the name it is logged under says which.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import pickle
from pathlib import Path

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

from dalle_lightning.errors import UserError
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
    installed, else `fd_clip` on the CLIP's image embeddings. Both take images in [-1, 1] (`update(x, real)`).
    A weights file named here is checked to hold only tensors even without torch-fidelity."""
    weights = Path(inception_weights) if inception_weights else default_inception_weights()
    has_fidelity = importlib.util.find_spec("torch_fidelity") is not None
    if weights.is_file() and (has_fidelity or inception_weights):
        state_dict = inception_state_dict(weights)
        if has_fidelity:
            return "fid_inception", _InceptionFID(state_dict)
        log.warning("inception_weights without torch-fidelity installed: Fréchet distance in CLIP space (val/fd_clip)")
    elif inception_weights:
        log.warning("no Inception weights at %s: Fréchet distance in CLIP space instead (val/fd_clip)", weights)
    return "fd_clip", FrechetInceptionDistance(feature=ClipImageFeatures(clip), sync_on_compute=True)


def inception_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception weights, loaded without unpickling anything but tensors."""
    fix = f"use torch-fidelity's {INCEPTION_WEIGHTS}"
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"inception_weights='{path}' holds pickled objects, not only tensors: refused; {fix}") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        reason = " ".join(str(err).split())[:160]
        raise UserError(f"inception_weights='{path}' is not a weights file ({reason}); {fix}") from err
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise UserError(f"inception_weights='{path}' holds no state dict of tensors; {fix}")
    return state_dict


class _InceptionFID(FrechetInceptionDistance):
    """torchmetrics' FID on images in [-1, 1] (it wants [0, 1] with `normalize=True`), over torch-fidelity's
    Inception with weights already checked (`inception_state_dict`).

    torch-fidelity loads the weights it is given with `torch.load(path, weights_only=False)`, which would run
    whatever a pickle holds; it is given an in-memory copy of the checked tensors instead (torch.load takes a
    file object), whose pickle holds nothing but them."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        checked = io.BytesIO()
        torch.save(state_dict, checked)
        checked.seek(0)
        super().__init__(feature=2048, normalize=True, feature_extractor_weights_path=checked)

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
