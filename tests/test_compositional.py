"""Tests for the compositional-accuracy oracle: caption parsing, reading objects off images, per-category
verdicts, and the CompositionalAccuracy metric. The acceptance bar: >= 99% on rendered ground truth."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_lightning.shapes.dataset import KINDS, Scene, ShapeObject, render, sample_scene
from dalle_lightning.shapes.oracle import (
    CATEGORIES,
    CompositionalAccuracy,
    PromptSpec,
    parse_prompt,
    read_objects,
    score,
)

SIZE = 64


def draw(*objects: ShapeObject, size: int = SIZE) -> Image.Image:
    """A rendered image of exactly these objects (captions do not matter to rendering)."""
    return render(Scene(tuple(objects), "", "", "single", False), size)


def jpeg_round_trip(image: Image.Image) -> Image.Image:
    """As the shards store images: JPEG at quality 95 with 4:4:4 chroma."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """3 x H x W in [-1, 1], the range the diffusion models output."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


def val_scenes(n: int, size: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(f"compositional/{seed}")
    return [sample_scene(rng, "val", size, heldout=i % 2 == 1) for i in range(n)]


# --------------------------------------------------------------------------------------------------------------
# parse_prompt
# --------------------------------------------------------------------------------------------------------------


def test_parse_prompt_reads_every_generated_caption():
    rng = random.Random(0)
    for split, heldout in (("train", False), ("val", False), ("val", True), ("val", None)):
        for _ in range(1000):
            scene = sample_scene(rng, split, SIZE, heldout=heldout)
            spec = parse_prompt(scene.caption)
            assert (spec.group, spec.heldout, spec.kind) == (scene.group, scene.heldout, scene.kind), scene.caption


@pytest.mark.parametrize(
    ("caption", "group", "heldout"),
    [
        ("a pair of green crosses", "2 green cross", False),
        ("Exactly four  Cyan Stars.", "4 cyan star", True),
        ("three crosses that are blue", "3 blue cross", True),
        ("an image of a triangle that is green", "1 green triangle", True),
        ("a single magenta square on a black background", "1 magenta square", False),
        ("a blue square beneath a yellow star", "yellow star|above|blue square", False),
        ("an image of a red square is on the right of a cyan triangle", "cyan triangle|left of|red square", False),
        # The arrangement (circle left of triangle) is held out although both pairs are seen.
        ("a yellow circle to the left of a red triangle", "yellow circle|left of|red triangle", True),
    ],
)
def test_parse_prompt_phrasings(caption, group, heldout):
    spec = parse_prompt(caption)
    assert (spec.group, spec.heldout) == (group, heldout)


def test_parse_prompt_spec_fields():
    relation = parse_prompt("a blue square below a yellow star")
    assert relation == PromptSpec(
        kind="relation",
        objects=(("yellow", "star"), ("blue", "square")),
        count=2,
        relation="above",
        heldout=False,
        group="yellow star|above|blue square",
    )
    count = parse_prompt("three red squares")
    assert (count.kind, count.objects, count.count, count.relation) == ("count", (("red", "square"),), 3, None)


@pytest.mark.parametrize(
    "caption",
    ["", "a purple circle", "two red circle", "a red circle next to a blue square", "a red circle\nand a dog"],
)
def test_parse_prompt_rejects_other_text_in_one_line(caption):
    with pytest.raises(ValueError, match="not a Shapes caption") as error:
        parse_prompt(caption)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------------------
# read_objects
# --------------------------------------------------------------------------------------------------------------


def test_read_objects_on_hand_built_scenes():
    scenes = [
        (ShapeObject("circle", "red", 20, 20, 16), ShapeObject("star", "cyan", 44, 44, 18)),
        (
            ShapeObject("square", "yellow", 12, 12, 10),
            ShapeObject("triangle", "green", 50, 14, 14),
            ShapeObject("cross", "blue", 14, 50, 12),
            ShapeObject("star", "magenta", 48, 48, 10),
        ),
        (ShapeObject("cross", "red", 32, 32, 24),),
    ]
    for objects in scenes:
        found = read_objects(draw(*objects))
        assert sorted((o.colour, o.shape) for o in found) == sorted((o.colour, o.shape) for o in objects)
        for truth in objects:
            match = next(o for o in found if (o.colour, o.shape) == (truth.colour, truth.shape))
            assert abs(match.x - truth.x) <= 1 and abs(match.y - truth.y) <= 1
            assert truth.size - 2 <= match.size <= truth.size
            assert match.match > 0.99


def test_read_objects_same_for_tensor_array_and_pil():
    for scene in val_scenes(20, SIZE, seed=1):
        image = jpeg_round_trip(render(scene, SIZE))
        expected = read_objects(image)
        assert read_objects(to_tensor(image)) == expected
        assert read_objects(np.asarray(image)) == expected


def test_black_image_shows_nothing_and_noise_scores_low():
    assert read_objects(Image.new("RGB", (SIZE, SIZE))) == []
    assert read_objects(-torch.ones(3, SIZE, SIZE)) == []
    noise = np.random.default_rng(0).integers(0, 256, (40, SIZE, SIZE, 3), dtype=np.uint8)
    scenes = val_scenes(40, SIZE, seed=2)
    verdicts = [score(parse_prompt(s.caption), read_objects(n), SIZE) for s, n in zip(scenes, noise)]
    assert sum(v["all"] for v in verdicts) <= 2


def test_read_objects_rejects_other_inputs():
    with pytest.raises(ValueError, match="uint8"):
        read_objects(np.zeros((SIZE, SIZE, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="3 x H x W"):
        read_objects(torch.zeros(1, 3, SIZE, SIZE))


# --------------------------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------------------------

RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT = ShapeObject("circle", "red", 16, 30, 16), ShapeObject("square", "blue", 48, 34, 16)


@pytest.mark.parametrize(
    ("caption", "objects", "failed"),
    [
        ("a red circle", (ShapeObject("circle", "red", 30, 30, 20),), set()),
        ("a red circle", (ShapeObject("circle", "green", 30, 30, 20),), {"colour"}),
        ("a red circle", (ShapeObject("square", "red", 30, 30, 20),), {"shape"}),
        ("a red circle", (), {"colour", "shape", "count"}),
        (
            "two red circles",
            (ShapeObject("circle", "red", 16, 16, 12), ShapeObject("circle", "red", 44, 44, 12)),
            set(),
        ),
        (
            "two red circles",
            tuple(ShapeObject("circle", "red", x, 20, 12) for x in (10, 32, 54)),
            {"count"},
        ),
        ("a red circle to the left of a blue square", (RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT), set()),
        ("a blue square on the right of a red circle", (RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT), set()),
        ("a blue square to the left of a red circle", (RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT), {"relation"}),
        ("a red circle above a blue square", (RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT), {"relation"}),
        # Swapped attributes: every colour and shape is there, but on the wrong object.
        (
            "a red circle to the left of a blue square",
            (ShapeObject("circle", "blue", 16, 30, 16), ShapeObject("square", "red", 48, 34, 16)),
            {"relation"},
        ),
    ],
)
def test_wrong_images_fail_exactly_the_expected_categories(caption, objects, failed):
    spec = parse_prompt(caption)
    verdicts = score(spec, read_objects(draw(*objects)), SIZE)
    applicable = {c for c in CATEGORIES if verdicts[c] is not None} - {"all"}
    assert {c for c in applicable if not verdicts[c]} == failed
    assert verdicts["all"] is (not failed)
    assert (verdicts["relation"] is None) is (spec.relation is None)


def test_relation_is_tolerant_of_modest_offsets():
    # 12 px apart along the axis, 8 across: short of the generator's margins, still "left of".
    objects = (ShapeObject("star", "cyan", 22, 28, 10), ShapeObject("circle", "yellow", 34, 36, 10))
    assert score(parse_prompt("a cyan star to the left of a yellow circle"), read_objects(draw(*objects)), SIZE)[
        "relation"
    ]
    assert not score(parse_prompt("a cyan star above a yellow circle"), read_objects(draw(*objects)), SIZE)["relation"]


# --------------------------------------------------------------------------------------------------------------
# Ground truth: the acceptance criterion
# --------------------------------------------------------------------------------------------------------------


def assert_all_at_least(result: dict, bar: float) -> None:
    sections = [result["seen"], result["heldout"]] + [
        result["by_kind"][kind][split] for kind in KINDS for split in ("seen", "heldout")
    ]
    for section in sections:
        assert section["n"] > 0
        for category in CATEGORIES:
            if section[category] is not None:
                assert section[category] >= bar, result
    assert result["seen"]["relation"] is not None and result["heldout"]["relation"] is not None
    assert result["single_heldout_colour_shape"] >= bar
    assert result["unparsed"] == 0


@pytest.mark.parametrize("storage", ["png", "jpeg"])
def test_oracle_scores_ground_truth_at_64px(storage):
    scenes = val_scenes(600, SIZE)
    images = [render(scene, SIZE) for scene in scenes]
    if storage == "jpeg":
        images = [jpeg_round_trip(image) for image in images]
    metric = CompositionalAccuracy()
    for start in range(0, len(scenes), 100):
        metric.update(images[start : start + 100], [scene.caption for scene in scenes[start : start + 100]])
    result = metric.compute()
    assert result["seen"]["n"] + result["heldout"]["n"] == 600
    assert_all_at_least(result, 0.99)


def test_oracle_scores_ground_truth_at_32px():
    scenes = val_scenes(200, 32, seed=3)
    metric = CompositionalAccuracy()
    metric.update([jpeg_round_trip(render(scene, 32)) for scene in scenes], [scene.caption for scene in scenes])
    assert_all_at_least(metric.compute(), 0.99)


# --------------------------------------------------------------------------------------------------------------
# CompositionalAccuracy
# --------------------------------------------------------------------------------------------------------------

# (prompt, what the image shows): seen pairs are e.g. red square, blue circle; red circle and yellow square are
# held out.
CASES = [
    ("a red square", (ShapeObject("square", "red", 30, 30, 20),)),
    ("a blue circle", (ShapeObject("circle", "blue", 30, 30, 20),)),
    ("a red circle", (ShapeObject("circle", "green", 30, 30, 20),)),  # held out, wrong colour
    ("a square that is yellow", (ShapeObject("square", "yellow", 30, 30, 20),)),  # held out
    ("three red squares", (ShapeObject("square", "red", 16, 16, 12), ShapeObject("square", "red", 44, 44, 12))),
    (
        "a red square above a blue circle",
        (ShapeObject("square", "red", 30, 14, 14), ShapeObject("circle", "blue", 32, 48, 14)),
    ),
    ("a purple blob", (ShapeObject("circle", "red", 30, 30, 20),)),  # not a Shapes caption
]


def expected_section(n, colour=None, shape=None, count=None, relation=None, all=None):
    return {"colour": colour, "shape": shape, "count": count, "relation": relation, "all": all, "n": n}


def test_metric_nested_results():
    metric = CompositionalAccuracy()
    images = torch.stack([to_tensor(draw(*objects)) for _, objects in CASES])
    metric.update(images[:4], [prompt for prompt, _ in CASES[:4]])
    metric.update(images[4:], [prompt for prompt, _ in CASES[4:]])
    result = metric.compute()
    assert result == {
        "seen": expected_section(4, 1.0, 1.0, 0.75, 1.0, 0.75),
        "heldout": expected_section(2, 0.5, 1.0, 1.0, None, 0.5),
        "by_kind": {
            "single": {
                "seen": expected_section(2, 1.0, 1.0, 1.0, None, 1.0),
                "heldout": expected_section(2, 0.5, 1.0, 1.0, None, 0.5),
            },
            "count": {"seen": expected_section(1, 1.0, 1.0, 0.0, None, 0.0), "heldout": expected_section(0)},
            "relation": {"seen": expected_section(1, 1.0, 1.0, 1.0, 1.0, 1.0), "heldout": expected_section(0)},
        },
        "single_heldout_colour_shape": 0.5,
        "unparsed": 1,
    }
    json.dumps(result)


def test_metric_states_sum_across_ranks():
    # Two metrics merged as ranks are synced (sum of states) equal one that saw every image.
    images = [draw(*objects) for _, objects in CASES]
    prompts = [prompt for prompt, _ in CASES]
    whole, first, second = CompositionalAccuracy(), CompositionalAccuracy(), CompositionalAccuracy()
    whole.update(images, prompts)
    first.update(images[:3], prompts[:3])
    second.update(images[3:], prompts[3:])
    first.merge_state(second)
    assert first.compute() == whole.compute()
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        whole.update(images[:2], prompts[:1])
