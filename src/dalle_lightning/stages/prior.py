"""Stage 2: the diffusion prior, CLIP text embedding (+ text token encodings) → CLIP image embedding.

As in DALL-E 2: a causal transformer over [text encodings, text embedding, timestep, noised image embedding,
learned query] predicts the clean image embedding (diffusers' `PriorTransformer`), trained on embeddings a
frozen CLIP computed once (`embed.py`, or clip-retrieval's output such as LAION's published embeddings), with
classifier-free dropout of the text condition. Image embeddings are standardised per dimension with statistics
measured on the training data and stored in the model (`clip_mean`, `clip_std`: the buffers of Karlo's and
Kandinsky's `PriorTransformer`) rather than scaled by sqrt(D) as DALLE2-pytorch does. Sampling takes a few solver
steps, guidance, and DALL-E 2's reranking: draw several candidates, keep the one closest to the text embedding.

Embedding convention (`models.clip.EMBEDDING_CONVENTIONS`, recorded in the export's manifest): "unit" by default,
L2-normalised text embeddings in and image embeddings out, as embed.py and clip-retrieval write them;
`normalize_embeddings: false` gives "raw" ones, as CLIP projects them (Karlo's and Kandinsky's priors).

A published prior (`model.prior.pretrained`: Karlo's, Kandinsky 2.2's) brings its architecture and its statistics,
and trains on the objective it was trained with: x0 in the normalised space, the caption dropped to the empty
caption's embedding and encodings (`null_text: empty_caption`), raw embeddings.
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
from dalle_lightning.models.clip import FrozenClip, empty_caption_ids, frozen_clip, unit_norm
from dalle_lightning.models.prior import PRIOR_LAYOUT, build_prior, load_prior
from dalle_lightning.stages.base import StageModule

VAL_METRICS = ("cos_sampled", "cos_text_baseline", "retrieval_acc")
# What a dropped caption becomes: zeros, or the empty caption (what Karlo and Kandinsky guide against).
NULL_TEXTS = ("zeros", "empty_caption")


class PriorModule(StageModule):
    """Diffusion prior on CLIP image embeddings. Batches hold `img_emb`, `txt_emb` and, when the model
    conditions on text tokens, `txt_ids` (encoded here by the frozen CLIP's text tower)."""

    compiled_networks = ("prior",)
    # What export() writes, for loading.load_stage_export.
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
        # Exports written before the presets stated these trained on unit-norm embeddings and zeros as null text.
        self.normalize_embeddings = bool(model.get("normalize_embeddings", True))
        self.null_text = model.get("null_text", "zeros")
        if self.null_text not in NULL_TEXTS:
            raise UserError(f"model.prior.null_text='{self.null_text}' is unknown: use one of {', '.join(NULL_TEXTS)}")
        pretrained = model.get("pretrained")
        if pretrained:
            self.prior = load_prior(pretrained, "model.prior.pretrained")
        # A published prior's own config says whether it reads the caption's tokens.
        self.text_tokens = bool(self.prior.config.num_embeddings) if pretrained else bool(model["text_tokens"])
        # Conditioned on embeddings alone (with zeros as the null text), the prior needs only the CLIP's widths.
        needs_text_tower = self.text_tokens or self.null_text == "empty_caption"
        self.clip = frozen_clip(clip, "stage.clip", text=needs_text_tower, image=False)
        self.embedding_dim = self.clip.projection_dim
        expected = model.get("embedding_dim")
        if expected is not None and int(expected) != self.embedding_dim:
            raise UserError(
                f"model.prior.embedding_dim={expected} (the CLIP this preset is for) but stage.clip makes "
                f"{self.embedding_dim}-wide embeddings: train with that CLIP, or set model.prior.embedding_dim=null"
            )
        context = self.clip.context_length
        if pretrained:
            self.check_pretrained()
        else:
            if self.text_tokens and self.clip.text_width != self.embedding_dim:
                raise UserError(
                    f"stage.clip: text width {self.clip.text_width} differs from the embedding width "
                    f"{self.embedding_dim}; set model.prior.text_tokens=false to condition on the embedding only"
                )
            self.prior = build_prior(model, self.embedding_dim, context if self.text_tokens else 0)
        if self.null_text == "empty_caption":
            self.register_null_text(context)
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

    def register_null_text(self, context: int) -> None:
        """The empty caption's text embedding and encodings, computed once with the frozen CLIP as embed.py and
        `text_condition` compute a caption's; buffers, not state: the frozen CLIP gives them back."""
        ids = empty_caption_ids(self.clip.text_config, context)
        encodings, mask = self.clip.text_token_encodings(ids)
        embedding = self.clip.encode_texts(ids, mask.long(), normalize=self.normalize_embeddings)
        self.register_buffer("null_text_embedding", embedding, persistent=False)
        self.register_buffer("null_text_encodings", encodings, persistent=False)
        self.register_buffer("null_text_mask", mask, persistent=False)

    def drop_text(
        self,
        drop: torch.Tensor,
        text_embedding: torch.Tensor,
        encodings: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        """The text condition with the caption of the samples where `drop` (B,) bool replaced by the null text:
        zeros (`null_text: zeros`), or the empty caption's embedding, encodings and mask."""
        if self.null_text == "zeros":
            text_embedding = text_embedding.masked_fill(drop[:, None], 0.0)
            if encodings is not None:
                encodings = encodings.masked_fill(drop[:, None, None], 0.0)
            return text_embedding, encodings, mask
        text_embedding = torch.where(drop[:, None], self.null_text_embedding, text_embedding)
        if encodings is not None:
            encodings = torch.where(drop[:, None, None], self.null_text_encodings, encodings)
            mask = torch.where(drop[:, None], self.null_text_mask, mask)
        return text_embedding, encodings, mask

    def check_pretrained(self) -> None:
        """The loaded prior's widths checked against the CLIP's: one line naming what the CLIP would need to be."""
        config = self.prior.config
        option = f"model.prior.pretrained='{self.config['pretrained']}'"
        if config.embedding_dim != self.embedding_dim:
            raise UserError(
                f"{option} is a prior over {config.embedding_dim}-wide CLIP embeddings but stage.clip makes "
                f"{self.embedding_dim}-wide ones: train with the CLIP it was trained on (Karlo: ViT-L/14, 768; "
                f"Kandinsky 2.2: ViT-bigG/14, 1280); expected {PRIOR_LAYOUT}"
            )
        if self.text_tokens and (
            config.num_embeddings != self.clip.context_length or self.clip.text_width != self.embedding_dim
        ):
            raise UserError(
                f"{option} reads {config.num_embeddings} caption tokens {config.embedding_dim} wide but the CLIP of "
                f"stage.clip encodes {self.clip.context_length} tokens {self.clip.text_width} wide: train with "
                "the CLIP the prior was trained on"
            )

    def check_embeddings(self, image_embedding: torch.Tensor) -> None:
        """The shards' image embeddings have the CLIP's width and this prior's convention (unit norm or not)."""
        if image_embedding.shape[-1] != self.embedding_dim:
            raise UserError(
                f"the training data holds {image_embedding.shape[-1]}-wide image embeddings but stage.clip is "
                f"{self.embedding_dim}-wide: embed the data with that CLIP (embed.py) or name the right CLIP"
            )
        unit = unit_norm(image_embedding)
        if unit != self.normalize_embeddings:
            held = "unit-norm" if unit else "not L2-normalised"
            raise UserError(
                f"the embedding shards hold {held} image embeddings but model.prior.normalize_embeddings="
                f"{str(self.normalize_embeddings).lower()}: embed them with embed.py normalize="
                f"{str(self.normalize_embeddings).lower()}"
            )

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
        if self.prior.clip_std.abs().sum() > 0:  # restored from a checkpoint, or loaded with published weights
            return
        loader = self.trainer.datamodule.train_dataloader()
        embeddings = []
        for i, batch in enumerate(loader):
            embeddings.append(batch["img_emb"].float())
            if i + 1 >= int(self.config["stats_batches"]):
                break
        local = torch.cat(embeddings).to(self.device)
        self.check_embeddings(local)
        mean, std = local.mean(0, keepdim=True), local.std(0, keepdim=True)
        gathered_mean, gathered_std = self.all_gather(mean), self.all_gather(std)
        if gathered_mean.ndim > mean.ndim:  # average the ranks' statistics
            mean, std = gathered_mean.mean(0), gathered_std.mean(0)
        self.prior.clip_mean.data.copy_(mean)
        self.prior.clip_std.data.copy_(std.clamp_min(1e-6))

    def normalise(self, image_embedding: torch.Tensor) -> torch.Tensor:
        return (image_embedding - self.prior.clip_mean) / self.prior.clip_std

    # --- training ----------------------------------------------------------------------------------------

    def batch_loss(
        self,
        batch: Mapping[str, torch.Tensor],
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The objective on a batch: MSE of the predicted clean normalised image embedding (x0) at timesteps `t`
        with `noise`, the captions where `drop` (B,) replaced by the null text; unset ones are drawn at random."""
        x0 = self.normalise(batch["img_emb"].float())
        if drop is None:
            drop = torch.rand(x0.shape[0], device=self.device) < self.cond_drop_prob
        if t is None:
            t = torch.randint(0, self.noise.config.num_train_timesteps, (x0.shape[0],), device=self.device)
        if noise is None:
            noise = torch.randn_like(x0)
        text = self.drop_text(drop, *self.text_condition(batch))
        prediction = self.denoise(self.noise.add_noise(x0, noise, t), t, *text)
        return diffusion_loss(prediction, self.noise, x0, noise, t)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.global_step == 0 and batch_idx == 0:
            self.check_embeddings(batch["img_emb"])
        loss = self.batch_loss(batch)
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
            twice = lambda c: None if c is None else torch.cat([c, c])  # noqa: E731
            drop = torch.arange(x.shape[0], device=self.device) >= x.shape[0] // 2  # the second half
            return self.denoise(x, t, *self.drop_text(drop, twice(text_embedding), twice(encodings), twice(mask)))

        noise = torch.randn(text_embedding.shape, generator=generator, device=self.device)
        scheduler = sampling_scheduler(sampler or self.config["sampler"], self.noise, steps)
        latents = guided_sample(denoise, noise, scheduler, guidance_scale, generator=generator)
        embeddings = self.prior.post_process_latents(latents)
        if self.normalize_embeddings:
            embeddings = F.normalize(embeddings, dim=-1)
        if candidates > 1:  # DALL-E 2: keep the candidate most similar to the text embedding
            embeddings = embeddings.view(-1, candidates, embeddings.shape[-1])
            text = F.normalize(batch["txt_emb"].float(), dim=-1)[:, None]
            scores = (F.normalize(embeddings, dim=-1) * text).sum(-1)
            embeddings = embeddings[torch.arange(embeddings.shape[0]), scores.argmax(1)]
        return embeddings

    # --- validation --------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image_embedding = F.normalize(batch["img_emb"].float(), dim=-1)
        sampled = F.normalize(self.sample(batch), dim=-1)
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
                    "normalize_embeddings": self.normalize_embeddings,
                    "null_text": self.null_text,
                    **{k: self.config[k] for k in ("sampler", "sample_steps", "guidance_scale", "candidates")},
                },
                indent=2,
            )
        )
