"""The decoder's networks, built from `conf/model/decoder/*`: a diffusers `UNet2DConditionModel` that takes the
CLIP image embedding through its timestep embedding (`class_embed_type="projection"`, as GLIDE and DALL-E 2),
and `DecoderContext`, the cross-attention context: tokens projected from the image embedding (diffusers'
`ImageProjection`, as Kandinsky 2.2) followed by the caption's CLIP token encodings. An editing decoder
(`inpainting: true`) also takes the known image and its mask as extra input channels, as GLIDE's inpainting
model does."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import ImageProjection
from torch import nn

from dalle_lightning.errors import UserError

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
