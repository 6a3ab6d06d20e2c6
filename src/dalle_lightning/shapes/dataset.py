"""Shapes: a synthetic compositional text-image data set, and the project's built-in benchmark.

Every image is one to four filled shapes (circle, square, triangle, star, cross) in six well-separated,
saturated colours on a black background, with a caption in one of several phrasings. There are three kinds
of scene:

- ``single``: one object ("a red circle", "a circle that is red", ...);
- ``count``: two to four objects of the same colour and shape ("three blue squares", "a pair of ...");
- ``relation``: two different objects placed clearly beside or above each other
  ("a red circle to the left of a blue square", "a blue square below a yellow star", ...).

Together they probe the failure modes DALL-E 2 is known for: attribute binding, counting and spatial
relations. Some colour-shape pairs (:data:`HELDOUT_PAIRS`) and some spatial arrangements of shapes
(:data:`HELDOUT_RELATIONS`) never occur in the ``train`` split; about half of the ``val`` split uses them, so
metrics can be reported separately for seen and held-out combinations.

Each scene carries a canonical ``group`` string ("1 red circle", "3 blue square",
"red circle|left of|blue square") naming what any correct image for its caption must show, whatever the
phrasing, positions or sizes: two samples with the same group are interchangeable answers for each other.

The output is real img2dataset-format webdataset shards (``{key}.jpg``, ``{key}.txt``, ``{key}.json``), so
training on Shapes exercises the same code path as training on downloaded data, and a first run needs no
downloads. Generation is deterministic: each sample has its own random generator derived from
(seed, split, index), so the output does not depend on shard size or on the order of work.

Command line::

    python -m dalle_lightning.shapes --out data/shapes --num-samples 20000
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "DEFAULT_KIND_WEIGHTS",
    "HELDOUT_PAIRS",
    "HELDOUT_RELATIONS",
    "KINDS",
    "MIN_IMAGE_SIZE",
    "RELATIONS",
    "RELATION_MAX_SKEW",
    "RELATION_MIN_GAP",
    "SHAPES",
    "SPLITS",
    "Scene",
    "ShapeObject",
    "build",
    "canonical_relation",
    "main",
    "relation_holds",
    "render",
    "sample_scene",
    "shape_area",
    "write_split",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "yellow": (230, 230, 30),
    "green": (30, 230, 30),
    "cyan": (30, 230, 230),
    "blue": (30, 30, 230),
    "magenta": (230, 30, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
KINDS: tuple[str, ...] = ("single", "count", "relation")
SPLITS: tuple[str, ...] = ("train", "val")
DEFAULT_KIND_WEIGHTS: dict[str, float] = {"single": 0.3, "count": 0.3, "relation": 0.4}
MIN_IMAGE_SIZE = 32
# Bump whenever the generated content changes, so that build() does not reuse shards of an older version.
VERSION = 1

# A diagonal of the colour x shape table: every colour and every shape is still seen in training.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (colour, SHAPES[i % len(SHAPES)]) for i, colour in enumerate(COLOURS)
)
# Canonical (shape_a, "left of" | "above", shape_b); "b right of a" and "b below a" are the same arrangements.
# The reverse arrangements ("triangle left of circle", ...) stay in training, so only the order is novel.
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("circle", "left of", "triangle"),
        ("square", "above", "star"),
        ("star", "left of", "cross"),
        ("cross", "above", "circle"),
    }
)

# Object sizes (side of the bounding box) as fractions of the image size, per scene kind.
_SIZE_FRACTION = {"single": (14 / 64, 24 / 64), "count": (10 / 64, 16 / 64), "relation": (12 / 64, 20 / 64)}
# A relation holds when the centres are this far apart (fraction of the image) along its axis ...
RELATION_MIN_GAP = 0.25
# ... and the offset across the axis is at most this fraction of that distance.
RELATION_MAX_SKEW = 0.5
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_SUPERSAMPLE = 4
# Inner/outer radius of the star: fatter than a geometric star so it still reads as a star at ~10 px.
_STAR_INNER = 0.45
_JPEG_QUALITY = 95
_MAX_TRIES = 10_000

T = TypeVar("T")


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape: centre (``x``, ``y``) and bounding-box side ``size``, in output-image pixels."""

    shape: str
    colour: str
    x: int
    y: int
    size: int

    def to_json(self) -> dict[str, Any]:
        """The object as a JSON-ready dict."""
        return {"shape": self.shape, "colour": self.colour, "x": self.x, "y": self.y, "size": self.size}


