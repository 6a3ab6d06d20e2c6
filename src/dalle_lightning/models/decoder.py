"""The decoder's networks, built from `conf/model/decoder/*`: a diffusers `UNet2DConditionModel` that takes the
CLIP image embedding through its timestep embedding (`class_embed_type="projection"`, as GLIDE and DALL-E 2),
and `DecoderContext`, the cross-attention context: tokens projected from the image embedding (diffusers'
`ImageProjection`, as Kandinsky 2.2) followed by the caption's CLIP token encodings. An editing decoder
(`inpainting: true`) also takes the known image and its mask as extra input channels, as GLIDE's inpainting
model does.

Karlo's structure (`conf/model/decoder/karlo.yaml`): a GLIDE-style UNet (SimpleCrossAttn blocks, attention over
its own pixels and the context together) with learned variance, conditioned through `UnCLIPTextProjModel`;
built from the preset or loaded from a Karlo-layout folder (`decoder/` + `text_proj/`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import ImageProjection
from torch import nn

from dalle_lightning.errors import UserError
from dalle_lightning.models.pretrained import component_folder, load_component

# diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads per block (its naming issue
# #2011): heads narrower than this come from giving it a head width, as the name asks, not from a choice.
MIN_HEAD_WIDTH = 8
# GLIDE's editing input after the noisy image: the known image (zero in the hole) and the mask of what is known
# (1 = kept). Nothing known is all zeros, so generating from nothing is the same input with or without an edit.
EDIT_CHANNELS = 4


def is_editing(preset: Mapping[str, Any]) -> bool:
    """Whether the preset asks for an editing decoder (exports written before the option have no such key)."""
    return bool(preset.get("inpainting", False))


def build_decoder_unet(preset: Mapping[str, Any], embedding_dim: int) -> UNet2DConditionModel:
    """The UNet at the preset's `image_size`, conditioned on `embedding_dim`-wide image embeddings."""
    return UNet2DConditionModel(
        sample_size=int(preset["image_size"]),
        in_channels=3 + (EDIT_CHANNELS if is_editing(preset) else 0),
        out_channels=3,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=embedding_dim,
        **preset["unet"],
    )


