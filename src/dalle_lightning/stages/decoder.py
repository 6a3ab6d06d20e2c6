"""Stage 3: the diffusion decoder, CLIP image embedding (+ optional caption encodings) → image.

As DALL-E 2's GLIDE-based decoder: the CLIP image embedding is projected into the UNet's timestep embedding
(diffusers' `class_embed_type="projection"`) and into a few extra context tokens for cross-attention
(diffusers' `ImageProjection`, as Kandinsky 2.2 does); the caption's CLIP token encodings, when the config
asks for them, are further context tokens. Classifier-free dropout drops the image embedding (10%) and the
text (50%) independently in training; guidance at sampling contrasts with both dropped. Embeddings come
from embedding shards (`img_emb`, written by embed.py) or from the frozen CLIP on the fly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_model
from torch import nn

from dalle_lightning.diffusion.sampling import guided_sample, sampling_scheduler
from dalle_lightning.errors import UserError
from dalle_lightning.metrics.image import ClipScore
from dalle_lightning.models.clip import FrozenClip
from dalle_lightning.models.decoder import build_decoder_context, build_decoder_unet, check_attention_heads
from dalle_lightning.stages.diffusion import Condition, ImageDiffusionModule, first

EMBEDDING_SOURCES = ("clip", "shards")


class DecoderModule(ImageDiffusionModule):
    """Batches hold `image` (the target, at `model.image_size`), and `img_emb` when embeddings come from
    shards; with `model.text_tokens`, also `input_ids` (the frozen CLIP's tokenizer)."""

    stage_name = "decoder"
    needs_text_tower = True  # CLIP score, and the caption's token encodings with model.text_tokens
    # The embeddings it is conditioned on: L2-normalised CLIP image embeddings (see models.clip).
    embedding_convention = "unit"
    # What export() writes, for export.load_stage_export.
    export_weights: ClassVar[dict[str, str]] = {
        "unet": "unet/diffusion_pytorch_model.safetensors",
        "context": "context.safetensors",
    }

    def __init__(
        self,
        model: Mapping[str, Any],
        clip: str | FrozenClip,
        optim: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        embeddings: str = "clip",
        tokenizer: Any = None,
    ):
        super().__init__(model, clip, optim, scheduler, metrics)
        self.save_hyperparameters(ignore=["tokenizer", "clip"])  # the CLIP is in the run's config and the export's
        if embeddings not in EMBEDDING_SOURCES:
            raise UserError(f"stage.embeddings='{embeddings}' is unknown: use clip (on the fly) or shards (img_emb)")
        self.embeddings = embeddings
        self.image_size = int(model["image_size"])
        self.embedding_dim = self.clip.projection_dim
        self.text_tokens = bool(model["text_tokens"])
        self.context = build_decoder_context(model, self.embedding_dim, self.clip.text_width)
        self.unet = build_decoder_unet(model, self.embedding_dim)
        # An L2-normalised embedding has entries of RMS 1/sqrt(D): added unscaled to the timestep embedding,
        # it starts an order of magnitude weaker than the timestep and Adam takes most of a short run to grow it.
        rms = model["class_embedding_rms"]
        self.class_scale = 1.0 if rms is None else float(rms) * self.embedding_dim**0.5
        self.image_drop_prob = float(model["image_drop_prob"])
        self.text_drop_prob = float(model["text_drop_prob"])

    def on_fit_start(self) -> None:
        # At fit, not construction: decoders exported with such heads still load and sample.
        check_attention_heads(self.unet)
        super().on_fit_start()

    def extra_metrics(self) -> dict[str, nn.Module]:
        # The real images' score with their captions is the ceiling the samples' score is read against.
        return {"clip_score": ClipScore(self.clip), "clip_score_real": ClipScore(self.clip)}

    # --- conditioning --------------------------------------------------------------------------------------

    def image_embedding(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The CLIP image embedding of the batch's images: from the shards or computed by the frozen CLIP."""
        if self.embeddings == "shards":
            if "img_emb" not in batch:
                raise UserError(
                    "stage.embeddings=shards but the batches hold no img_emb: use data=embeddings with shards "
                    "written by embed.py, or stage.embeddings=clip"
                )
            embedding = batch["img_emb"].float()
            if embedding.shape[-1] != self.embedding_dim:
                raise UserError(
                    f"the shards hold {embedding.shape[-1]}-wide image embeddings but stage.clip is "
                    f"{self.embedding_dim}-wide: embed the shards with that CLIP (embed.py) or name the right CLIP"
                )
            return torch.nn.functional.normalize(embedding, dim=-1)
        return self.clip.encode_images(batch["image"])

    def condition(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        drop_image: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> Condition:
        """The UNet's conditioning for image embeddings (and token ids); `drop_*` (B,) bool zero the image
        embedding or mask out the text of those samples (classifier-free guidance's null condition). A decoder
        that reads text given no `input_ids` (variations, interpolations: there is no caption) gets the image
        tokens alone, which is the condition it learned under text dropout: masked tokens add nothing."""
        if drop_image is not None:
            image_embeds = image_embeds.masked_fill(drop_image[:, None], 0.0)
        text, text_mask = None, None
        if self.text_tokens and input_ids is not None:
            text, text_mask = self.clip.text_token_encodings(input_ids.long())
            if drop_text is not None:
                text_mask = text_mask & ~drop_text[:, None]
        context, mask = self.context(image_embeds, text, text_mask)
        condition = {"class_labels": image_embeds * self.class_scale, "encoder_hidden_states": context}
        if mask is not None:
            condition["encoder_attention_mask"] = mask
        return condition

    def diffusion_inputs(
        self, batch: Mapping[str, Any], train: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Condition]:
        if self.text_tokens and batch.get("input_ids") is None:
            raise UserError("model.decoder.text_tokens=true needs captions: give the stage a tokenizer")
        image = self.target_images(batch)
        embeds = self.image_embedding(batch)
        drop_image = drop_text = None
        if train:
            drop_image = torch.rand(image.shape[0], device=self.device) < self.image_drop_prob
            drop_text = torch.rand(image.shape[0], device=self.device) < self.text_drop_prob
        return image, self.condition(embeds, batch.get("input_ids"), drop_image, drop_text)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        return self.unet(x, t, **condition).sample

    # --- sampling ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        dynamic_thresholding: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        noise: torch.Tensor | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, S, S) for L2-normalised image embeddings (N, D) (from the prior, or of real
        images for reconstructions); unset arguments take the config's sampling defaults. `noise` gives the
        starting noise (e.g. the same for every frame of an interpolation). `known = (images, mask)` inpaints:
        only where `mask` (N, 1, S, S) is 1 is the image generated, the rest is pinned to `images`."""
        config = self.config
        steps = steps or int(config["sample_steps"])
        guidance_scale = float(config["guidance_scale"] if guidance_scale is None else guidance_scale)
        threshold = config["dynamic_thresholding"] if dynamic_thresholding is None else dynamic_thresholding
        n = image_embeds.shape[0]
        conditional = self.condition(image_embeds, input_ids)
        both = None
        if guidance_scale != 1.0:
            ids = None if input_ids is None else torch.cat([input_ids, input_ids])
            drop = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(self.device)
            both = self.condition(torch.cat([image_embeds, image_embeds]), ids, drop, drop)

        def denoise(x: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
            return self.denoise(x, t, both if with_uncond else conditional)

        scheduler = sampling_scheduler(sampler or config["sampler"], self.noise, steps, threshold)
        if noise is None:
            noise = torch.randn((n, 3, self.image_size, self.image_size), generator=generator, device=self.device)
        pin = None if known is None else self.pin_known(scheduler, *known, generator)
        images = guided_sample(
            denoise, noise, scheduler, guidance_scale, progress=progress, generator=generator, after_step=pin
        )
        return images.clamp(-1, 1)

    def pin_known(self, scheduler, images: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None):
        """Inpainting by replacement: after each step, outside the mask the sample is set to the known image
        noised to the level of the next step (clean after the last), so the generated region grows to fit
        what surrounds it. Works with any decoder, no inpainting training needed."""
        images, mask = images.to(self.device), mask.to(self.device, images.dtype)
        timesteps = scheduler.timesteps

        def pin(x: torch.Tensor, i: int) -> torch.Tensor:
            if i + 1 < len(timesteps):
                fresh = torch.randn(images.shape, generator=generator, device=self.device)
                level = self.noise.add_noise(images, fresh, timesteps[i + 1].repeat(images.shape[0]))
            else:
                level = images
            return mask * x + (1 - mask) * level

        return pin

    def sample(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstructions of the batch's images from their CLIP image embeddings."""
        ids = batch.get("input_ids") if self.text_tokens else None
        return self.generate(self.image_embedding(batch), ids, generator=generator)

    def update_extra_metrics(self, batch: Mapping[str, Any], samples: torch.Tensor) -> None:
        if "input_ids" in batch:
            self.image_metrics["clip_score"].update(samples, batch["input_ids"], batch.get("attention_mask"))
            self.image_metrics["clip_score_real"].update(
                batch["image"], batch["input_ids"], batch.get("attention_mask")
            )

    def preview_rows(self, batch: Mapping[str, Any], n: int) -> list[tuple[str, Sequence[torch.Tensor]]]:
        """Each row: the real image, then two reconstructions from its embedding (different seeds)."""
        part = first(batch, n)
        generator = torch.Generator(self.device).manual_seed(0)
        recon = [self.sample(part, generator=generator) for _ in range(2)]
        captions = part.get("caption") or [""] * part["image"].shape[0]
        return [(caption, [part["image"][i], recon[0][i], recon[1][i]]) for i, caption in enumerate(captions)]

    # --- export --------------------------------------------------------------------------------------------

    def export(self, path: Path) -> None:
        """diffusers' format for the UNet and the noise schedule, safetensors for the context projection, and
        how to condition and sample."""
        self.unet.save_pretrained(str(path / "unet"), safe_serialization=True)
        self.noise.save_pretrained(str(path / "scheduler"))
        save_model(self.context, str(path / "context.safetensors"))
        config = {
            "clip": self.clip.source,
            "embeddings": self.embedding_convention,
            "image_size": self.image_size,
            "embedding_dim": self.embedding_dim,
            "text_tokens": self.text_tokens,
            "num_image_tokens": int(self.config["num_image_tokens"]),
            **self.sampling_defaults(),
        }
        (path / "decoder_config.json").write_text(json.dumps(config, indent=2))