@dataclass(frozen=True)
class Scene:
    """A scene to render and its caption.

    ``relation`` is ``(subject index, relation as phrased in the caption, object index)`` for relation
    scenes, else ``None``; ``heldout`` says whether the scene uses a held-out pair or arrangement.
    """

    objects: tuple[ShapeObject, ...]
    caption: str
    group: str
    kind: str
    heldout: bool
    relation: tuple[int, str, int] | None = None

    def to_json(self, split: str, size: int) -> dict[str, Any]:
        """The ground truth stored as ``{key}.json`` next to the image."""
        relation = None
        if self.relation is not None:
            subject, name, obj = self.relation
            relation = {"subject": subject, "relation": name, "object": obj}
        return {
            "caption": self.caption,
            "group": self.group,
            "kind": self.kind,
            "heldout": self.heldout,
            "split": split,
            "objects": [o.to_json() for o in self.objects],
            "relation": relation,
            "width": size,
            "height": size,
        }


def canonical_relation(subject: T, relation: str, obj: T) -> tuple[T, str, T]:
    """Rewrite ``subject relation obj`` with ``"left of"`` or ``"above"``, swapping operands if needed."""
    if relation in ("left of", "above"):
        return subject, relation, obj
    if relation in ("right of", "below"):
        return obj, _INVERSE[relation], subject
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def relation_holds(a: ShapeObject, relation: str, b: ShapeObject, size: int = 64) -> bool:
    """Whether ``a`` is unambiguously ``relation`` ``b`` in an image of side ``size``.

    The centres must be at least ``RELATION_MIN_GAP * size`` apart along the relation's axis, and the
    offset across it at most ``RELATION_MAX_SKEW`` times that distance.
    """
    a, relation, b = canonical_relation(a, relation, b)
    return _holds((a.x, a.y), relation, (b.x, b.y), size)