def check_attention_heads(unet: UNet2DConditionModel) -> None:
    """A one-line error when an attention layer of `unet` has heads under `MIN_HEAD_WIDTH` channels."""
    width, heads = min(
        ((m.inner_dim // m.heads, m.heads) for m in unet.modules() if isinstance(m, Attention)),
        default=(MIN_HEAD_WIDTH, 0),
    )
    if width < MIN_HEAD_WIDTH:
        suggestion = [max(1, c // 32) for c in unet.config.block_out_channels]
        raise UserError(
            f"model.decoder.unet.attention_head_dim={unet.config.attention_head_dim} gives {heads} "
            f"attention heads of {width} channels: diffusers reads attention_head_dim as the number of heads per "
            f"block, so give heads per block, e.g. {suggestion} for heads of 32 channels"
        )


class DecoderContext(nn.Module):
    """Cross-attention context: `num_image_tokens` tokens projected from the image embedding, then (when
    `text_width` is given) the caption's token encodings projected to the UNet's attention width."""

    def __init__(self, embedding_dim: int, width: int, num_image_tokens: int, text_width: int | None = None):
        super().__init__()
        self.image = ImageProjection(
            image_embed_dim=embedding_dim, cross_attention_dim=width, num_image_text_embeds=num_image_tokens
        )
        self.text = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, width)) if text_width else None

    def forward(
        self, image_embeds: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = self.image(image_embeds)
        if self.text is None or text is None:
            return tokens, None
        mask = torch.cat([torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device), text_mask], 1)
        return torch.cat([tokens, self.text(text)], 1), mask


def build_decoder_context(preset: Mapping[str, Any], embedding_dim: int, text_width: int) -> DecoderContext:
    """The context for the preset: image tokens, and the caption's tokens when `text_tokens` is set."""
    return DecoderContext(
        embedding_dim,
        int(preset["unet"]["cross_attention_dim"]),
        int(preset["num_image_tokens"]),
        text_width if preset["text_tokens"] else None,
    )


def edit_input(images: torch.Tensor, holes: torch.Tensor | None) -> torch.Tensor:
    """The editing channels for `images` (N, 3, S, S) with `holes` (N, 1, S, S), 1 where to generate; no holes:
    nothing known (zeros)."""
    if holes is None:
        return images.new_zeros(images.shape[0], EDIT_CHANNELS, *images.shape[-2:])
    known = 1 - holes.to(images.dtype)
    return torch.cat([images * known, known], 1)


def load_unet_weights(unet: UNet2DConditionModel, path: Path) -> None:
    """A decoder export's UNet weights (safetensors) into `unet`. Input channels the export lacks (a decoder
    becoming an editing decoder) start at zero, so the UNet starts out computing exactly what the export did.
    Weights of another shape raise torch's RuntimeError."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    weight, wanted = state.get("conv_in.weight"), unet.conv_in.weight.shape
    if weight is not None and weight.shape[1] < wanted[1] and weight.shape[0] == wanted[0]:
        state["conv_in.weight"] = torch.cat(
            [weight, weight.new_zeros(wanted[0], wanted[1] - weight.shape[1], *wanted[2:])], 1
        )
    unet.load_state_dict(state)


KARLO_DECODER_LAYOUT = (
    "a Karlo-layout folder with decoder/ (UNet2DConditionModel, learned variance) and text_proj/ "
    "(UnCLIPTextProjModel), as kakaobrain/karlo-v1-alpha ships"
)


class UnCLIPTextProjModel(ModelMixin, ConfigMixin):
    """Karlo's (DALL-E 2's) conditioning of the decoder on CLIP, with the class name, config and parameter names of
    diffusers' `UnCLIPTextProjModel`, so that a folder either saves loads with the other: the image embedding and
    the caption's pooled embedding projected into the timestep embedding; `clip_extra_context_tokens` context tokens
    projected from the image embedding, before the caption's token encodings projected to the attention width and
    normalised; and the learned null image embedding that guidance conditions on. Our own class because diffusers'
    (deprecated with UnCLIP) swaps the null embedding in for a whole half batch at sampling, where training drops
    it per sample."""

    @register_to_config
    def __init__(
        self,
        *,
        clip_extra_context_tokens: int = 4,
        clip_embeddings_dim: int = 768,
        time_embed_dim: int,
        cross_attention_dim: int,
    ):
        super().__init__()
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(clip_embeddings_dim))
        self.embedding_proj = nn.Linear(clip_embeddings_dim, time_embed_dim)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(clip_embeddings_dim, time_embed_dim)
        self.clip_extra_context_tokens_proj = nn.Linear(
            clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim
        )
        self.encoder_hidden_states_proj = nn.Linear(clip_embeddings_dim, cross_attention_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cross_attention_dim)

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_hidden_states: torch.Tensor,
        drop_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, tokens + L, cross_attention_dim), addition to the timestep embedding (B, time_embed_dim))
        for CLIP image embeddings (B, D), the caption's pooled embeddings (B, D) and token encodings (B, L, D);
        where `drop_image` (B,) bool, the learned null embedding stands in for the image embedding."""
        if drop_image is not None:
            null = self.learned_classifier_free_guidance_embeddings.to(image_embeds.dtype)
            image_embeds = torch.where(drop_image[:, None], null[None], image_embeds)
        time = self.clip_image_embeddings_project_to_time_embeddings(image_embeds) + self.embedding_proj(text_embeds)
        # The projection's output is laid out (width, tokens), as in Karlo's checkpoint.
        tokens = self.clip_extra_context_tokens_proj(image_embeds)
        tokens = tokens.reshape(image_embeds.shape[0], -1, self.config.clip_extra_context_tokens).permute(0, 2, 1)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_hidden_states))
        return torch.cat([tokens, text], dim=1), time


def build_karlo_decoder(
    preset: Mapping[str, Any], embedding_dim: int
) -> tuple[UNet2DConditionModel, UnCLIPTextProjModel]:
    """Karlo's UNet (6 output channels: ε and the variance interpolation) at the preset's size, and its
    conditioning on `embedding_dim`-wide CLIP embeddings (the caption's token encodings are as wide)."""
    unet = UNet2DConditionModel(
        sample_size=int(preset["image_size"]),
        in_channels=3,
        out_channels=6,
        class_embed_type="identity",
        **preset["unet"],
    )
    text_proj = UnCLIPTextProjModel(
        clip_extra_context_tokens=int(preset["num_image_tokens"]),
        clip_embeddings_dim=embedding_dim,
        time_embed_dim=unet.time_embedding.linear_2.out_features,
        cross_attention_dim=unet.config.cross_attention_dim,
    )
    return unet, text_proj


def load_karlo_decoder(path: str | Path, option: str) -> tuple[UNet2DConditionModel, UnCLIPTextProjModel]:
    """Karlo's decoder UNet and text projection from a Karlo-layout folder (Karlo's own, or a decoder export of
    this structure), checked to be Karlo's structure."""
    unet_folder = component_folder(path, "decoder", "UNet2DConditionModel", option, KARLO_DECODER_LAYOUT)
    text_folder = component_folder(path, "text_proj", "UnCLIPTextProjModel", option, KARLO_DECODER_LAYOUT)
    unet = load_component(UNet2DConditionModel, unet_folder, option)
    config = unet.config
    if config.class_embed_type != "identity" or config.out_channels != 2 * config.in_channels:
        raise UserError(
            f"{option}='{path}': decoder/ is not Karlo's structure (class_embed_type={config.class_embed_type}, "
            f"{config.out_channels} output channels for {config.in_channels}): expected {KARLO_DECODER_LAYOUT}"
        )
    return unet, load_component(UnCLIPTextProjModel, text_folder, option)
