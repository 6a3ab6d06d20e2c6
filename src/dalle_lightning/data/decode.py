"""Safe decoding of img2dataset samples.

Only the members a stage asks for are ever read (images, text, json, npy without pickle); nothing in a
shard is unpickled, whatever its extension. Pillow's decompression-bomb guard stays on, only raster formats
that Pillow decodes itself are opened (never EPS, which Pillow hands to Ghostscript), and a sample that
cannot be used raises `SkipSample` with a short reason that the pipeline counts.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ftfy
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# What Image.open may identify an image member as, whatever its extension: the formats img2dataset writes
# (a multi-picture JPEG from a phone camera opens as JPEG and reports "MPO") and the common raster formats
# decoded in-process. Anything else (EPS runs Ghostscript, PSD, ICNS, ...) is not an image of a caption set.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Captions longer than this are not captions (a page of text, a mislabelled binary): skipped before ftfy,
# which would spend seconds on megabytes only for the tokenizer to keep its first 77 tokens.
MAX_CAPTION_BYTES = 16_384

# Every reason a sample or shard can be skipped for; logged as data/skipped/<reason>. A fixed list, so
# that every rank logs the same keys (a key logged on one rank only would hang a synced log).
SKIP_REASONS = (
    "bad_shard",
    "missing_image",
    "corrupt_image",
    "decompression_bomb",
    "too_small",
    "missing_caption",
    "bad_caption_encoding",
    "empty_caption",
    "huge_caption",
    "missing_npy",
    "pickled_npy",
    "corrupt_npy",
    "nonfinite_embedding",  # a row of a clip-retrieval folder with NaN or inf
)


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is a short identifier (logged as data/skipped/<reason>)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class SkipCounter:
    """Counts skipped samples by reason inside one data-loader worker; `pop()` hands over what is new."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    def pop(self) -> dict[str, int]:
        new, self.counts = dict(self.counts), Counter()
        return new


def decode_image(data: bytes, size: int, min_size: int, random_crop: bool = False, rng=None) -> np.ndarray:
    """Decode image bytes to a `size`×`size`×3 uint8 RGB array: shorter side resized to `size`, then cropped.

    JPEGs are decoded in draft mode straight at (at least) the target size, which skips most of the IDCT
    work for large images. Images whose shorter side is below `min_size` are skipped as too small.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; treat both as a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if min(image.size) < min_size:
                raise SkipSample("too_small")
            if image.format in ("JPEG", "MPO"):
                scale = min(image.size) / size
                image.draft("RGB", (max(1, int(image.size[0] / scale)), max(1, int(image.size[1] / scale))))
            image.load()
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SkipSample("decompression_bomb") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SkipSample("corrupt_image") from err
    image = to_rgb(image)
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=3.0)
    if random_crop and rng is not None:
        left, top = rng.randint(0, new_w - size), rng.randint(0, new_h - size)
    else:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode (grayscale, palette, alpha, CMYK, 16-bit) to RGB; transparency onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        return Image.fromarray((array / peak * 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


_WHITESPACE = re.compile(r"\s+")


def decode_caption(data: bytes | None, max_bytes: int = MAX_CAPTION_BYTES) -> str:
    """UTF-8 caption, mojibake fixed, whitespace collapsed; missing, undecodable, empty or huge is skipped."""
    if data is None:
        raise SkipSample("missing_caption")
    if len(data) > max_bytes:
        raise SkipSample("huge_caption")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SkipSample("bad_caption_encoding") from err
    text = _WHITESPACE.sub(" ", text).strip()
    # ftfy changes nothing in printable ASCII without HTML entities (most captions), and costs as much as
    # reading the sample from its tar: skip it there.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = _WHITESPACE.sub(" ", ftfy.fix_text(text)).strip()
    if not text:
        raise SkipSample("empty_caption")
    return text


def decode_json(data: bytes | None) -> dict[str, Any]:
    """Sample metadata; absent or malformed metadata is an empty dict (it is optional in img2dataset)."""
    if not data:
        return {}
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


_PICKLE_OPCODE = b"\x80"  # how every pickle of protocol 2 or later starts


def decode_npy(data: bytes) -> np.ndarray:
    """A `.npy` member, refusing object arrays: `allow_pickle=False` means no code can run.

    The header is read first so that an object array (or a bare pickle under a .npy name) is told apart from
    a damaged file: numpy raises ValueError for both, and "corrupt" is what a truncated download is.
    """
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        header = read_header(buffer)  # (shape, fortran_order, dtype), parsed with ast.literal_eval: no code runs
    except (ValueError, EOFError) as err:  # no .npy magic or an unreadable header
        raise SkipSample("pickled_npy" if data.startswith(_PICKLE_OPCODE) else "corrupt_npy") from err
    if header[2].hasobject:
        raise SkipSample("pickled_npy")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # truncated or inconsistent data
        raise SkipSample("corrupt_npy") from err


def image_member(sample: dict[str, Any]) -> bytes:
    """The sample's image bytes, from the first image extension present."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise SkipSample("missing_image")
