"""CLIP models: the trainable `CLIPModel` of the CLIP stage (built from a size preset or loaded with
`from_pretrained`), and `FrozenClip`, the frozen CLIP every later stage and script encodes with: our own CLIP
export or any transformers CLIP (`load_frozen_clip`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerBase,
)

from dalle_lightning.errors import UserError
from dalle_lightning.export import ClipLocation, locate_clip

# OpenAI CLIP's pixel statistics: pretrained CLIPs expect them; a CLIP trained here learns with them too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# How the embeddings that pass between stages are scaled (what an export's manifest records as `embeddings`; a
# stage's `normalize_embeddings`): "unit": L2-normalised, the convention of clip-retrieval, LAION's published
# embeddings and the default presets; "raw": as the CLIP's projection gives them (Karlo's and Kandinsky 2.2's priors
# and decoders). A prior and the decoder it feeds share one convention.
EMBEDDING_CONVENTIONS = ("unit", "raw")


def build_clip(preset: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase | None = None) -> CLIPModel:
    """A `CLIPModel` from a preset (`conf/model/clip/*.yaml`), or `from_pretrained(preset.pretrained)`."""
    if preset.get("pretrained"):
        try:
            return CLIPModel.from_pretrained(preset["pretrained"], use_safetensors=True)
        except (OSError, ValueError) as err:
            raise UserError(
                f"model.clip.pretrained='{preset['pretrained']}' cannot be loaded ({str(err).splitlines()[0]}); "
                "give a local folder saved with save_pretrained (safetensors), or null to train from scratch"
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


# PIL's resampling filters (the image processors' `resample`) as torch interpolation modes; torch has no Lanczos,
# bicubic is the nearest of its filters.
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}


@dataclass(frozen=True)
class ImagePreprocess:
    """A CLIP's image preprocessing, as its transformers image processor does it (resize so the shortest side is
    `shortest_edge`, or to `size` exactly; centre-crop `crop`; scale to [0, 1]; normalise by `mean`/`std`), in torch
    on batches already on the device: (N, 3, H, W) images in [-1, 1] → pixel values."""

    shortest_edge: int | None
    size: tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    mode: str = "bicubic"

    @classmethod
    def openai(cls, image_size: int) -> ImagePreprocess:
        """OpenAI's preprocessing at `image_size` (what CLIPs without a saved image processor get)."""
        return cls(image_size, None, (image_size, image_size))

    @classmethod
    def from_processor(cls, folder: Path) -> ImagePreprocess:
        """The preprocessing a saved CLIP image processor (`preprocessor_config.json`) describes."""
        from transformers import CLIPImageProcessorPil

        processor = CLIPImageProcessorPil.from_pretrained(str(folder))
        size, crop = processor.size, processor.crop_size
        shortest = size.shortest_edge if processor.do_resize else None
        exact = (size.height, size.width) if processor.do_resize and size.height and size.width else None
        crops = (crop.height, crop.width) if processor.do_center_crop else None
        mean = tuple(processor.image_mean) if processor.do_normalize else (0.0, 0.0, 0.0)
        std = tuple(processor.image_std) if processor.do_normalize else (1.0, 1.0, 1.0)
        return cls(shortest, exact, crops, mean, std, _RESAMPLE.get(int(processor.resample), "bicubic"))

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)  # as transformers rounds
        return (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        target = self.resized_shape(height, width)
        if target != (height, width):
            smooth = self.mode != "nearest"
            images = F.interpolate(images, size=target, mode=self.mode, antialias=smooth)
        if self.crop is not None:
            images = _centre_crop(images, *self.crop)
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        return ((images + 1) / 2 - mean) / std


def _centre_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' centre crop: offsets rounded down, black padding where the crop is larger than the image."""
    h, w = images.shape[-2:]
    if h < height or w < width:  # pad with black ([-1]) first, centred
        top, left = max(0, height - h) // 2, max(0, width - w) // 2
        padding = (left, max(0, width - w) - left, top, max(0, height - h) - top)
        images, h, w = F.pad(images, padding, value=-1.0), max(h, height), max(w, width)
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top : top + height, left : left + width]


