"""Stage 2: the diffusion prior, CLIP text embedding (+ text token encodings) → CLIP image embedding.

As in DALL-E 2: a causal transformer over [text encodings, text embedding, timestep, noised image embedding,
learned query] predicts the clean image embedding (diffusers' `PriorTransformer`), trained on embeddings a
frozen CLIP computed once (`embed.py`, or clip-retrieval's output such as LAION's published embeddings), with
classifier-free dropout of the text condition.

Embedding convention ("unit", see `models.clip.EMBEDDING_CONVENTIONS`): the prior takes L2-normalised text
embeddings and returns L2-normalised image embeddings, as embed.py and clip-retrieval write them and the decoder
takes them. Inside, image embeddings are standardised per dimension with statistics measured on the training data
and stored in the model (`clip_mean`, `clip_std`: the buffers of Karlo's and Kandinsky's `PriorTransformer`, here
of unit-norm embeddings) rather than scaled by sqrt(D) as DALLE2-pytorch does. Sampling takes a few solver steps,
guidance, and DALL-E 2's reranking: draw several candidates, keep the one closest to the text embedding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from dalle_lightning.diffusion.objectives import diffusion_loss, training_scheduler
from dalle_lightning.diffusion.sampling import guided_sample, sampling_scheduler
from dalle_lightning.errors import UserError
from dalle_lightning.models.clip import FrozenClip, frozen_clip
from dalle_lightning.models.prior import build_prior
from dalle_lightning.stages.base import StageModule

VAL_METRICS = ("cos_sampled", "cos_text_baseline", "retrieval_acc")


class PriorModule(StageModule):
    """Diffusion prior on CLIP image embeddings. Batches hold `img_emb`, `txt_emb` and, when the model
    conditions on text tokens, `txt_ids` (encoded here by the frozen CLIP's text tower)."""

    embedding_convention = "unit"  # of the text embeddings it takes and the image embeddings it makes
    compiled_networks = ("prior",)
    # What export() writes, for export.load_stage_export.
    export_weights: ClassVar[dict[str, str]] = {"prior": "prior/diffusion_pytorch_model.safetensors"}

    def __init__(
        self,
        model: Mapping[str, Any],
        clip: str | FrozenClip,
        optim: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
    ):
        super().__init__(optim, scheduler)
        self.save_hyperparameters(ignore=["tokenizer", "clip"])  # the CLIP is in the run's config and the export's
        self.config = dict(model)
        self.text_tokens = bool(model["text_tokens"])
        # Conditioned on embeddings alone, the prior needs no CLIP weights, only the CLIP's width.
        self.clip = frozen_clip(clip, "stage.clip", text=self.text_tokens, image=False)
        self.embedding_dim = self.clip.projection_dim
        num_tokens = 0
        if self.text_tokens:
            if self.clip.text_width != self.embedding_dim:
                raise UserError(
                    f"stage.clip: text width {self.clip.text_width} differs from the embedding width "
                    f"{self.embedding_dim}; set model.prior.text_tokens=false to condition on the embedding only"
                )
            num_tokens = self.clip.context_length
        self.prior = build_prior(model, self.embedding_dim, num_tokens)
        self.noise = training_scheduler(model["timesteps"], prediction_type=model["prediction_type"])
        self.cond_drop_prob = float(model["cond_drop_prob"])
        self.val_metrics = nn.ModuleDict(
            {f"{name}{part}": MeanMetric() for name in VAL_METRICS for part in ("", "_heldout", "_seen")}
        )

    # --- conditioning ------------------------------------------------------------------------------------

    def text_condition(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(text embedding, token encodings or None, token mask or None) for a batch."""
        text_embedding = batch["txt_emb"].float()
        if not self.text_tokens:
            return text_embedding, None, None
        encodings, mask = self.clip.text_token_encodings(batch["txt_ids"].long())
        return text_embedding, encodings, mask

    def denoise(self, x, t, text_embedding, encodings, mask) -> torch.Tensor:
        return self.prior(
            x, t, proj_embedding=text_embedding, encoder_hidden_states=encodings, attention_mask=mask
        ).predicted_image_embedding

    # --- statistics --------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        # Data that knows its width before a batch is read (a clip-retrieval folder) names its file if it is wrong.
        check_width = getattr(self.trainer.datamodule, "check_embedding_dim", None)
        if check_width is not None:
            check_width(self.embedding_dim, "stage.clip")
        if self.prior.clip_std.abs().sum() > 0:  # restored from a checkpoint
            return
        loader = self.trainer.datamodule.train_dataloader()
        embeddings = []
        for i, batch in enumerate(loader):
            embeddings.append(batch["img_emb"].float())
            if i + 1 >= int(self.config["stats_batches"]):
                break
        local = torch.cat(embeddings).to(self.device)
        if local.shape[-1] != self.embedding_dim:
            raise UserError(
                f"the training data holds {local.shape[-1]}-wide image embeddings but stage.clip is "
                f"{self.embedding_dim}-wide: embed the data with that CLIP (embed.py) or name the right CLIP"
            )
        mean, std = local.mean(0, keepdim=True), local.std(0, keepdim=True)
        gathered_mean, gathered_std = self.all_gather(mean), self.all_gather(std)
        if gathered_mean.ndim > mean.ndim:  # average the ranks' statistics
            mean, std = gathered_mean.mean(0), gathered_std.mean(0)
        self.prior.clip_mean.data.copy_(mean)
        self.prior.clip_std.data.copy_(std.clamp_min(1e-6))

    def normalise(self, image_embedding: torch.Tensor) -> torch.Tensor:
        return (image_embedding - self.prior.clip_mean) / self.prior.clip_std

    # --- training ----------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.normalise(batch["img_emb"].float())
        text_embedding, encodings, mask = self.text_condition(batch)
        drop = torch.rand(x0.shape[0], device=self.device) < self.cond_drop_prob
        text_embedding = text_embedding.masked_fill(drop[:, None], 0.0)
        if encodings is not None:
            encodings = encodings.masked_fill(drop[:, None, None], 0.0)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        prediction = self.denoise(self.noise.add_noise(x0, noise, t), t, text_embedding, encodings, mask)
        loss = diffusion_loss(prediction, self.noise, x0, noise, t)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # --- sampling ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        batch: Mapping[str, torch.Tensor],
        steps: int | None = None,
        guidance_scale: float | None = None,
        candidates: int | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """L2-normalised image embeddings for the batch's text condition (one per prompt, best of candidates)."""
        steps = steps or int(self.config["sample_steps"])
        guidance_scale = float(self.config["guidance_scale"] if guidance_scale is None else guidance_scale)
        candidates = candidates or int(self.config["candidates"])
        text_embedding, encodings, mask = self.text_condition(batch)
        repeat = lambda x: None if x is None else x.repeat_interleave(candidates, 0)  # noqa: E731
        text_embedding, encodings, mask = repeat(text_embedding), repeat(encodings), repeat(mask)

        def denoise(x, t, with_uncond):
            if not with_uncond:
                return self.denoise(x, t, text_embedding, encodings, mask)
            both = lambda c: None if c is None else torch.cat([c, torch.zeros_like(c)])  # noqa: E731
            return self.denoise(
                x, t, both(text_embedding), both(encodings), None if mask is None else torch.cat([mask, mask])
            )

        noise = torch.randn(text_embedding.shape, generator=generator, device=self.device)
        scheduler = sampling_scheduler(sampler or self.config["sampler"], self.noise, steps)
        latents = guided_sample(denoise, noise, scheduler, guidance_scale, generator=generator)
        embeddings = F.normalize(self.prior.post_process_latents(latents), dim=-1)
        if candidates > 1:  # DALL-E 2: keep the candidate most similar to the text embedding
            embeddings = embeddings.view(-1, candidates, embeddings.shape[-1])
            scores = (embeddings * F.normalize(batch["txt_emb"].float(), dim=-1)[:, None]).sum(-1)
            embeddings = embeddings[torch.arange(embeddings.shape[0]), scores.argmax(1)]
        return embeddings

    # --- validation --------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image_embedding = F.normalize(batch["img_emb"].float(), dim=-1)
        sampled = self.sample(batch)
        same_group = batch["group_id"][:, None] == batch["group_id"][None, :]
        values = {
            "cos_sampled": (sampled * image_embedding).sum(-1),
            "cos_text_baseline": (F.normalize(batch["txt_emb"].float(), dim=-1) * image_embedding).sum(-1),
            # Does the sampled embedding pick an image of its own scene among the batch?
            "retrieval_acc": same_group.gather(1, (sampled @ image_embedding.T).argmax(1, keepdim=True))[:, 0].float(),
        }
        heldout = batch["heldout"].float()
        for name, value in values.items():
            self.val_metrics[name].update(value)
            self.val_metrics[f"{name}_heldout"].update(value, weight=heldout)
            self.val_metrics[f"{name}_seen"].update(value, weight=1 - heldout)

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            value = metric.compute()  # a collective: every rank computes every metric
            if torch.isfinite(value):  # a part with no samples (no held-out data) has no mean
                self.log(f"val/{name}", value)
            metric.reset()

    # --- export --------------------------------------------------------------------------

    def export(self, path: Path) -> None:
        """diffusers' format for the transformer and the noise schedule, plus how to condition and sample."""
        self.prior.save_pretrained(str(path / "prior"), safe_serialization=True)
        self.noise.save_pretrained(str(path / "scheduler"))
        (path / "prior_config.json").write_text(
            json.dumps(
                {
                    "clip": self.clip.source,
                    "embeddings": self.embedding_convention,
                    "text_tokens": self.text_tokens,
                    "embedding_dim": self.embedding_dim,
                    **{k: self.config[k] for k in ("sampler", "sample_steps", "guidance_scale", "candidates")},
                },
                indent=2,
            )
        )
