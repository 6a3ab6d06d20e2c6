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


def encode_images(model: CLIPModel, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Image embeddings of images in [-1, 1]: L2-normalised, or with `normalize=False` as CLIP projects them
    (`image_embeds`, what Karlo and Kandinsky condition on)."""
    pixels = image_to_pixel_values(images, model.config.vision_config.image_size)
    features = _features(model.get_image_features(pixel_values=pixels))
    return F.normalize(features, dim=-1) if normalize else features


def encode_texts(
    model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, normalize: bool = True
) -> torch.Tensor:
    """Text embeddings of token ids: L2-normalised, or with `normalize=False` as CLIP projects them."""
    if attention_mask is not None:
        # Drop the padding columns no caption in the batch reaches: under the causal mask the result is the
        # same, and short captions padded to the context length would otherwise double the text encoder's work.
        length = int(attention_mask.sum(1).max())
        input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
    features = _features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
    return F.normalize(features, dim=-1) if normalize else features


def unit_norm(embeddings: torch.Tensor) -> bool:
    """Whether every embedding (..., D) has unit length, to float16 precision (as embedding shards store them)."""
    return bool(((embeddings.float().norm(dim=-1) - 1).abs() < 0.01).all())


def text_special_ids(text_config: Any) -> tuple[int, int]:
    """(start-of-text, end-of-text) ids of a CLIP text config. transformers reads eos_token_id == 2 as OpenAI's
    legacy config (openai/clip-vit-large-patch14, Karlo's text encoder), whose start and end of text are the last
    two ids of the vocabulary (49406, 49407), whatever bos/eos_token_id say."""
    if text_config.eos_token_id == 2:
        return text_config.vocab_size - 2, text_config.vocab_size - 1
    return text_config.bos_token_id, text_config.eos_token_id


def text_mask(input_ids: torch.Tensor, text_config: Any) -> torch.Tensor:
    """The mask of tokens up to and including the first end-of-text token: padding ids cannot tell where text
    ends (OpenAI's tokenizer pads with EOS, Karlo's with "!")."""
    is_eos = input_ids == text_special_ids(text_config)[1]
    return (is_eos.cumsum(1) - is_eos.long()) == 0


def text_token_encodings(text_model: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLIP text transformer's per-token encodings (B, L, W) and their `text_mask`."""
    mask = text_mask(input_ids, text_model.config)
    with torch.no_grad():
        encodings = text_model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
    return encodings, mask


def text_features(clip: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a CLIP text tower hands an unCLIP prior or decoder, as `UnCLIPPipeline` takes it from
    `CLIPTextModelWithProjection`: the projected pooled embedding (`text_embeds`, not normalised), the last hidden
    states (B, L, W) and their `text_mask`. `clip` is a `CLIPModel` or a `CLIPTextModelWithProjection`."""
    with torch.no_grad():
        output = clip.text_model(input_ids=input_ids)
        embeds = clip.text_projection(output.pooler_output)
    return embeds, output.last_hidden_state, text_mask(input_ids, clip.text_model.config)


def empty_caption_ids(text_config: Any, length: int, batch: int = 1) -> torch.Tensor:
    """Token ids of the empty caption ("": start and end of text), the null text of classifier-free guidance
    in Karlo and Kandinsky. Positions after the end of text are masked (`text_mask`): their ids do not matter."""
    bos, eos = text_special_ids(text_config)
    ids = torch.full((batch, length), eos, dtype=torch.long)
    ids[:, 0] = bos
    return ids
