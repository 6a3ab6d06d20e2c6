"""The prior's network: diffusers' `PriorTransformer`, DALL-E 2's decoder-only transformer over [text token
encodings, text embedding, timestep, noised image embedding, learned query], built from `conf/model/prior/*`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import PriorTransformer


def build_prior(preset: Mapping[str, Any], embedding_dim: int, num_text_tokens: int) -> PriorTransformer:
    """A `PriorTransformer` of the preset's size over `embedding_dim`-wide CLIP embeddings; `num_text_tokens` > 0
    adds the CLIP text encoder's token encodings (its context length) to the sequence, 0 conditions on the text
    embedding alone. `clip_mean` / `clip_std` (the image embeddings' statistics) are buffers in all but name:
    measured on the data, never trained."""
    prior = PriorTransformer(
        num_attention_heads=preset["heads"],
        attention_head_dim=preset["head_dim"],
        num_layers=preset["depth"],
        embedding_dim=embedding_dim,
        num_embeddings=num_text_tokens,
        additional_embeddings=4,
        norm_in_type="layer",
        encoder_hid_proj_type="linear" if num_text_tokens else None,
        added_emb_type="prd",
    )
    for stat in (prior.clip_mean, prior.clip_std):
        stat.requires_grad_(False)
    return prior