def encode_images(model: CLIPModel, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of images in [-1, 1] by a trainable `CLIPModel` (the CLIP stage)."""
    pixels = ImagePreprocess.openai(model.config.vision_config.image_size)(images)
    return F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)


def _trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
    if attention_mask is None:
        return input_ids, None
    # Drop the padding columns no caption in the batch reaches: under the causal mask the result is the same, and
    # short captions padded to the context length would otherwise double the text encoder's work.
    length = int(attention_mask.sum(1).max())
    return input_ids[:, :length], attention_mask[:, :length]


def encode_texts(model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """L2-normalised text embeddings of token ids by a trainable `CLIPModel` (the CLIP stage)."""
    output = model.get_text_features(*_trim_padding(input_ids, attention_mask))
    return F.normalize(_features(output), dim=-1)


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


def empty_caption_ids(text_config: Any, length: int, batch: int = 1) -> torch.Tensor:
    """Token ids of the empty caption ("": start and end of text), the null text of classifier-free guidance
    in Karlo and Kandinsky. Positions after the end of text are masked (`text_mask`): their ids do not matter."""
    bos, eos = text_special_ids(text_config)
    ids = torch.full((batch, length), eos, dtype=torch.long)
    ids[:, 0] = bos
    return ids


class FrozenClip:
    """A CLIP kept frozen under the other stages: its text tower, its image tower (optional), its tokenizer and its
    image preprocessing, with the encodings the stages use. Build it with `load_frozen_clip`; a stage takes the
    source or a loaded one (`frozen_clip`), so that a pipeline's stages share one copy.

    Contract:

    - `text_encoder` is a transformers `CLIPTextModelWithProjection` and `image_encoder` a
      `CLIPVisionModelWithProjection` (None for a text-only CLIP, or when not loaded), in eval mode, without
      gradients; `tokenizer` is the CLIP's own; `location` says where each part was found (`source`: as given).
      Whatever the folder's layout (one `CLIPModel` checkpoint or separate towers), the towers are these two
      classes, as diffusers' unCLIP and Kandinsky pipelines take them.
    - `encode_texts` / `encode_images` give (N, `projection_dim`) embeddings, L2-normalised unless
      `normalize=False` (then the projection's raw output); `text_token_encodings` the text tower's last hidden
      states (N, L, `text_width`) and the mask of tokens up to the first end-of-text. Images are (N, 3, H, W) in
      [-1, 1], any size: `preprocess` resizes, crops and normalises them as the CLIP's image processor would.
    - It is deliberately not an `nn.Module`: set as an attribute of a LightningModule it stays out of
      `parameters()`, `state_dict()` (so out of checkpoints and exports), the optimizer, and the copy that EMA
      weight averaging makes of the module (a deep copy shares it: a frozen model never changes). The owner moves
      it along with itself (`StageModule._apply`); elsewhere call `.to(device)`.
    """

    def __init__(
        self,
        location: ClipLocation,
        tokenizer: PreTrainedTokenizerBase,
        text_config: CLIPTextConfig,
        vision_config: CLIPVisionConfig | None,
        preprocess: ImagePreprocess,
        text_encoder: CLIPTextModelWithProjection | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
    ):
        self.location = location
        self.tokenizer = tokenizer
        self.text_config = text_config
        self.vision_config = vision_config
        self.preprocess = preprocess
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        for network in self.networks():
            network.eval().requires_grad_(False)

    # --- what it is ----------------------------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The folder or hub name it was loaded from, as given."""
        return self.location.source

    @property
    def projection_dim(self) -> int:
        """The width of its embeddings."""
        return int(self.text_config.projection_dim)

    @property
    def text_width(self) -> int:
        """The width of the text tower's token encodings."""
        return int(self.text_config.hidden_size)

    @property
    def context_length(self) -> int:
        """Tokens per caption: the tokenizer's limit, at most the text tower's positions."""
        return int(min(self.tokenizer.model_max_length, self.text_config.max_position_embeddings))

    @property
    def image_size(self) -> int | None:
        """The side of the images the image tower sees (None without one)."""
        return None if self.vision_config is None else int(self.vision_config.image_size)

    def networks(self) -> list[nn.Module]:
        return [n for n in (self.text_encoder, self.image_encoder) if n is not None]

    # --- where it is ---------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        for network in self.networks():
            return next(network.parameters()).device
        return torch.device("cpu")

    def to(self, *args: Any, **kwargs: Any) -> FrozenClip:
        for network in self.networks():
            network.to(*args, **kwargs)
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """What `nn.Module._apply` does to a module's tensors (`.to`, `.cuda`, `.half`, ...), for the owner's."""
        for network in self.networks():
            network._apply(fn)

    def __deepcopy__(self, memo: dict) -> FrozenClip:
        return self  # frozen: a copy would only cost memory (EMA's copy of a stage module shares it)

    # --- encodings -----------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of prompts, padded and truncated to `context_length`, on the CPU."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return tokens["input_ids"], tokens["attention_mask"]

    def _text(self) -> CLIPTextModelWithProjection:
        if self.text_encoder is None:
            raise UserError(f"the CLIP '{self.source}' was loaded without its text tower, which this needs")
        return self.text_encoder

    @torch.no_grad()
    def encode_texts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Text embeddings (N, projection_dim) of token ids."""
        embeds = self._text()(*_trim_padding(input_ids, attention_mask)).text_embeds
        return F.normalize(embeds, dim=-1) if normalize else embeds

    @torch.no_grad()
    def text_token_encodings(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tower's per-token encodings (N, L, text_width) and their `text_mask`."""
        mask = text_mask(input_ids, self.text_config)
        encodings = self._text().text_model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        return encodings, mask

    @torch.no_grad()
    def text_features(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the text tower hands an unCLIP prior or decoder, as `UnCLIPPipeline` takes it from
        `CLIPTextModelWithProjection`: the projected pooled embedding (`text_embeds`, not normalised), the last
        hidden states (N, L, text_width) and their `text_mask`."""
        output = self._text()(input_ids=input_ids)
        return output.text_embeds, output.last_hidden_state, text_mask(input_ids, self.text_config)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) as the image tower takes them."""
        return self.preprocess(images.float())

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings (N, projection_dim) of images in [-1, 1]."""
        if self.image_encoder is None:
            raise UserError(
                f"the CLIP '{self.source}' has no image tower (no image_encoder/): encoding images needs one; give a "
                "CLIP with image_encoder/ or a whole CLIPModel folder"
            )
        embeds = self.image_encoder(pixel_values=self.pixel_values(images)).image_embeds
        return F.normalize(embeds, dim=-1) if normalize else embeds


def _from_pretrained(cls: Any, part: Path, location: ClipLocation) -> Any:
    """`cls.from_pretrained(part)` from safetensors in float32, or a one-line error."""
    try:
        return cls.from_pretrained(str(part), use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        if not any(part.glob("*.safetensors")):
            raise UserError(
                f"{location.option}='{location.source}': {part} holds no safetensors weights (a pickled .bin is never "
                "loaded): save the model again with save_pretrained(..., safe_serialization=True)"
            ) from err
        message = str(err).splitlines()[0][:200]
        raise UserError(f"{location.option}='{location.source}' cannot be loaded ({message})") from err


def _towers_of(model: CLIPModel, text: bool, image: bool):
    """A `CLIPModel`'s towers as the `*WithProjection` classes, sharing its modules (nothing is copied)."""
    text_encoder = image_encoder = None
    if text:
        config = copy.deepcopy(model.config.text_config)
        config.projection_dim = model.config.projection_dim
        with torch.device("meta"):  # its submodules are replaced at once by the model's own
            text_encoder = CLIPTextModelWithProjection(config)
        text_encoder.text_model, text_encoder.text_projection = model.text_model, model.text_projection
    if image:
        config = copy.deepcopy(model.config.vision_config)
        config.projection_dim = model.config.projection_dim
        with torch.device("meta"):
            image_encoder = CLIPVisionModelWithProjection(config)
        image_encoder.vision_model, image_encoder.visual_projection = model.vision_model, model.visual_projection
    return text_encoder, image_encoder


def load_frozen_clip(
    source: str | Path, option: str = "stage.clip", *, text: bool = True, image: bool | None = True
) -> FrozenClip:
    """The frozen CLIP at `source` (see `export.locate_clip`: our CLIP export, a `CLIPModel.save_pretrained` folder,
    a folder with `text_encoder/` (+ `image_encoder/`) and `tokenizer/` as Karlo and Kandinsky 2.2 ship, or a hub
    name in the local Hugging Face cache), in eval mode on the CPU, float32, weights from safetensors only.

    `text` / `image` say which towers to load: False leaves the weights on disk (the configs, tokenizer and
    preprocessing are there regardless: a prior that reads embeddings needs no weights at all); `image=None` loads
    the image tower when the CLIP has one (a text-only CLIP serves the text path of the pipeline), `image=True`
    requires one. Errors are one line naming `option`.
    """
    from dalle_lightning.models.tokenizer import load_tokenizer

    location = locate_clip(source, option)
    if image and not location.has_image_tower:
        raise UserError(
            f"{option}='{location.source}' is a text-only CLIP (no image_encoder/), and this needs its image tower: "
            "give a CLIP with image_encoder/ (e.g. Kandinsky 2.2's prior folder) or a whole CLIPModel folder"
        )
    image = location.has_image_tower if image is None else image
    tokenizer = load_tokenizer(location.tokenizer_dir)
    text_encoder = image_encoder = None
    if location.weights is not None:
        config = CLIPConfig.from_pretrained(str(location.weights))
        text_config, vision_config = copy.deepcopy(config.text_config), copy.deepcopy(config.vision_config)
        text_config.projection_dim = vision_config.projection_dim = config.projection_dim
        if text or image:
            model = _from_pretrained(CLIPModel, location.weights, location)
            text_encoder, image_encoder = _towers_of(model, text, image)
    else:
        text_config = CLIPTextConfig.from_pretrained(str(location.text_dir))
        vision_config = CLIPVisionConfig.from_pretrained(str(location.image_dir)) if location.image_dir else None
        if vision_config is not None and vision_config.projection_dim != text_config.projection_dim:
            raise UserError(
                f"{option}='{location.source}': image_encoder/ projects to {vision_config.projection_dim} dimensions, "
                f"text_encoder/ to {text_config.projection_dim}: the two towers are not one CLIP"
            )
        if text:
            text_encoder = _from_pretrained(CLIPTextModelWithProjection, location.text_dir, location)
        if image:
            image_encoder = _from_pretrained(CLIPVisionModelWithProjection, location.image_dir, location)
    if location.processor_dir is not None:
        preprocess = ImagePreprocess.from_processor(location.processor_dir)
    else:
        preprocess = ImagePreprocess.openai(vision_config.image_size if vision_config is not None else 224)
    return FrozenClip(location, tokenizer, text_config, vision_config, preprocess, text_encoder, image_encoder)


def frozen_clip(
    clip: str | Path | FrozenClip, option: str = "stage.clip", *, text: bool = True, image: bool | None = True
) -> FrozenClip:
    """`clip` itself when it is a `FrozenClip` already loaded with the towers asked for (the pipeline hands its own to
    the stages it rebuilds: one copy of the CLIP in memory, not one per stage), else `load_frozen_clip(clip, ...)`."""
    if not isinstance(clip, FrozenClip):
        return load_frozen_clip(clip, option, text=text, image=image)
    for wanted, network, tower in ((text, clip.text_encoder, "text"), (image, clip.image_encoder, "image")):
        if wanted and network is None:
            raise UserError(
                f"{option}: the CLIP '{clip.source}' was loaded without its {tower} tower, which this needs"
            )
    return clip
