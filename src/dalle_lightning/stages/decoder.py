"""Stage 3: the diffusion decoder, CLIP image embedding (+ optional caption encodings) → image.

As DALL-E 2's GLIDE-based decoder: the CLIP image embedding is projected into the UNet's timestep embedding
(diffusers' `class_embed_type="projection"`) and into a few extra context tokens for cross-attention
(diffusers' `ImageProjection`, as Kandinsky 2.2 does); the caption's CLIP token encodings, when the config
asks for them, are further context tokens. Classifier-free dropout drops the image embedding (10%) and the
text (50%) independently in training; guidance at sampling contrasts with both dropped. Embeddings come
from embedding shards (`img_emb`, written by embed.py) or from the frozen CLIP on the fly.

An editing decoder (`model.decoder.inpainting=true`, GLIDE's inpainting model) also sees the known part of the
image and its mask as extra input channels, trained on random holes (`diffusion/masks.py`) among which the whole
image, so it still generates from nothing. `stage.init_from=<decoder export>` starts training from an export's
weights; the editing channels then start at zero, so the editing decoder starts as the export's decoder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from dalle_lightning.diffusion.masks import check_mask_weights, random_masks
from dalle_lightning.diffusion.objectives import hybrid_loss
from dalle_lightning.diffusion.sampling import guided_sample, sampling_scheduler
from dalle_lightning.errors import UserError
from dalle_lightning.export import read_manifest
from dalle_lightning.metrics.image import ClipScore
from dalle_lightning.models.clip import FrozenClip, empty_caption_ids, unit_norm
from dalle_lightning.models.decoder import (
    build_decoder_context,
    build_decoder_unet,
    build_karlo_decoder,
    check_attention_heads,
    edit_input,
    is_editing,
    load_karlo_decoder,
    load_unet_weights,
)
from dalle_lightning.stages.diffusion import Condition, ImageDiffusionModule, first

EMBEDDING_SOURCES = ("clip", "shards")


class DecoderModule(ImageDiffusionModule):
    """Batches hold `image` (the target, at `model.image_size`), and `img_emb` when embeddings come from
    shards; with `model.text_tokens`, also `input_ids` (the frozen CLIP's tokenizer)."""

    stage_name = "decoder"
    needs_text_tower = True  # CLIP score, and the caption's token encodings with model.text_tokens
    # L2-normalised CLIP image embeddings (the "unit" convention of models.clip); Karlo's take them as CLIP
    # projects them ("raw")
    normalize_embeddings = True
    # What export() writes, for loading.load_stage_export.
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
        init_from: str | None = None,
    ):
        super().__init__(model, clip, optim, scheduler, metrics)
        self.save_hyperparameters(ignore=["tokenizer", "clip"])  # the CLIP is in the run's config and the export's
        if embeddings not in EMBEDDING_SOURCES:
            raise UserError(f"stage.embeddings='{embeddings}' is unknown: use clip (on the fly) or shards (img_emb)")
        self.embeddings = embeddings
        self.image_size = int(model["image_size"])
        self.embedding_dim = self.clip.projection_dim
        self.text_tokens = bool(model["text_tokens"])
        self.build_networks(model)
        self.image_drop_prob = float(model["image_drop_prob"])
        self.text_drop_prob = float(model["text_drop_prob"])
        self.inpainting = is_editing(model)
        self.edit_masks = check_mask_weights(model["edit_masks"]) if self.inpainting else None
        self.init_from = init_from

    def build_networks(self, model: Mapping[str, Any]) -> None:
        """The UNet and what conditions it: the cross-attention context and the image embedding's scale."""
        self.context = build_decoder_context(model, self.embedding_dim, self.clip.text_width)
        self.unet = build_decoder_unet(model, self.embedding_dim)
        # An L2-normalised embedding has entries of RMS 1/sqrt(D): added unscaled to the timestep embedding,
        # it starts an order of magnitude weaker than the timestep and Adam takes most of a short run to grow it.
        rms = model["class_embedding_rms"]
        self.class_scale = 1.0 if rms is None else float(rms) * self.embedding_dim**0.5

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # At fit only (a module rebuilt from its own export never reads init_from), and before Lightning restores
        # a checkpoint, so that a resumed run continues from its checkpoint, not from the export.
        if stage == "fit" and self.init_from:
            self.start_from_export(Path(self.init_from))

    def start_from_export(self, path: Path, option: str = "stage.init_from") -> None:
        """The UNet and context weights of a decoder export; editing channels it lacks start at zero."""
        read_manifest(path, "decoder", option)
        trained = json.loads((path / "decoder_config.json").read_text())
        if (trained["image_size"], trained["embedding_dim"]) != (self.image_size, self.embedding_dim):
            raise UserError(
                f"{option}='{path}' is a {trained['image_size']} px decoder of {trained['embedding_dim']}-wide "
                f"embeddings, this one is {self.image_size} px of {self.embedding_dim}: start from a decoder of "
                "the same preset and CLIP"
            )
        try:
            load_unet_weights(self.unet, path / self.export_weights["unet"])
            load_model(self.context, str(path / self.export_weights["context"]))
        except RuntimeError as err:
            problem = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
            raise UserError(
                f"{option}='{path}' does not fit model.decoder ({problem[:160]}): start from a decoder export "
                "trained with the same preset"
            ) from None

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
            if self.normalize_embeddings:
                return torch.nn.functional.normalize(embedding, dim=-1)
            if unit_norm(embedding):
                raise UserError(
                    "the shards hold unit-norm image embeddings but this decoder takes them as CLIP projects them: "
                    "embed the shards with embed.py normalize=false"
                )
            return embedding
        return self.clip.encode_images(batch["image"], normalize=self.normalize_embeddings)

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
        condition = self.condition(embeds, batch.get("input_ids"), drop_image, drop_text)
        if self.inpainting:
            holes = random_masks(image.shape[0], self.image_size, self.edit_masks, generator, self.device)
            condition["edit"] = edit_input(image, holes)
        return image, condition

    def denoise(self, x: torch.Tensor, t: torch.Tensor, condition: Condition) -> torch.Tensor:
        if not self.inpainting:
            return self.unet(x, t, **condition).sample
        unet_condition = {k: v for k, v in condition.items() if k != "edit"}
        edit = condition.get("edit")
        edit = edit_input(x, None) if edit is None else edit.to(x.dtype)
        return self.unet(torch.cat([x, edit], 1), t, **unet_condition).sample

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
        replacement: bool | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, S, S) for L2-normalised image embeddings (N, D) (from the prior, or of real
        images for reconstructions); unset arguments take the config's sampling defaults. `noise` gives the
        starting noise (e.g. the same for every frame of an interpolation). `known = (images, holes)` inpaints:
        the image is generated where `holes` (N, 1, S, S) is 1 and follows `images` elsewhere. An editing decoder
        sees the known pixels as input; any other pins them after each step (`pin_known`), which `replacement`
        forces on (true) or off (false) for either kind."""
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
        if self.inpainting and known is not None:
            # As GLIDE: guidance contrasts the embedding and text only; both passes see the known pixels.
            conditional["edit"] = edit_input(*(k.to(self.device) for k in known))
            if both is not None:
                both["edit"] = torch.cat([conditional["edit"], conditional["edit"]])

        def denoise(x: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
            return self.denoise(x, t, both if with_uncond else conditional)

        scheduler = sampling_scheduler(sampler or config["sampler"], self.noise, steps, threshold)
        if noise is None:
            noise = torch.randn((n, 3, self.image_size, self.image_size), generator=generator, device=self.device)
        replacement = not self.inpainting if replacement is None else replacement
        pin = self.pin_known(scheduler, *known, generator) if known is not None and replacement else None
        images = guided_sample(
            denoise, noise, scheduler, guidance_scale, progress=progress, generator=generator, after_step=pin
        )
        return images.clamp(-1, 1)

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
            "inpainting": self.inpainting,
            **self.sampling_defaults(),
        }
        (path / "decoder_config.json").write_text(json.dumps(config, indent=2))


class KarloDecoderModule(DecoderModule):
    """Karlo's decoder (`model/decoder=karlo`): `DecoderModule`'s training, sampling and metrics on Karlo's networks.
    A GLIDE-style UNet with learned variance, trained on the hybrid loss, conditioned through `UnCLIPTextProjModel`
    on the CLIP image embedding as CLIP projects it and on the caption (pooled embedding and token encodings from
    the frozen CLIP's text tower, `FrozenClip.text_features`). Classifier-free dropout swaps in the learned null
    image embedding (`image_drop_prob`) and the empty caption (`text_drop_prob`), what guidance contrasts with.
    `pretrained` loads `decoder/` + `text_proj/` of a Karlo-layout folder; the export has that layout too."""

    normalize_embeddings = False
    variance_type = "learned_range"
    export_weights: ClassVar[dict[str, str]] = {
        "unet": "decoder/diffusion_pytorch_model.safetensors",
        "text_proj": "text_proj/diffusion_pytorch_model.safetensors",
    }

    def build_networks(self, model: Mapping[str, Any]) -> None:
        if not self.text_tokens:
            raise UserError("model.decoder.text_tokens=false: Karlo's decoder always reads the caption; set it to true")
        if model["prediction_type"] != "epsilon":
            raise UserError(
                f"model.decoder.prediction_type={model['prediction_type']}: Karlo's decoder predicts the noise and "
                "learns its variance with the hybrid loss; set it to epsilon"
            )
        text_width = self.clip.text_width
        if model["pretrained"]:
            option = f"model.decoder.pretrained='{model['pretrained']}'"
            self.unet, self.text_proj = load_karlo_decoder(model["pretrained"], "model.decoder.pretrained")
            if self.text_proj.config.clip_embeddings_dim != self.embedding_dim or text_width != self.embedding_dim:
                raise UserError(
                    f"{option} takes {self.text_proj.config.clip_embeddings_dim}-wide CLIP embeddings and caption "
                    f"encodings but stage.clip makes {self.embedding_dim}-wide embeddings and {text_width}-wide "
                    "encodings: train with the CLIP it was trained on (Karlo: OpenAI ViT-L/14)"
                )
            if self.unet.config.sample_size != self.image_size:
                raise UserError(
                    f"{option} makes {self.unet.config.sample_size} px images but model.decoder.image_size="
                    f"{self.image_size}: set model.decoder.image_size={self.unet.config.sample_size}"
                )
            return
        if text_width != self.embedding_dim:
            raise UserError(
                f"stage.clip: text width {text_width} differs from the embedding width {self.embedding_dim}; "
                "Karlo's decoder projects both with the same layers: use a CLIP whose text width is its embedding width"
            )
        self.unet, self.text_proj = build_karlo_decoder(model, self.embedding_dim)

    def condition(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        drop_image: torch.Tensor | None = None,
        drop_text: torch.Tensor | None = None,
    ) -> Condition:
        """The UNet's conditioning, as `UnCLIPPipeline` hands it over: the context with its mask (`attention_mask`,
        the extra tokens always attended) and the addition to the timestep embedding (`class_labels`). No
        `input_ids` (variations) is the empty caption."""
        text_config = self.clip.text_config
        length = self.clip.context_length if input_ids is None else input_ids.shape[1]
        empty = empty_caption_ids(text_config, length, image_embeds.shape[0]).to(image_embeds.device)
        ids = empty if input_ids is None else input_ids.long()
        if drop_text is not None:
            ids = torch.where(drop_text[:, None], empty, ids)
        text_embeds, hidden_states, mask = self.clip.text_features(ids)
        context, time = self.text_proj(image_embeds, text_embeds, hidden_states, drop_image)
        mask = F.pad(mask, (self.text_proj.config.clip_extra_context_tokens, 0), value=True)
        return {"encoder_hidden_states": context, "class_labels": time, "attention_mask": mask}

    def objective(
        self, output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, noisy: torch.Tensor
    ) -> torch.Tensor:
        return hybrid_loss(output, self.noise, x0, noise, t, noisy)

    def export(self, path: Path) -> None:
        """Karlo's layout for the UNet and the text projection (what `pretrained` and the diffusers export read),
        diffusers' format for the noise schedule, and how to condition and sample."""
        self.unet.save_pretrained(str(path / "decoder"), safe_serialization=True)
        self.text_proj.save_pretrained(str(path / "text_proj"), safe_serialization=True)
        self.noise.save_pretrained(str(path / "scheduler"))
        config = {
            "clip": self.clip.source,
            "embeddings": self.embedding_convention,
            "structure": "karlo",
            "image_size": self.image_size,
            "embedding_dim": self.embedding_dim,
            "text_tokens": True,
            "normalize_embeddings": self.normalize_embeddings,
            **self.sampling_defaults(),
        }
        (path / "decoder_config.json").write_text(json.dumps(config, indent=2))
