"""Compositional accuracy on Shapes: read back what an image shows and check it against its caption.

Shapes images are simple enough to parse exactly: filled shapes in six saturated colours on black, separated by
a visible gap. So instead of asking a learned model (CLIP) whether an image fits its caption, this module reads
the objects off the pixels and checks, category by category, what the caption asked for:

- ``colour``: the colours shown are the colours named;
- ``shape``: the shapes shown are the shapes named;
- ``count``: as many objects as asked;
- ``relation``: (relation prompts only) the first object is left of / above the second;
- ``all``: every category above, and each colour on the right shape (attribute binding).

Results are split into seen and held-out combinations (:data:`~dalle_lightning.shapes.dataset.HELDOUT_PAIRS`,
:data:`~dalle_lightning.shapes.dataset.HELDOUT_RELATIONS`), which is what tells generalisation from memorisation.

The pieces, top to bottom: :func:`parse_prompt` (caption -> :class:`PromptSpec`), :func:`read_objects`
(image -> :class:`DetectedObject` list), :func:`score` (spec + objects -> per-category verdicts), and
:class:`CompositionalAccuracy`, a torchmetrics ``Metric`` that tallies verdicts across batches and ranks.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from scipy import ndimage
from torchmetrics import Metric

from dalle_lightning.shapes.dataset import (
    _NUMBER_WORDS,
    _RELATION_WORDS,
    COLOURS,
    KINDS,
    SHAPES,
    Scene,
    ShapeObject,
    _is_heldout,
    _plural,
    canonical_relation,
    render,
)

__all__ = [
    "CATEGORIES",
    "CompositionalAccuracy",
    "DetectedObject",
    "PromptSpec",
    "judge",
    "parse_prompt",
    "read_objects",
    "score",
]

CATEGORIES: tuple[str, ...] = ("colour", "shape", "count", "relation", "all")


# --------------------------------------------------------------------------------------------------------------
# Captions -> what the image must show
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSpec:
    """What a Shapes caption asks for, independent of its phrasing.

    ``objects`` are the distinct (colour, shape) pairs named: one for ``single`` and ``count`` prompts, two for
    ``relation`` prompts, ordered so that the first is ``relation`` (``"left of"`` or ``"above"``) the second,
    whichever of them the caption used as its subject. ``count`` is how many objects a correct image shows.
    ``group`` is the canonical string shapes.py stores with each sample, so a spec can be checked against the
    ground-truth json; ``heldout`` says whether the prompt uses a held-out pair or arrangement.
    """

    kind: str
    objects: tuple[tuple[str, str], ...]
    count: int
    relation: str | None
    heldout: bool
    group: str

    @property
    def expected_pairs(self) -> Counter[tuple[str, str]]:
        """The (colour, shape) of every object a correct image shows, with multiplicity."""
        if self.kind == "relation":
            return Counter(self.objects)
        return Counter({self.objects[0]: self.count})


_SINGULAR = {_plural(shape): shape for shape in SHAPES}
# "a pair of" is the one count phrasing that is not a number word.
_COUNT_WORDS = {word: n for n, word in _NUMBER_WORDS.items() if n >= 2} | {"a pair of": 2}
_RELATION_PHRASES = {phrase: relation for relation, phrases in _RELATION_WORDS.items() for phrase in phrases}


def _one_of(name: str, words: Sequence[str]) -> str:
    """A named regex group matching any of ``words``, longest first (so "to the left of" beats "left of")."""
    return f"(?P<{name}>" + "|".join(sorted(words, key=len, reverse=True)) + ")"


_COLOUR, _SHAPE = _one_of("colour", list(COLOURS)), _one_of("shape", SHAPES)
_PLURAL, _NUMBER = _one_of("plural", list(_SINGULAR)), _one_of("number", list(_COUNT_WORDS))
_SINGLE_PATTERNS = (
    re.compile(rf"(?:an?|one|a single) {_COLOUR} {_SHAPE}"),
    re.compile(rf"an? {_SHAPE} that is {_COLOUR}"),
)
_COUNT_PATTERNS = (
    re.compile(rf"(?:exactly )?{_NUMBER} {_COLOUR} {_PLURAL}"),
    re.compile(rf"(?:exactly )?{_NUMBER} {_PLURAL} that are {_COLOUR}"),
)
_RELATION_PATTERN = re.compile(
    rf"an? {_one_of('subject_colour', list(COLOURS))} {_one_of('subject_shape', SHAPES)} "
    rf"(?:is )?{_one_of('phrase', list(_RELATION_PHRASES))} "
    rf"an? {_one_of('object_colour', list(COLOURS))} {_one_of('object_shape', SHAPES)}"
)
# Framing any template may carry; it says nothing about the content.
_PREFIX = "an image of "
_SUFFIX = " on a black background"


def parse_prompt(caption: str) -> PromptSpec:
    """Read a caption in any phrasing shapes.py generates; ``ValueError`` for anything else.

    Case, repeated spaces and a final full stop are forgiven; otherwise matching is strict (whole caption,
    known colours, shapes and relation words), so a prompt the oracle cannot judge is reported as such instead
    of being scored against a guess.
    """
    text = " ".join(caption.lower().split()).rstrip(".")
    text = text.removeprefix(_PREFIX).removesuffix(_SUFFIX)

    for pattern in _SINGLE_PATTERNS:
        if match := pattern.fullmatch(text):
            return _group_spec("single", 1, match["colour"], match["shape"])
    for pattern in _COUNT_PATTERNS:
        if match := pattern.fullmatch(text):
            return _group_spec("count", _COUNT_WORDS[match["number"]], match["colour"], _SINGULAR[match["plural"]])
    if match := _RELATION_PATTERN.fullmatch(text):
        first, relation, second = canonical_relation(
            (match["subject_colour"], match["subject_shape"]),
            _RELATION_PHRASES[match["phrase"]],
            (match["object_colour"], match["object_shape"]),
        )
        return PromptSpec(
            kind="relation",
            objects=(first, second),
            count=2,
            relation=relation,
            heldout=_is_heldout((first, second), (first[1], relation, second[1])),
            group=f"{first[0]} {first[1]}|{relation}|{second[0]} {second[1]}",
        )
    raise ValueError(f"not a Shapes caption: {caption!r}")


def _group_spec(kind: str, count: int, colour: str, shape: str) -> PromptSpec:
    return PromptSpec(
        kind=kind,
        objects=((colour, shape),),
        count=count,
        relation=None,
        heldout=_is_heldout([(colour, shape)], None),
        group=f"{count} {colour} {shape}",
    )


# --------------------------------------------------------------------------------------------------------------
# Images -> the objects they show
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedObject:
    """One object read off an image: colour and shape names, bounding-box centre ``x``, ``y`` in pixels (pixel
    ``i`` spans ``[i, i + 1)``, as for shapes.ShapeObject), ``size`` (longer bounding-box side), ``area`` (pixels),
    and ``match``: the soft IoU with the best shape template, a confidence (1 for a clean render)."""

    colour: str
    shape: str
    x: float
    y: float
    size: int
    area: int
    match: float = 1.0


# The palette is 230 or 30 per channel; a pixel belongs to an object when its brightest channel is above the
# midpoint (so anti-aliased edges count when they are mostly covered) ...
_BRIGHT = 130
# ... and it is clearly coloured: white/grey pixels (all channels alike) name no palette colour.
_MIN_CHROMA = 64
_COLOUR_INDEX = {name: i + 1 for i, name in enumerate(COLOURS)}
# Which channels are high (bits R=4, G=2, B=1) -> pixel label: the palette is exactly the six patterns besides
# black and white, so the pattern names the colour. Black and white stay 0 (no colour).
_LABEL_OF_BITS = np.zeros(8, dtype=np.uint8)
_LABEL_OF_BITS[[(r > _BRIGHT) * 4 + (g > _BRIGHT) * 2 + (b > _BRIGHT) for r, g, b in COLOURS.values()]] = list(
    _COLOUR_INDEX.values()
)
# Components below this fraction of the image (12 px at 64 px, 3 px at 32 px) are noise, not objects: the
# smallest Shapes object (a star of side 10/64 of the image) covers about 30/4096 of it.
_MIN_AREA_FRACTION = 3 / 1024
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_PALETTE_CHROMA = max(max(rgb) - min(rgb) for rgb in COLOURS.values())


def read_objects(image: Image.Image | np.ndarray | torch.Tensor, min_area: int | None = None) -> list[DetectedObject]:
    """The objects an image shows, in reading order (top to bottom, then left to right).

    ``image``: a PIL image, a uint8 ``H x W x 3`` array, or a float ``3 x H x W`` tensor in [-1, 1] (what the
    diffusion models output). Each pixel is given the palette colour whose hue it is nearest to, each colour's
    8-connected components above ``min_area`` pixels (default: scaled with the image) become objects, and each
    object's shape is the shapes.py template it overlaps best.
    """
    pixels = _to_uint8(image)
    height, width = pixels.shape[:2]
    if min_area is None:
        min_area = max(2, round(_MIN_AREA_FRACTION * height * width))
    labels = _label_pixels(pixels)
    coverage = _coverage(pixels)
    objects = []
    for name, index in _COLOUR_INDEX.items():
        components, _ = ndimage.label(labels == index, structure=_EIGHT_CONNECTED)
        for component, box in enumerate(ndimage.find_objects(components), start=1):
            if box is None:
                continue
            area = int(np.count_nonzero(components[box] == component))
            if area < min_area:
                continue
            # The box grown by a pixel holds the object's partly covered edge (objects are 2+ px apart);
            # pixels there that belong to another object are left out.
            rows, cols = box
            grown = (slice(max(rows.start - 1, 0), rows.stop + 1), slice(max(cols.start - 1, 0), cols.stop + 1))
            own = (components[grown] == component) | (labels[grown] == 0)
            shape, match = _classify_shape(np.where(own, coverage[grown], 0.0))
            objects.append(
                DetectedObject(
                    colour=name,
                    shape=shape,
                    x=(cols.start + cols.stop) / 2,
                    y=(rows.start + rows.stop) / 2,
                    size=max(rows.stop - rows.start, cols.stop - cols.start),
                    area=area,
                    match=match,
                )
            )
    return sorted(objects, key=lambda o: (o.y, o.x))


def _to_uint8(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a 3 x H x W image tensor, got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.permute(1, 2, 0).cpu().numpy()
        scaled = (image.detach().float().clamp(-1, 1) + 1) * 127.5
        return scaled.round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H x W x 3 array, got {array.dtype} with shape {array.shape}")
    return array


def _label_pixels(pixels: np.ndarray) -> np.ndarray:
    """``H x W`` labels: 0 for background (dark or uncoloured), else 1 + the index of the pixel's palette colour.

    A channel counts as high when it is nearer the pixel's brightest channel than its darkest, i.e. the colour
    is chosen by hue. A fixed threshold per channel would do on clean renders, but a blurred or JPEG-compressed
    yellow edge such as (135, 126, 20) would then read as a red fringe.
    """
    channels = pixels.astype(np.int16)
    brightest, darkest = channels.max(axis=2), channels.min(axis=2)
    high = 2 * channels > (brightest + darkest)[..., None]
    coloured = (brightest > _BRIGHT) & (brightest - darkest >= _MIN_CHROMA)
    bits = high[..., 0] * 4 + high[..., 1] * 2 + high[..., 2]
    return np.where(coloured, _LABEL_OF_BITS[bits], 0).astype(np.uint8)


def _coverage(pixels: np.ndarray) -> np.ndarray:
    """Per pixel, the fraction of it an object covers: chroma is linear in coverage for a palette colour
    anti-aliased onto black (230 - 30 = 200 at full cover), and unlike brightness it ignores white and grey."""
    channels = pixels.astype(np.float32)
    return np.clip((channels.max(axis=2) - channels.min(axis=2)) / _PALETTE_CHROMA, 0.0, 1.0)


@functools.lru_cache(maxsize=1024)
def _template(shape: str, size: int) -> np.ndarray:
    """Coverage of ``shape`` drawn by shapes.py's own renderer at bounding-box side ``size``, cropped like an
    object read by :func:`read_objects` (its above-threshold box grown by a pixel).

    Object centres are whole pixels in shapes.py, so a clean object matches its template value for value.
    """
    canvas = max(32, size + 4)
    obj = ShapeObject(shape, "red", canvas // 2, canvas // 2, size)
    pixels = np.asarray(render(Scene((obj,), "", "", "single", False), canvas))
    coverage, labels = _coverage(pixels), _label_pixels(pixels)
    # A shape of a pixel or two may have no pixel above threshold; then its box is that of any coverage.
    rows, cols = np.nonzero(labels if labels.any() else coverage)
    return coverage[rows.min() - 1 : rows.max() + 2, cols.min() - 1 : cols.max() + 2]


# Template sides tried around an object's thresholded box side: thresholding trims partly covered edges (the
# drawn side is the box side or a pixel more) and blur shrinks what is above threshold by up to a few pixels.
_SIDE_CANDIDATES = range(-1, 5)


def _classify_shape(coverage: np.ndarray) -> tuple[str, float]:
    """(shape, soft IoU) of the template that best overlaps an object's ``coverage`` map.

    Coverage rather than a thresholded mask: at 32 px a 5 px square, circle and cross all threshold to about
    the same 4 x 4 block, and only their partly covered edges tell them apart. The soft IoU (sum of minima over
    sum of maxima) is taken at the best of the one-pixel shifts around centred alignment, since blur and JPEG
    move edges by a pixel. Ties go to the first shape in ``SHAPES``.
    """
    height, width = coverage.shape
    candidates, shifted_templates = _shifted_templates(max(height, width) - 2, height, width)
    target = _centred(coverage, *shifted_templates.shape[-2:])
    overlap = np.minimum(target, shifted_templates).sum(axis=(-2, -1))
    union = np.maximum(target, shifted_templates).sum(axis=(-2, -1))
    iou = (overlap / np.maximum(union, 1e-6)).reshape(len(candidates), -1).max(axis=1)
    best = int(iou.argmax())
    return candidates[best], float(iou[best])


@functools.lru_cache(maxsize=128)
def _shifted_templates(side: int, height: int, width: int) -> tuple[tuple[str, ...], np.ndarray]:
    """For a ``height`` x ``width`` coverage map with thresholded box side ``side``: the shape of each candidate
    template and all of them centred on a common canvas, each in its nine one-pixel shifts
    (``candidates x 3 x 3 x canvas``). Depends on the map's size only, so it is built once per size."""
    sizes = [size for size in (side + d for d in _SIDE_CANDIDATES) if size >= 2]
    templates = [(shape, _template(shape, size)) for shape in SHAPES for size in sizes]
    canvas_height = max(height, *(t.shape[0] for _, t in templates)) + 2
    canvas_width = max(width, *(t.shape[1] for _, t in templates)) + 2
    stack = np.stack([_centred(t, canvas_height + 2, canvas_width + 2) for _, t in templates])
    windows = sliding_window_view(stack, (canvas_height, canvas_width), axis=(1, 2))
    return tuple(shape for shape, _ in templates), windows


