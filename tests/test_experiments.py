"""The research probes of experiments/, run as a user runs them (`python -m experiments.<name>`) on the tiny random
exports and the small Shapes build, and the probe's functions on features built to have a known answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, fd_clip_in_range
from experiments import shape_probe

pytestmark = pytest.mark.experiments


def _run(name: str, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python -m experiments.<name> ...` from the repository root, output captured."""
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{name}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sampler_quality_reports_fd_per_configuration(tiny_exports, shapes_root, tmp_path):
    """experiments.sampler_quality on the random tiny exports: a reference and one few-step configuration from the
    same noise, 8 images, a second reference seed for the noise floor; every figure present and finite."""
    import math

    out = tmp_path / "quality.json"
    args = ["--decoder", str(tiny_exports["decoder"]), "--clip", str(tiny_exports["clip"])]
    args += ["--data-root", str(shapes_root), "--num-samples", "8", "--batch-size", "8", "--threads", "1"]
    args += ["--reference", "ddim:3", "--configs", "dpmsolver++:2", "--json", str(out)]
    done = _run("sampler_quality", args, tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads(done.stdout)
    assert data == json.loads(out.read_text())
    assert data["meta"]["num_samples"] == 8 and data["meta"]["fd_name"] == "fd_clip"
    rows = {row["name"]: row for row in data["results"]}
    assert list(rows) == ["reference", "dpmsolver++_2", "reference_seed2"]
    assert (rows["dpmsolver++_2"]["sampler"], rows["dpmsolver++_2"]["steps"]) == ("dpmsolver++", 2)
    assert rows["reference"]["fd_ratio"] == 1.0
    for row in rows.values():
        for key in ("fd", "fd_ratio", "clip_score", "images_per_s", "seconds", "speedup"):
            assert math.isfinite(row[key]), (row["name"], key)
        assert fd_clip_in_range(row["fd"]) and row["images_per_s"] > 0
    assert math.isfinite(rows["dpmsolver++_2"]["fd_to_reference"])
    floor = data["noise_floor"]
    assert math.isfinite(floor["fd_real_halves"]) and math.isfinite(floor["reference_seed_spread"])
    assert math.isfinite(data["real"]["clip_score"])


def test_decoder_oracle_scores_real_reconstructed_and_text_images(tiny_exports, shapes_root, tmp_path):
    """experiments.decoder_oracle on the random tiny exports: the oracle reads the real val images right and the
    random decoder's noise wrong, per split and for single objects; the grid has one row per caption, three images."""
    from PIL import Image

    out, grid = tmp_path / "oracle.json", tmp_path / "grid.png"
    exports = tmp_path / "exports"
    exports.mkdir()
    for stage in ("clip", "prior", "decoder"):
        (exports / stage).symlink_to(tiny_exports[stage])
    args = ["--exports", str(exports), "--data-root", str(shapes_root), "--num-samples", "16", "--batch-size", "8"]
    args += ["--threads", "1", "--grid", str(grid), "--grid-rows", "4", "--json", str(out)]
    done = _run("decoder_oracle", args, tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads(done.stdout)
    assert data == json.loads(out.read_text())
    assert data["image_size"] == 32 and data["num_samples"] == 16
    real, reconstruction = data["real"], data["reconstruction"]
    assert real["seen"]["n"] + real["heldout"]["n"] == 16
    for split in ("seen", "heldout"):
        assert real[split]["colour"] == 1.0 and real[split]["count"] == 1.0
    assert set(data["from_text"]) == set(real) and "single_heldout" in reconstruction
    assert reconstruction["seen"]["count"] < 0.5  # noise is not one or two clean objects
    assert Image.open(grid).size == (200 + 3 * 68, 4 * 68)


def test_editing_compares_replacement_with_the_editing_decoder(tiny_exports, shapes_root, tmp_path):
    """experiments.editing on the random tiny exports and a random editing decoder: every set scored, the hidden
    objects found back in the real images (the oracle's own accuracy on the criterion), the known region's
    neighbour differences those of the real images (kept pixels), and a one-line error for a plain decoder."""
    from PIL import Image

    from conftest import write_stage_export

    out, grid = tmp_path / "editing.json", tmp_path / "grid.png"
    exports = tmp_path / "exports"
    exports.mkdir()
    for stage in ("clip", "prior", "decoder"):
        (exports / stage).symlink_to(tiny_exports[stage])
    editing = write_stage_export("decoder", tiny_exports["clip"], tmp_path, ["model.decoder.inpainting=true"])
    args = ["--exports", str(exports), "--editing", str(editing), "--data-root", str(shapes_root)]
    args += ["--num-scenes", "12", "--batch-size", "6", "--threads", "1", "--grid", str(grid), "--grid-rows", "3"]
    done = _run("editing", [*args, "--json", str(out)], tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads(done.stdout)
    assert data == json.loads(out.read_text())
    assert data["num_scenes"] == 12 and data["image_size"] == 32 and 0 < data["hole_fraction"] < 0.5
    # Colour is read right at 32 px; a few small shapes are not, once downsampled (the oracle's ceiling there).
    assert data["real"]["hidden_colour"] == 1.0 and data["real"]["hidden_colour_shape"] >= 0.75
    for name in ("replacement", "editing", "editing_replacement"):
        assert 0 <= data[name]["hidden_colour_shape"] <= data[name]["hidden_colour"] <= 1
        assert data[name]["known"] == data["real"]["known"]  # the kept pixels are the real ones
        assert data[name]["seam"] > 0
    assert Image.open(grid).size == (200 + 5 * 68, 3 * 68)
    not_editing = ["--exports", str(exports), "--editing", str(exports / "decoder"), "--data-root", str(shapes_root)]
    done = _run("editing", not_editing, tmp_path, timeout=120)
    assert done.returncode == 2 and "is not an editing decoder" in done.stderr.strip().splitlines()[-1]


def _colour_shape_table():
    """Colour index, shape index and held-out flag of every Shapes colour-shape pair."""
    import torch

    from dalle_lightning.shapes.dataset import COLOURS, HELDOUT_PAIRS, SHAPES

    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    colour = torch.tensor([list(COLOURS).index(c) for c, _ in pairs])
    shape = torch.tensor([SHAPES.index(s) for _, s in pairs])
    return colour, shape, torch.tensor([pair in HELDOUT_PAIRS for pair in pairs])


def test_shape_probe_tells_factorised_features_from_pair_detectors():
    """The probe's verdict: features that code colour and shape apart carry shape to held-out pairs; features
    with one unit per colour-shape pair (what the demo CLIP learns) do not."""
    import torch
    from torch.nn.functional import one_hot

    from dalle_lightning.shapes.dataset import COLOURS, SHAPES

    probe = shape_probe.probe
    colour, shape, heldout = _colour_shape_table()
    factorised = torch.cat([one_hot(colour, len(COLOURS)), one_hot(shape, len(SHAPES))], 1).float()
    pair_units = torch.eye(len(shape))  # one unit per colour-shape pair
    generator = torch.Generator().manual_seed(0)
    accuracy = {}
    for name, features in (("factorised", factorised), ("pairs", pair_units)):
        train = features[~heldout].repeat(20, 1)
        train = train + 0.1 * torch.randn(train.shape, generator=generator)
        predicted = probe(train, shape[~heldout].repeat(20), features[heldout])
        accuracy[name] = (predicted == shape[heldout]).float().mean().item()
    assert accuracy["factorised"] == 1.0
    assert accuracy["pairs"] <= 0.5, accuracy  # 6 held-out pairs whose units the probe never saw active


def test_shape_probe_without_colour_sees_through_the_colour_veto():
    """Features that carry shape apart from colour, plus a strong colour code: the training split never pairs a
    colour with its held-out shape, so the plain probe learns colour as evidence against that shape and misses
    held-out pairs; with the colour-mean directions projected out it gets them right."""
    import torch
    from torch.nn.functional import one_hot

    from dalle_lightning.shapes.dataset import COLOURS, SHAPES

    module = shape_probe
    colour, shape, heldout = _colour_shape_table()
    generator = torch.Generator().manual_seed(0)
    features = torch.cat([5 * one_hot(colour, len(COLOURS)), 0.3 * one_hot(shape, len(SHAPES))], 1).float()
    train = features[~heldout].repeat(20, 1)
    train = train + 0.3 * torch.randn(train.shape, generator=generator)
    labels, colours = shape[~heldout].repeat(20), colour[~heldout].repeat(20)

    def heldout_accuracy(train_x, test_x):
        return (module.probe(train_x, labels, test_x) == shape[heldout]).float().mean().item()

    plain = heldout_accuracy(train, features[heldout])
    without_colour = heldout_accuracy(*module.remove_colour(train, colours, features[heldout]))
    assert without_colour >= 0.8 and without_colour > plain + 0.3, (plain, without_colour)


def test_nearest_neighbour_shapes_vote_among_the_most_similar_training_embeddings():
    """Each query takes the majority shape of its k most cosine-similar training embeddings, whatever the
    labels of the rest (a pair-detector embedding, read linearly, would need one weight per pair)."""
    import torch

    module = shape_probe
    train = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9]]), dim=1
    )
    labels = torch.tensor([3, 3, 1, 4, 4])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert module.nearest_neighbour_shapes(train, labels, queries, k=3).tolist() == [3, 4]
    assert module.nearest_neighbour_shapes(train, labels, queries, k=1).tolist() == [3, 4]


def test_shape_probe_reports_seen_and_heldout_accuracy(tiny_clip_export, shapes_root, tmp_path):
    """experiments.shape_probe on the random tiny CLIP and the small Shapes build: one JSON object with both
    probes' accuracies (in [0, 1]) over the val split's one-shape scenes, seen and held-out both present."""
    args = ["--clip-export", str(tiny_clip_export), "--data", str(shapes_root), "--num-train", "300"]
    done = _run("shape_probe", args, tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads(done.stdout)
    assert data["train_scenes"] == 300
    for name in ("image", "text"):
        counts = data[name]["val_scenes"]
        assert counts["seen"] > 0 and counts["heldout"] > 0
        for scores in (data[name], data[name]["colour_removed"], data[name]["nearest_neighbours"]):
            assert 0.0 <= scores["seen"] <= 1.0 and 0.0 <= scores["heldout"] <= 1.0
