"""Tests for the Shapes data set: splits, captions, groups, geometry, rendering, shards and the CLI."""

from __future__ import annotations

import colorsys
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_lightning.shapes import dataset as shapes
from dalle_lightning.shapes.dataset import (
    COLOURS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    KINDS,
    RELATIONS,
    SHAPES,
    Scene,
    ShapeObject,
    build,
    canonical_relation,
    relation_holds,
    render,
    sample_scene,
    shape_area,
    write_split,
)

SRC = Path(__file__).resolve().parents[1] / "src"
NUMBERS = {"two": 2, "three": 3, "four": 4}
CONTENT_WORDS = {*COLOURS, *SHAPES, *NUMBERS, "crosses", *(s + "s" for s in SHAPES)}


def read_shards(pattern_or_dir: Path) -> dict[str, dict[str, bytes]]:
    """All samples of every tar under a folder, read with plain tarfile: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(pattern_or_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.isfile()
                key, ext = member.name.rsplit(".", 1)
                data = tar.extractfile(member)
                assert data is not None
                assert ext not in samples.setdefault(key, {}), f"duplicate {member.name}"
                samples[key][ext] = data.read()
    return samples


def scene_from_json(record: dict) -> tuple[list[ShapeObject], tuple[str, str, str] | None]:
    objects = [ShapeObject(o["shape"], o["colour"], o["x"], o["y"], o["size"]) for o in record["objects"]]
    if record["relation"] is None:
        return objects, None
    rel = record["relation"]
    return objects, (rel["subject"], rel["relation"], rel["object"])


def expected_group(record: dict) -> str:
    """The group recomputed from the objects and the relation, independently of the generator."""
    objects, rel = scene_from_json(record)
    if rel is None:
        assert len({(o.colour, o.shape) for o in objects}) == 1
        return f"{len(objects)} {objects[0].colour} {objects[0].shape}"
    subject, name, obj = rel
    a, canon, b = canonical_relation(objects[subject], name, objects[obj])
    return f"{a.colour} {a.shape}|{canon}|{b.colour} {b.shape}"


def uses_heldout(record: dict) -> bool:
    objects, rel = scene_from_json(record)
    if any((o.colour, o.shape) in HELDOUT_PAIRS for o in objects):
        return True
    if rel is None:
        return False
    a, canon, b = canonical_relation(objects[rel[0]], rel[1], objects[rel[2]])
    return (a.shape, canon, b.shape) in HELDOUT_RELATIONS


def dominant_colour(image: Image.Image) -> str:
    """The palette colour nearest to the most common hue among bright pixels."""
    hsv = np.asarray(image.convert("HSV")).reshape(-1, 3)
    bright = hsv[hsv[:, 2] >= 128]
    assert len(bright) > 0
    hue_bins = Counter((bright[:, 0].astype(int) * 360 // 256 // 10).tolist())
    hue = hue_bins.most_common(1)[0][0] * 10 + 5

    def distance(name: str) -> float:
        r, g, b = (c / 255 for c in COLOURS[name])
        palette_hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
        d = abs(palette_hue - hue) % 360
        return min(d, 360 - d)

    return min(COLOURS, key=distance)


@pytest.fixture(scope="module")
def train_samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    out = tmp_path_factory.mktemp("train")
    write_split(out, "train", 2000, size=32, seed=3, samples_per_shard=1000)
    return read_shards(out / "train")


@pytest.fixture(scope="module")
def val_samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    out = tmp_path_factory.mktemp("val")
    write_split(out, "val", 400, size=64, seed=3, samples_per_shard=150)
    return read_shards(out / "val")


def test_heldout_lists_leave_every_colour_and_shape_in_training() -> None:
    assert len(HELDOUT_PAIRS) == 6
    seen = {(c, s) for c in COLOURS for s in SHAPES} - HELDOUT_PAIRS
    assert {c for c, _ in seen} == set(COLOURS)
    assert {s for _, s in seen} == set(SHAPES)
    assert HELDOUT_RELATIONS
    for a, rel, b in HELDOUT_RELATIONS:
        assert a in SHAPES and b in SHAPES and rel in ("left of", "above")
        # The mirrored arrangement stays in training, otherwise the order would not be what is tested.
        assert (b, rel, a) not in HELDOUT_RELATIONS


def test_palette_is_saturated_and_sixty_degrees_apart() -> None:
    expected = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}
    assert list(COLOURS) == list(expected)
    for name, rgb in COLOURS.items():
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
        assert round(h * 360) % 360 == expected[name]
        assert s >= 0.8 and v >= 0.8


def test_relation_rule_needs_a_clear_gap() -> None:
    def at(x: int, y: int) -> ShapeObject:
        return ShapeObject("circle", "red", x, y, 10)

    assert relation_holds(at(10, 30), "left of", at(26, 30), 64)
    assert not relation_holds(at(10, 30), "left of", at(25, 30), 64)  # 15 px < 0.25 * 64
    assert not relation_holds(at(10, 30), "left of", at(40, 50), 64)  # too far off the axis
    assert relation_holds(at(40, 50), "right of", at(10, 40), 64)
    assert relation_holds(at(30, 5), "above", at(30, 40), 64)
    assert relation_holds(at(30, 40), "below", at(30, 5), 64)
    assert not relation_holds(at(30, 5), "below", at(30, 40), 64)


def test_canonical_relation_swaps_operands() -> None:
    assert canonical_relation("a", "right of", "b") == ("b", "left of", "a")
    assert canonical_relation("a", "below", "b") == ("b", "above", "a")
    assert canonical_relation("a", "left of", "b") == ("a", "left of", "b")
    assert canonical_relation("a", "above", "b") == ("a", "above", "b")
    with pytest.raises(ValueError):
        canonical_relation("a", "near", "b")


def test_both_phrasings_of_an_arrangement_share_a_group() -> None:
    rng = random.Random(0)
    by_group: dict[str, set[str]] = {}
    for _ in range(3000):
        scene = sample_scene(rng, "train", kind_weights={"relation": 1.0})
        assert scene.relation is not None
        by_group.setdefault(scene.group, set()).add(scene.relation[1])
        subject, name, obj = scene.relation
        a, canon, b = canonical_relation(scene.objects[subject], name, scene.objects[obj])
        assert scene.group == f"{a.colour} {a.shape}|{canon}|{b.colour} {b.shape}"
        assert canon in scene.group
    # Some arrangement was phrased both ways ("A left of B" and "B right of A") and got one group.
    assert any({"left of", "right of"} <= names for names in by_group.values())
    assert any({"above", "below"} <= names for names in by_group.values())
    assert all(names <= {"left of", "right of"} or names <= {"above", "below"} for names in by_group.values())


def test_sampling_is_deterministic() -> None:
    first = [sample_scene(random.Random(7), "val", heldout=h) for h in (True, False)]
    again = [sample_scene(random.Random(7), "val", heldout=h) for h in (True, False)]
    other = [sample_scene(random.Random(8), "val", heldout=h) for h in (True, False)]
    assert first == again
    assert first != other


def test_write_split_is_deterministic(tmp_path: Path) -> None:
    patterns = [
        write_split(tmp_path / name, "val", 50, size=32, seed=seed, samples_per_shard=20)
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    ]
    assert patterns[0] == str((tmp_path / "a" / "val" / "val-{000000..000002}.tar").resolve())
    names = sorted(p.name for p in (tmp_path / "a" / "val").iterdir())
    assert names == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    blobs = {d: [(tmp_path / d / "val" / n).read_bytes() for n in names] for d in "abc"}
    assert blobs["a"] == blobs["b"]
    assert blobs["a"] != blobs["c"]
    captions_a = [s["txt"] for _, s in sorted(read_shards(tmp_path / "a" / "val").items())]
    captions_c = [s["txt"] for _, s in sorted(read_shards(tmp_path / "c" / "val").items())]
    assert captions_a != captions_c


def test_train_split_never_uses_heldout_combinations(train_samples: dict[str, dict[str, bytes]]) -> None:
    assert len(train_samples) == 2000
    kinds = Counter()
    for sample in train_samples.values():
        record = json.loads(sample["json"])
        assert record["split"] == "train"
        assert record["heldout"] is False
        assert not uses_heldout(record), record
        kinds[record["kind"]] += 1
    assert set(kinds) == set(KINDS)


def test_val_split_mixes_heldout_and_seen(val_samples: dict[str, dict[str, bytes]]) -> None:
    flags = []
    for sample in val_samples.values():
        record = json.loads(sample["json"])
        assert record["split"] == "val"
        assert record["heldout"] == uses_heldout(record), record
        flags.append(record["heldout"])
    assert 0.4 <= sum(flags) / len(flags) <= 0.6
    # Held-out relations (not only held-out pairs) make it into val.
    relation_only = [
        r
        for r in map(json.loads, (s["json"] for s in val_samples.values()))
        if r["heldout"]
        and r["kind"] == "relation"
        and not any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in r["objects"])
    ]
    assert relation_only


def test_train_and_val_use_different_seeds(train_samples: dict, val_samples: dict) -> None:
    train_captions = [s["txt"] for _, s in sorted(train_samples.items())[:50]]
    val_captions = [s["txt"] for _, s in sorted(val_samples.items())[:50]]
    assert train_captions != val_captions


def test_shards_hold_jpg_txt_json_per_key(val_samples: dict[str, dict[str, bytes]]) -> None:
    assert len(val_samples) == 400
    assert sorted(val_samples) == [f"val{i:08d}" for i in range(400)]
    for sample in val_samples.values():
        assert set(sample) == {"jpg", "txt", "json"}
        caption = sample["txt"].decode("utf-8")
        assert caption.strip() and "\n" not in caption
        record = json.loads(sample["json"].decode("utf-8"))
        assert record["caption"] == caption
        assert record["group"] == expected_group(record)
        assert (record["width"], record["height"]) == (64, 64)
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)


def test_captions_match_the_scene(val_samples: dict, train_samples: dict) -> None:
    records = [json.loads(s["json"]) for s in [*val_samples.values(), *train_samples.values()]]
    phrasings: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for r in records:
        caption, objects = r["caption"], r["objects"]
        words = caption.split()
        for o in objects:
            assert o["colour"] in words
        if r["kind"] == "single":
            assert len(objects) == 1 and objects[0]["shape"] in words
        elif r["kind"] == "count":
            shape = objects[0]["shape"]
            plural = "crosses" if shape == "cross" else shape + "s"
            assert plural in words, caption
            n = 2 if "pair" in words else next(NUMBERS[w] for w in words if w in NUMBERS)
            assert n == len(objects), caption
            assert "pair" not in words or len(objects) == 2
        else:
            rel = r["relation"]
            subject, obj = objects[rel["subject"]], objects[rel["object"]]
            assert rel["relation"] in RELATIONS
            assert (subject["colour"], subject["shape"]) != (obj["colour"], obj["shape"])
            # The subject is named before the object.
            first = caption.index(f"{subject['colour']} {subject['shape']}")
            assert caption.index(f"{obj['colour']} {obj['shape']}", first + 1) > first
        phrasings[r["kind"]].add(" ".join(w for w in words if w not in CONTENT_WORDS))
    # Several phrasings per kind, once the colour, shape and number words are taken out.
    assert all(len(p) >= 3 for p in phrasings.values()), phrasings


def test_objects_inside_disjoint_and_relations_unambiguous(val_samples: dict, train_samples: dict) -> None:
    for sample in [*val_samples.values(), *train_samples.values()]:
        record = json.loads(sample["json"])
        size = record["width"]
        objects, rel = scene_from_json(record)
        for o in objects:
            assert o.x - o.size / 2 >= 0 and o.x + o.size / 2 <= size
            assert o.y - o.size / 2 >= 0 and o.y + o.size / 2 <= size
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                reach = (a.size + b.size) / 2
                assert abs(a.x - b.x) > reach or abs(a.y - b.y) > reach, record
        if rel is None:
            continue
        a, name, b = objects[rel[0]], rel[1], objects[rel[2]]
        dx, dy = b.x - a.x, b.y - a.y
        along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[name]
        assert along >= 0.25 * size and abs(across) < along, record
        assert relation_holds(a, name, b, size)
        assert not relation_holds(b, name, a, size)


@pytest.mark.parametrize("colour", list(COLOURS))
def test_rendered_single_object_has_its_colour_and_area(colour: str) -> None:
    for i, shape in enumerate(SHAPES):
        side = 14 + 2 * i
        scene = Scene((ShapeObject(shape, colour, 30 + i, 33 - i, side),), "x", "g", "single", False)
        image = render(scene, 64)
        assert image.mode == "RGB" and image.size == (64, 64)
        assert dominant_colour(image) == colour
        pixels = np.asarray(image).astype(float)
        coverage = pixels.max(axis=-1).sum() / max(COLOURS[colour])
        assert coverage == pytest.approx(shape_area(shape, side), rel=0.12), shape
        # The object sits where the json says it does.
        ys, xs = np.nonzero(pixels.max(axis=-1) > 60)
        assert abs((xs.min() + xs.max() + 1) / 2 - scene.objects[0].x) <= 1
        assert abs((ys.min() + ys.max() + 1) / 2 - scene.objects[0].y) <= 1
        assert pixels[0, 0].max() == 0


def test_jpeg_colours_match_json(val_samples: dict[str, dict[str, bytes]]) -> None:
    checked = 0
    for sample in val_samples.values():
        record = json.loads(sample["json"])
        if record["kind"] == "relation":
            continue
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        assert dominant_colour(image) == record["objects"][0]["colour"]
        checked += 1
    assert checked > 100


def test_invalid_arguments_raise() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError):
        sample_scene(rng, "train", heldout=True)
    with pytest.raises(ValueError):
        sample_scene(rng, "test")
    with pytest.raises(ValueError):
        sample_scene(rng, "train", size=16)
    with pytest.raises(ValueError):
        sample_scene(rng, "train", kind_weights={"single": 0.0})
    with pytest.raises(ValueError):
        sample_scene(rng, "train", kind_weights={"pairs": 1.0})


def test_build_skips_identical_and_rebuilds_changed(tmp_path: Path) -> None:
    manifest = build(tmp_path, 30, 20, size=32, seed=0, samples_per_shard=10)
    assert manifest["counts"]["train"]["total"] == 30 and manifest["counts"]["val"]["total"] == 20
    assert sum(manifest["counts"]["train"]["kinds"].values()) == 30
    assert manifest["counts"]["val"]["heldout"] == 10
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    first_shard = tmp_path / "train" / "train-000000.tar"
    stamp = first_shard.stat().st_mtime_ns
    os.utime(first_shard, ns=(stamp - 10**9, stamp - 10**9))
    assert build(tmp_path, 30, 20, size=32, seed=0, samples_per_shard=10) == manifest
    assert first_shard.stat().st_mtime_ns == stamp - 10**9
    smaller = build(tmp_path, 12, 20, size=32, seed=0, samples_per_shard=10)
    assert smaller["shards"]["train"].endswith("train-{000000..000001}.tar")
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["train-000000.tar", "train-000001.tar"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "dalle_lightning.shapes", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_writes_shards_and_manifest(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    args = [
        "--out",
        str(out),
        "--num-samples",
        "40",
        "--num-val",
        "20",
        "--size",
        "32",
        "--samples-per-shard",
        "16",
        "--seed",
        "5",
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["image_size"] == 32
    assert manifest["counts"]["train"]["total"] == 40 and manifest["counts"]["val"]["total"] == 20
    assert manifest["shards"]["train"] == str((out / "train" / "train-{000000..000002}.tar").resolve())
    assert manifest["shards"]["val"] == str((out / "val" / "val-{000000..000001}.tar").resolve())
    assert sorted(map(tuple, manifest["heldout_pairs"])) == sorted(HELDOUT_PAIRS)
    assert sorted(map(tuple, manifest["heldout_relations"])) == sorted(HELDOUT_RELATIONS)
    assert len(read_shards(out / "train")) == 40
    again = run_cli(*args)
    assert again.returncode == 0 and "up to date" in again.stdout


@pytest.mark.parametrize("bad", [["--size", "16"], ["--num-samples", "0"], ["--size", "big"]])
def test_cli_rejects_bad_arguments_in_one_line(tmp_path: Path, bad: list[str]) -> None:
    args = {"--out": str(tmp_path / "x"), "--num-samples": "10", "--size": "64"}
    args.update(dict(zip(bad[::2], bad[1::2], strict=True)))
    result = run_cli(*[item for pair in args.items() for item in pair])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


def test_module_is_public_and_documented() -> None:
    assert shapes.__doc__ and "held-out" in shapes.__doc__
    for name in ("sample_scene", "render", "write_split", "build", "Scene", "ShapeObject"):
        assert getattr(shapes, name).__doc__