def _centred(values: np.ndarray, height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width), dtype=np.float32)
    top, left = (height - values.shape[0]) // 2, (width - values.shape[1]) // 2
    out[top : top + values.shape[0], left : left + values.shape[1]] = values
    return out


# --------------------------------------------------------------------------------------------------------------
# Spec + objects -> verdicts
# --------------------------------------------------------------------------------------------------------------


def score(spec: PromptSpec, objects: Sequence[DetectedObject], size: int) -> dict[str, bool | None]:
    """Per-category verdicts for an image of side ``size`` showing ``objects``, asked for by ``spec``.

    ``colour`` and ``shape`` compare sets (what is shown vs. what is named; counting is ``count``'s job), so a
    wrong count does not also fail colour and shape. ``relation`` is ``None`` for prompts without one. ``all``
    also demands the right (colour, shape) pairs with multiplicity, which catches swapped attributes ("a red
    circle and a blue square" drawn as a blue circle and a red square) that the per-category sets cannot see.
    """
    asked = spec.expected_pairs
    shown = Counter((o.colour, o.shape) for o in objects)
    verdicts: dict[str, bool | None] = {
        "colour": {o.colour for o in objects} == {colour for colour, _ in asked},
        "shape": {o.shape for o in objects} == {shape for _, shape in asked},
        "count": len(objects) == spec.count,
        "relation": None,
    }
    if spec.relation is not None:
        verdicts["relation"] = _relation_shown(spec, objects, size)
    applicable = [v for v in verdicts.values() if v is not None]
    verdicts["all"] = all(applicable) and shown == asked
    return verdicts


