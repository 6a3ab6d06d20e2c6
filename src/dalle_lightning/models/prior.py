"""The prior's network: diffusers' `PriorTransformer`, DALL-E 2's decoder-only transformer over [text token
encodings, text embedding, timestep, noised image embedding, learned query], built from `conf/model/prior/*` or
loaded from a published one (Karlo's, Kandinsky 2.2's)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffusers import PriorTransformer

from dalle_lightning.models.pretrained import component_folder, load_component

PRIOR_LAYOUT = (
    "a diffusers PriorTransformer folder (config.json + diffusion_pytorch_model.safetensors) or a pipeline folder "
    "with prior/ in it, as kakaobrain/karlo-v1-alpha and kandinsky-community/kandinsky-2-2-prior ship"
)


def build_prior(preset: Mapping[str, Any], embedding_dim: int, num_text_tokens: int) -> PriorTransformer:
    """A `PriorTransformer` of the preset's size over `embedding_dim`-wide CLIP embeddings; `num_text_tokens` > 0
    adds the CLIP text encoder's token encodings (its context length) to the sequence, 0 conditions on the text
    embedding alone. `norm_in` ("layer" or null) normalises the input sequence (Karlo's and Kandinsky's priors
    do not)."""
    prior = PriorTransformer(
        num_attention_heads=preset["heads"],
        attention_head_dim=preset["head_dim"],
        num_layers=preset["depth"],
        embedding_dim=embedding_dim,
        num_embeddings=num_text_tokens,
        additional_embeddings=4,
        norm_in_type=preset["norm_in"],
        encoder_hid_proj_type="linear" if num_text_tokens else None,
        added_emb_type="prd",
    )
    return freeze_statistics(prior)


def load_prior(path: str | Path, option: str) -> PriorTransformer:
    """A published `PriorTransformer` (its config decides the architecture), from `path` or `path/prior/`."""
    folder = component_folder(path, "prior", "PriorTransformer", option, PRIOR_LAYOUT)
    return freeze_statistics(load_component(PriorTransformer, folder, option))


def freeze_statistics(prior: PriorTransformer) -> PriorTransformer:
    """`clip_mean` / `clip_std` (the image embeddings' statistics, what the prior's normalised space is) are buffers
    in all but name: measured on the data or loaded with the weights, never trained."""
    for stat in (prior.clip_mean, prior.clip_std):
        stat.requires_grad_(False)
    return prior