def _holds(a: tuple[int, int], relation: str, b: tuple[int, int], size: int) -> bool:
    """``relation_holds`` on centres, for ``relation`` in ("left of", "above")."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = (dx, dy) if relation == "left of" else (dy, dx)
    return along >= RELATION_MIN_GAP * size and abs(across) <= RELATION_MAX_SKEW * along


def shape_area(shape: str, size: float) -> float:
    """Area in pixels of ``shape`` drawn with bounding-box side ``size``."""
    if shape == "circle":
        return math.pi * size * size / 4
    if shape == "square":
        return size * size
    if shape == "triangle":
        return size * size / 2
    if shape == "star":
        outer = size / (2 * math.sin(math.radians(72)))
        return 5 * outer * (_STAR_INNER * outer) * math.sin(math.radians(36))
    if shape == "cross":
        return 5 * size * size / 9
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "z", "ch", "sh")) else "s")


def _check_size(size: int) -> None:
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be at least {MIN_IMAGE_SIZE}, got {size}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _kind_weights(kind_weights: Mapping[str, float] | None) -> dict[str, float]:
    weights = dict(DEFAULT_KIND_WEIGHTS if kind_weights is None else kind_weights)
    unknown = set(weights) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown scene kinds {sorted(unknown)}; expected some of {KINDS}")
    out = {kind: float(weights.get(kind, 0.0)) for kind in KINDS}
    if any(w < 0 or not math.isfinite(w) for w in out.values()) or sum(out.values()) <= 0:
        raise ValueError(f"kind weights must be finite, non-negative and not all zero, got {weights}")
    return out


def _descriptor(rng: random.Random) -> tuple[str, str]:
    return rng.choice(tuple(COLOURS)), rng.choice(SHAPES)


def _place(
    rng: random.Random,
    sizes: Sequence[int],
    image_size: int,
    accept: Callable[[list[tuple[int, int]]], bool] | None = None,
) -> list[tuple[int, int]]:
    """Centres for boxes of the given sizes: inside the image, not touching, and passing ``accept``."""
    margin = max(1, image_size // 32)
    # A visible gap keeps objects separate connected components, which the oracle relies on.
    gap = max(2, image_size // 24)
    for _ in range(_MAX_TRIES):
        placed: list[tuple[int, int, int]] = []
        for side in sizes:
            lo = math.ceil(margin + side / 2)
            hi = math.floor(image_size - margin - side / 2)
            for _ in range(50):
                x, y = rng.randint(lo, hi), rng.randint(lo, hi)
                if all(max(abs(x - px), abs(y - py)) >= (side + pside) / 2 + gap for px, py, pside in placed):
                    placed.append((x, y, side))
                    break
            else:
                break
        if len(placed) == len(sizes):
            centres = [(x, y) for x, y, _ in placed]
            if accept is None or accept(centres):
                return centres
    raise RuntimeError(f"could not place {len(sizes)} objects in a {image_size}px image")


def _sizes(rng: random.Random, kind: str, image_size: int, n: int) -> list[int]:
    lo, hi = _SIZE_FRACTION[kind]
    return [rng.randint(round(lo * image_size), round(hi * image_size)) for _ in range(n)]


def _is_heldout(pairs: Sequence[tuple[str, str]], arrangement: tuple[str, str, str] | None) -> bool:
    return any(p in HELDOUT_PAIRS for p in pairs) or arrangement in HELDOUT_RELATIONS


def _single_caption(rng: random.Random, colour: str, shape: str) -> str:
    templates = (
        f"{_article(colour)} {colour} {shape}",
        f"one {colour} {shape}",
        f"a single {colour} {shape}",
        f"{_article(shape)} {shape} that is {colour}",
        f"{_article(colour)} {colour} {shape} on a black background",
        f"an image of {_article(colour)} {colour} {shape}",
    )
    return rng.choice(templates)


def _count_caption(rng: random.Random, n: int, colour: str, shape: str) -> str:
    number, shapes = _NUMBER_WORDS[n], _plural(shape)
    templates = [
        f"{number} {colour} {shapes}",
        f"{number} {shapes} that are {colour}",
        f"exactly {number} {colour} {shapes}",
        f"{number} {colour} {shapes} on a black background",
    ]
    if n == 2:
        templates.append(f"a pair of {colour} {shapes}")
    return rng.choice(templates)


def _relation_caption(rng: random.Random, subject: ShapeObject, relation: str, obj: ShapeObject) -> str:
    a = f"{_article(subject.colour)} {subject.colour} {subject.shape}"
    b = f"{_article(obj.colour)} {obj.colour} {obj.shape}"
    words = rng.choice(_RELATION_WORDS[relation])
    templates = (f"{a} {words} {b}", f"{a} is {words} {b}", f"an image of {a} {words} {b}")
    return rng.choice(templates)


def sample_scene(
    rng: random.Random,
    split: str,
    size: int = 64,
    kind_weights: Mapping[str, float] | None = None,
    heldout: bool | None = None,
) -> Scene:
    """Sample one scene of ``split`` for a ``size`` x ``size`` image.

    ``train`` scenes never use a held-out pair or arrangement. For ``val``, ``heldout`` picks whether the
    scene must use one (``True``) or must not (``False``); ``None`` picks either with probability 1/2.
    """
    _check_split(split)
    _check_size(size)
    weights = _kind_weights(kind_weights)
    if split == "train":
        if heldout:
            raise ValueError("the train split has no held-out scenes")
        heldout = False
    elif heldout is None:
        heldout = rng.random() < 0.5
    kind = rng.choices(KINDS, weights=[weights[k] for k in KINDS])[0]

    # Choose the content first and only lay out and phrase accepted content: rejection stays cheap.
    for _ in range(_MAX_TRIES):
        if kind == "relation":
            first, second = _descriptor(rng), _descriptor(rng)
            if first == second:
                continue
            axis = rng.choice(("left of", "above"))
            arrangement = (first[1], axis, second[1])
            if _is_heldout((first, second), arrangement) == heldout:
                return _relation_scene(rng, first, axis, second, size)
        else:
            colour, shape = _descriptor(rng)
            if _is_heldout([(colour, shape)], None) == heldout:
                n = 1 if kind == "single" else rng.randint(2, 4)
                return _group_scene(rng, kind, n, colour, shape, size)
    raise RuntimeError(f"could not sample a {kind} scene with heldout={heldout}")


def _group_scene(rng: random.Random, kind: str, n: int, colour: str, shape: str, size: int) -> Scene:
    sizes = _sizes(rng, kind, size, n)
    centres = _place(rng, sizes, size)
    objects = tuple(ShapeObject(shape, colour, x, y, s) for (x, y), s in zip(centres, sizes, strict=True))
    caption = _single_caption(rng, colour, shape) if n == 1 else _count_caption(rng, n, colour, shape)
    heldout = _is_heldout([(colour, shape)], None)
    return Scene(objects, caption, f"{n} {colour} {shape}", kind, heldout)


def _relation_scene(rng: random.Random, first: tuple[str, str], axis: str, second: tuple[str, str], size: int) -> Scene:
    """``first`` is ``axis`` (left of / above) ``second``; the caption names either one as its subject."""
    sizes = _sizes(rng, "relation", size, 2)
    (ax, ay), (bx, by) = _place(rng, sizes, size, accept=lambda c: _holds(c[0], axis, c[1], size))
    a = ShapeObject(first[1], first[0], ax, ay, sizes[0])
    b = ShapeObject(second[1], second[0], bx, by, sizes[1])
    subject, relation, obj = (a, axis, b) if rng.random() < 0.5 else (b, _INVERSE[axis], a)
    group = f"{a.colour} {a.shape}|{axis}|{b.colour} {b.shape}"
    heldout = _is_heldout((first, second), (first[1], axis, second[1]))
    caption = _relation_caption(rng, subject, relation, obj)
    return Scene((subject, obj), caption, group, "relation", heldout, (0, relation, 1))


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, scale: int) -> None:
    fill = COLOURS[obj.colour]
    cx, cy, half = obj.x * scale, obj.y * scale, obj.size * scale / 2
    # Pillow boxes include their last pixel; polygon vertices sit on pixel centres, hence -1 and -0.5.
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "triangle":
        points = [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
        draw.polygon([(px - 0.5, py - 0.5) for px, py in points], fill=fill)
    elif obj.shape == "star":
        outer = half / math.sin(math.radians(72))
        # Centre the star's vertical extent (top at -outer, bottom at outer * cos 36) in the box.
        sy = cy + outer * (1 - math.cos(math.radians(36))) / 2
        points = []
        for i in range(10):
            radius = outer if i % 2 == 0 else _STAR_INNER * outer
            angle = math.radians(-90 + 36 * i)
            points.append((cx + radius * math.cos(angle) - 0.5, sy + radius * math.sin(angle) - 0.5))
        draw.polygon(points, fill=fill)
    elif obj.shape == "cross":
        arm = obj.size * scale / 6
        draw.rectangle((cx - arm, cy - half, cx + arm - 1, cy + half - 1), fill=fill)
        draw.rectangle((cx - half, cy - arm, cx + half - 1, cy + arm - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` as an anti-aliased ``size`` x ``size`` RGB image on black.

    ``size`` must be the one the scene was sampled for: object coordinates are in its pixels.
    """
    _check_size(size)
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, _SUPERSAMPLE)
    # A box filter rather than Lanczos: no ringing halos, so background pixels stay exactly black.
    return image.reduce(_SUPERSAMPLE)