def _relation_shown(spec: PromptSpec, objects: Sequence[DetectedObject], size: int) -> bool:
    """Whether some object like the first is left of / above some object like the second.

    Deliberately looser than shapes.py's generation margins (a quarter of the image apart): any arrangement a
    person would describe with the relation counts, i.e. the offset along its axis beats the one across it. The
    along-axis offset must also exceed a sliver of the image (a pixel at 64 px) so jitter is not a relation.
    """
    first, second = spec.objects
    for a in (o for o in objects if (o.colour, o.shape) == first):
        for b in (o for o in objects if (o.colour, o.shape) == second):
            dx, dy = b.x - a.x, b.y - a.y
            along, across = (dx, dy) if spec.relation == "left of" else (dy, dx)
            if along > max(abs(across), size / 64):
                return True
    return False


# --------------------------------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------------------------------

_SPLITS = ("seen", "heldout")
# Tallied per (split, kind): the reported categories plus colour-and-shape, the headline figure's criterion.
_TALLIED = (*CATEGORIES, "colour_shape")


def judge(image: Image.Image | np.ndarray | torch.Tensor, prompt: str | PromptSpec) -> dict[str, bool | None]:
    """The verdicts of ``score`` for one image and its prompt, plus ``colour_shape`` (both right)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    verdicts = score(spec, read_objects(image), _side(image))
    verdicts["colour_shape"] = bool(verdicts["colour"] and verdicts["shape"])
    return verdicts


class CompositionalAccuracy(Metric):
    """Oracle accuracy of generated Shapes images against their prompts, per category, split and kind.

    ``compute()`` returns plain Python (JSON-ready)::

        {"seen": {"colour", "shape", "count", "relation", "all": float | None, "n": int},
         "heldout": {...},
         "by_kind": {"single": {"seen": {...}, "heldout": {...}}, "count": {...}, "relation": {...}},
         "single_heldout_colour_shape": float | None,
         "unparsed": int}

    An accuracy is over the prompts its category applies to (relation: relation prompts only) and ``None`` where
    there are none. ``single_heldout_colour_shape`` is the headline: on single-object prompts with a held-out
    colour-shape pair, how often the image shows that colour and that shape. Prompts :func:`parse_prompt` cannot
    read are skipped and counted as ``unparsed``. States are counts summed across ranks.
    """

    full_state_update = False
    higher_is_better = True

    correct: torch.Tensor
    applicable: torch.Tensor
    prompts: torch.Tensor
    unparsed: torch.Tensor

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        shape = (len(_SPLITS), len(KINDS), len(_TALLIED))
        self.add_state("correct", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("applicable", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("prompts", torch.zeros(shape[:2], dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("unparsed", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor | Sequence[Image.Image], prompts: Sequence[str]) -> None:
        """Score ``images`` (``B x 3 x H x W`` in [-1, 1], or PIL images) against their ``prompts``."""
        if isinstance(images, torch.Tensor):
            # One transfer for the batch rather than one per image.
            images = images.detach().cpu()
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        correct = torch.zeros_like(self.correct, device="cpu")
        applicable = torch.zeros_like(self.applicable, device="cpu")
        counted = torch.zeros_like(self.prompts, device="cpu")
        unparsed = 0
        for image, prompt in zip(images, prompts, strict=True):
            try:
                spec = parse_prompt(prompt)
            except ValueError:
                unparsed += 1
                continue
            verdicts = judge(image, spec)
            split, kind = int(spec.heldout), KINDS.index(spec.kind)
            counted[split, kind] += 1
            for index, category in enumerate(_TALLIED):
                if verdicts[category] is not None:
                    applicable[split, kind, index] += 1
                    correct[split, kind, index] += int(verdicts[category])
        self.correct += correct.to(self.correct.device)
        self.applicable += applicable.to(self.applicable.device)
        self.prompts += counted.to(self.prompts.device)
        self.unparsed += unparsed

    def compute(self) -> dict[str, Any]:
        """The nested accuracy dict described in the class docstring."""
        correct, applicable, prompts = self.correct.cpu(), self.applicable.cpu(), self.prompts.cpu()

        def section(split: int, kinds: Sequence[int]) -> dict[str, float | int | None]:
            hits = correct[split, list(kinds)].sum(0)
            totals = applicable[split, list(kinds)].sum(0)
            out: dict[str, float | int | None] = {
                category: _ratio(hits[i], totals[i]) for i, category in enumerate(CATEGORIES)
            }
            out["n"] = int(prompts[split, list(kinds)].sum())
            return out

        every_kind = range(len(KINDS))
        single, colour_shape = KINDS.index("single"), _TALLIED.index("colour_shape")
        return {
            **{name: section(split, every_kind) for split, name in enumerate(_SPLITS)},
            "by_kind": {
                kind: {name: section(split, [k]) for split, name in enumerate(_SPLITS)} for k, kind in enumerate(KINDS)
            },
            "single_heldout_colour_shape": _ratio(
                correct[1, single, colour_shape], applicable[1, single, colour_shape]
            ),
            "unparsed": int(self.unparsed),
        }


def _side(image: Image.Image | np.ndarray | torch.Tensor) -> int:
    if isinstance(image, Image.Image):
        return max(image.size)
    if isinstance(image, torch.Tensor):
        return max(image.shape[-2:])
    return max(np.asarray(image).shape[:2])


def _ratio(hits: torch.Tensor, total: torch.Tensor) -> float | None:
    return float(hits) / float(total) if int(total) > 0 else None
