"""Stage 1: contrastive CLIP (image and text encoders, learnable temperature) on image-caption shards."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from dalle_lightning.errors import UserError
from dalle_lightning.metrics.retrieval import RetrievalMetrics
from dalle_lightning.models.clip import build_clip, encode_images, encode_texts
from dalle_lightning.stages.base import StageModule

Gather = Callable[[torch.Tensor], torch.Tensor]


def gathered(x: torch.Tensor, gather: Gather | None, rank: int) -> tuple[torch.Tensor, int]:
    """Every rank's `x` stacked along the batch (gradients flow back to each rank), and the row of this rank's
    first sample in it; on one process (or with no `gather`), `x` itself and 0."""
    if gather is not None:
        every = gather(x)
        if every.ndim > x.ndim:  # (world, B, ...): more than one process
            return every.flatten(0, 1), rank * x.shape[0]
    return x, 0


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP's loss) of local features against the features of all ranks.

    `gather` returns every rank's tensor stacked (world, B, ...) with gradients flowing back to each rank
    (Lightning's `all_gather(..., sync_grads=True)`), or the local tensor on one process. Each rank scores
    its own rows against all columns; the mean over ranks is the loss of one process on the global batch.
    """

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        gather: Gather | None = None,
        rank: int = 0,
    ) -> torch.Tensor:
        all_image, offset = gathered(image, gather, rank)
        all_text, _ = gathered(text, gather, rank)
        labels = torch.arange(image.shape[0], device=image.device) + offset
        logits_per_image = logit_scale * image @ all_text.T
        logits_per_text = logit_scale * text @ all_image.T
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigmoidLoss(nn.Module):
    """SigLIP's loss: every image-text pair is a binary match / no-match decision, `sigmoid(scale * cos + bias)`,
    with a learnable bias that starts low (most pairs are negatives). The sum over pairs is divided by the
    batch size, as in the paper.

    Each rank scores its images against every rank's texts, which covers each pair once, so the mean over
    ranks is again the loss of one process on the global batch (see `ContrastiveLoss` for `gather`).
    """

    def __init__(self, bias_init: float = -10.0):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(float(bias_init)))

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        gather: Gather | None = None,
        rank: int = 0,
    ) -> torch.Tensor:
        all_text, offset = gathered(text, gather, rank)
        logits = logit_scale * image @ all_text.T + self.bias
        rows = torch.arange(image.shape[0], device=image.device)
        signs = torch.full_like(logits, -1.0)
        signs[rows, rows + offset] = 1.0
        return -F.logsigmoid(signs * logits).sum() / image.shape[0]


# stage.loss: the name a user writes → the loss module.
CLIP_LOSSES: dict[str, type[nn.Module]] = {"infonce": ContrastiveLoss, "sigmoid": SigmoidLoss}


class ClipModule(StageModule):
    """Contrastive CLIP on transformers' `CLIPModel`; validation reports retrieval R@1/R@5 both ways and
    zero-shot accuracy (also split into held-out and seen when the data marks them)."""

    # get_image_features / get_text_features call the two towers, never CLIPModel.__call__.
    compiled_networks = ("model.vision_model", "model.text_model")
    checkpointed_networks = ("model",)

    def __init__(
        self,
        model: Mapping[str, Any],
        optim: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_temperature_scale: float = 100.0,
        loss: str = "infonce",
    ):
        super().__init__(optim, scheduler)
        self.save_hyperparameters(ignore=["tokenizer"])
        if loss not in CLIP_LOSSES:
            raise UserError(f"stage.loss='{loss}' is unknown: use {' or '.join(CLIP_LOSSES)}")
        self.tokenizer = tokenizer
        self.model = build_clip(model, tokenizer)
        self.max_log_scale = math.log(max_temperature_scale)
        self.loss = CLIP_LOSSES[loss]()
        self.val_retrieval = RetrievalMetrics()

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_images(self.model, images), encode_texts(self.model, input_ids, attention_mask)

    def _loss(self, batch: dict[str, Any], gather: Gather | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, text = self(batch["image"], batch["input_ids"], batch.get("attention_mask"))
        loss = self.loss(image, text, self.model.logit_scale.exp(), gather, self.global_rank)
        return loss, image, text

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch, lambda x: self.all_gather(x, sync_grads=True))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", self.model.logit_scale.detach().exp())
        if isinstance(self.loss, SigmoidLoss):
            self.log("train/logit_bias", self.loss.bias.detach())
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # CLIP's temperature clamp: keep the logit scale at or below max_temperature_scale.
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.max_log_scale)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, image, text = self._loss(batch, gather=None)
        self.log("val/loss", loss, sync_dist=True, batch_size=image.shape[0])
        self.val_retrieval.update(image, text, batch["group_id"], batch["caption_id"], batch["heldout"])

    def on_validation_epoch_end(self) -> None:
        if self.val_retrieval.update_count:
            self.log_dict({f"val/{k}": v for k, v in self.val_retrieval.compute().items()})
        self.val_retrieval.reset()

    def export(self, path: Path) -> None:
        """transformers' own format (config.json + model.safetensors) plus the tokenizer files."""
        self.model.save_pretrained(str(path), safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(path))