def _sample_rng(seed: int, split: str, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across processes and runs.
    return random.Random(f"shapes-v{VERSION}/{seed}/{split}/{index}")


def _make_sample(
    split: str, index: int, size: int, seed: int, weights: Mapping[str, float]
) -> tuple[dict[str, Any], Scene]:
    rng = _sample_rng(seed, split, index)
    # Alternating targets make any prefix of val (e.g. a quick evaluation) balanced.
    heldout = None if split == "train" else index % 2 == 1
    scene = sample_scene(rng, split, size, weights, heldout=heldout)
    buffer = io.BytesIO()
    # 4:4:4 chroma: the default 4:2:0 subsampling smears colours across the edges of small objects.
    render(scene, size).save(buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    sample = {
        "__key__": f"{split}{index:08d}",
        "jpg": buffer.getvalue(),
        "txt": scene.caption,
        "json": json.dumps(scene.to_json(split, size)),
    }
    return sample, scene


def _brace_pattern(split_dir: Path, split: str, num_shards: int) -> str:
    if num_shards == 1:
        return str(split_dir / f"{split}-000000.tar")
    return str(split_dir / f"{split}-{{000000..{num_shards - 1:06d}}}.tar")


def _expand_pattern(pattern: str) -> list[str]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match is None:
        return [pattern]
    width = len(match.group(1))
    return [
        pattern[: match.start()] + f"{i:0{width}d}" + pattern[match.end() :]
        for i in range(int(match.group(1)), int(match.group(2)) + 1)
    ]


def _write_split(
    out: Path | str,
    split: str,
    num_samples: int,
    size: int,
    seed: int,
    samples_per_shard: int,
    kind_weights: Mapping[str, float] | None,
) -> tuple[str, dict[str, Any]]:
    # Imported here: webdataset imports torch, which sampling, rendering and the up-to-date check avoid.
    import webdataset as wds

    _check_split(split)
    _check_size(size)
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError(f"num_samples and samples_per_shard must be positive, got {num_samples}, {samples_per_shard}")
    weights = _kind_weights(kind_weights)
    split_dir = Path(out).resolve() / split
    split_dir.mkdir(parents=True, exist_ok=True)
    # Shards of an earlier, larger run would otherwise be picked up by anyone globbing the folder.
    for stale in split_dir.glob(f"{split}-*.tar"):
        stale.unlink()
    pattern = str(split_dir).replace("%", "%%") + f"/{split}-%06d.tar"
    written: list[str] = []
    kinds: Counter[str] = Counter()
    heldout = 0
    # A fixed mtime makes the tar bytes depend on the content only.
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, post=written.append, mtime=0) as sink:
        for index in range(num_samples):
            sample, scene = _make_sample(split, index, size, seed, weights)
            sink.write(sample)
            kinds[scene.kind] += 1
            heldout += scene.heldout
    stats = {"total": num_samples, "kinds": {k: kinds[k] for k in KINDS}, "heldout": heldout}
    return _brace_pattern(split_dir, split, len(written)), stats


def write_split(
    out: Path | str,
    split: str,
    num_samples: int,
    size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
    kind_weights: Mapping[str, float] | None = None,
) -> str:
    """Render ``num_samples`` samples of ``split`` into ``{out}/{split}/{split}-%06d.tar``.

    Returns the brace pattern of the shards written, e.g. ``/abs/out/train/train-{000000..000009}.tar``.
    """
    return _write_split(out, split, num_samples, size, seed, samples_per_shard, kind_weights)[0]


def _manifest_params(
    num_train: int, num_val: int, size: int, seed: int, samples_per_shard: int, weights: Mapping[str, float]
) -> dict[str, Any]:
    return {
        "version": VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": size,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "kind_weights": dict(weights),
    }


def _up_to_date(manifest_path: Path, params: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in params.items()):
        return None
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or set(shards) != set(SPLITS):
        return None
    if not all(os.path.isfile(path) for split in SPLITS for path in _expand_pattern(shards[split])):
        return None
    return manifest


def _build(
    out: Path | str,
    num_train: int,
    num_val: int,
    size: int,
    seed: int,
    samples_per_shard: int,
    kind_weights: Mapping[str, float] | None,
) -> tuple[dict[str, Any], bool]:
    _check_size(size)
    weights = _kind_weights(kind_weights)
    out = Path(out).resolve()
    manifest_path = out / "manifest.json"
    params = _manifest_params(num_train, num_val, size, seed, samples_per_shard, weights)
    manifest = _up_to_date(manifest_path, params)
    if manifest is not None:
        return manifest, False
    out.mkdir(parents=True, exist_ok=True)
    # Removed first, so an interrupted rebuild never leaves a manifest describing half-written shards.
    manifest_path.unlink(missing_ok=True)
    shards, counts = {}, {}
    for split, n in (("train", num_train), ("val", num_val)):
        shards[split], counts[split] = _write_split(out, split, n, size, seed, samples_per_shard, weights)
    manifest = {
        "dataset": "shapes",
        **params,
        "shards": shards,
        "counts": counts,
        "heldout_pairs": sorted([list(p) for p in HELDOUT_PAIRS]),
        "heldout_relations": sorted([list(r) for r in HELDOUT_RELATIONS]),
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "relations": list(RELATIONS),
    }
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    return manifest, True


def build(
    out: Path | str,
    num_train: int,
    num_val: int,
    size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
    kind_weights: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Write the train and val splits and ``{out}/manifest.json``; returns the manifest.

    Does nothing when ``out`` already holds a complete build with the same parameters.
    """
    return _build(out, num_train, num_val, size, seed, samples_per_shard, kind_weights)[0]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block: the message is what the user needs.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: build the data set and print a one-line summary."""
    parser = _Parser(prog="python -m dalle_lightning.shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--num-samples", required=True, type=_int_at_least(1), help="train samples")
    parser.add_argument("--num-val", type=_int_at_least(1), help="val samples (default: max(N // 10, 200))")
    parser.add_argument("--size", type=_int_at_least(MIN_IMAGE_SIZE), default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=_int_at_least(1), default=1000)
    args = parser.parse_args(argv)
    num_val = args.num_val if args.num_val is not None else max(args.num_samples // 10, 200)
    start = time.perf_counter()
    try:
        manifest, wrote = _build(
            args.out, args.num_samples, num_val, args.size, args.seed, args.samples_per_shard, None
        )
    except OSError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    counts = manifest["counts"]
    state = f"wrote in {time.perf_counter() - start:.1f}s" if wrote else "up to date"
    print(
        f"shapes: {counts['train']['total']} train + {counts['val']['total']} val "
        f"({counts['val']['heldout']} held-out) samples at {args.size}px, seed {args.seed}, "
        f"in {Path(args.out).resolve()} ({state})"
    )
    return 0
