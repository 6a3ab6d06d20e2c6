"""CLIP models: transformers' `CLIPModel`, built from a size preset or loaded with `from_pretrained`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerBase

from dalle_lightning.errors import UserError

# OpenAI CLIP's pixel statistics: pretrained CLIPs expect them; a CLIP trained here learns with them too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(preset: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase | None = None) -> CLIPModel:
    """A `CLIPModel` from a preset (`conf/model/clip/*.yaml`), or `from_pretrained(preset.pretrained)`."""
    if preset.get("pretrained"):
        try:
            return CLIPModel.from_pretrained(preset["pretrained"])
        except (OSError, ValueError) as err:
            raise UserError(
                f"model.clip.pretrained='{preset['pretrained']}' cannot be loaded ({str(err).splitlines()[0]}); "
                "give a local folder saved with save_pretrained, or null to train from scratch"
            ) from err
    text = dict(preset["text"])
    text.setdefault("max_position_embeddings", preset["context_length"])
    if tokenizer is not None:
        text.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    vision = dict(preset["vision"], image_size=preset["image_size"])
    config = CLIPConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=preset["projection_dim"],
        logit_scale_init_value=preset.get("logit_scale_init", 2.6592),
    )
    return CLIPModel(config)


def _features(output: Any) -> torch.Tensor:
    # transformers 4.x returns the projected features; 5.x returns an output whose pooler_output they are.
    return output if torch.is_tensor(output) else output.pooler_output


def image_to_pixel_values(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) → CLIP pixel values at the model's resolution."""
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bicubic", antialias=True)
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def encode_images(model: CLIPModel, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of images in [-1, 1]."""
    pixels = image_to_pixel_values(images, model.config.vision_config.image_size)
    return F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)


def encode_texts(model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """L2-normalised text embeddings of token ids."""
    if attention_mask is not None:
        # Drop the padding columns no caption in the batch reaches: under the causal mask the result is the
        # same, and short captions padded to the context length would otherwise double the text encoder's work.
        length = int(attention_mask.sum(1).max())
        input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
    output = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return F.normalize(_features(output), dim=-1)


def text_token_encodings(text_model: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP text transformer's per-token encodings (B, L, W) and the mask of tokens up to and including the
    first end-of-text token: padding ids cannot tell where text ends (OpenAI's tokenizer pads with EOS)."""
    is_eos = input_ids == text_model.config.eos_token_id
    mask = (is_eos.cumsum(1) - is_eos.long()) == 0
    with torch.no_grad():
        encodings = text_model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
    return encodings, mask
