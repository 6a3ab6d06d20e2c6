"""benchmarks/bench.py: a quick run of a cheap training benchmark and the loader writes the peer script's JSON form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
PEER_PRIOR_PARAMS = 24_918_544  # DALLE2-pytorch's DiffusionPrior in ../shared/bench/peer_dalle2.py
PEER_DECODER_PARAMS = 16.3e6  # its Unet (dim 64, mults 1, 2, 4), as bench.py's DECODER_MATCHED says
ROW_FIELDS = ("name", "batch", "samples_per_s", "params", "gflop_per_iter", "achieved_gflops", "ms_per_iter_median")


def _run(script: Path, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """A benchmark script as a user runs it, output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_quick_bench_writes_peer_json_form(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--quick", "--only", "prior_train,decoder32_train,loader", "--json", str(out)]
    done = _run(BENCH, args, tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "prior_train" in done.stdout and "samples/s" in done.stdout  # the table

    data = json.loads(out.read_text())
    assert data["meta"]["device"]["type"] in ("cpu", "cuda")
    rows = {row["name"]: row for row in data["results"]}
    for name in ("prior_train", "decoder32_train", "loader", "loader_stock_webdataset"):
        assert set(ROW_FIELDS) <= set(rows[name]), name
        assert rows[name]["samples_per_s"] > 0

    prior = rows["prior_train"]
    assert abs(prior["params"] / PEER_PRIOR_PARAMS - 1) <= 0.10  # matched size: within 10% of the peer's
    assert prior["gflop_per_iter"] > 0 and prior["achieved_gflops"] > 0
    assert prior["saved_for_backward_mib"] > 0 and prior["gradient_checkpointing"] is False
    assert prior["fraction_of_fp32_mm_ceiling"] > 0
    # The decoder matched to the peer's UNet (16.3 M parameters), reading no text as the peer's does.
    assert abs(rows["decoder32_train"]["params"] / PEER_DECODER_PARAMS - 1) <= 0.05

    # Our own matmul ceiling is measured in the same run.
    assert any(name.startswith("mm_") and "float32" in name and rows[name]["achieved_gflops"] > 0 for name in rows)
    assert rows["loader"]["ratio_to_stock"] > 0
    assert {r["name"] for r in data["ratios"]} >= {"loader"}


QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "sampler_quality.py"


def test_sampler_quality_reports_fd_per_configuration(tiny_exports, shapes_root, tmp_path):
    """benchmarks/sampler_quality.py on the random tiny exports: a reference and one few-step configuration from the
    same noise, 8 images, a second reference seed for the noise floor; every figure present and finite."""
    import math

    out = tmp_path / "quality.json"
    args = ["--decoder", str(tiny_exports["decoder"]), "--clip", str(tiny_exports["clip"])]
    args += ["--data-root", str(shapes_root), "--num-samples", "8", "--batch-size", "8", "--threads", "1"]
    args += ["--reference", "ddim:3", "--configs", "dpmsolver++:2", "--json", str(out)]
    done = _run(QUALITY, args, tmp_path, timeout=120)
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
        assert row["fd"] >= 0 and row["images_per_s"] > 0
    assert math.isfinite(rows["dpmsolver++_2"]["fd_to_reference"])
    floor = data["noise_floor"]
    assert math.isfinite(floor["fd_real_halves"]) and math.isfinite(floor["reference_seed_spread"])
    assert math.isfinite(data["real"]["clip_score"])


ORACLE = Path(__file__).resolve().parents[1] / "benchmarks" / "decoder_oracle.py"


def test_decoder_oracle_scores_real_reconstructed_and_text_images(tiny_exports, shapes_root, tmp_path):
    """benchmarks/decoder_oracle.py on the random tiny exports: the oracle reads the real val images right and the
    random decoder's noise wrong, per split and for single objects; the grid has one row per caption, three images."""
    from PIL import Image

    out, grid = tmp_path / "oracle.json", tmp_path / "grid.png"
    exports = tmp_path / "exports"
    exports.mkdir()
    for stage in ("clip", "prior", "decoder"):
        (exports / stage).symlink_to(tiny_exports[stage])
    args = ["--exports", str(exports), "--data-root", str(shapes_root), "--num-samples", "16", "--batch-size", "8"]
    args += ["--threads", "1", "--grid", str(grid), "--grid-rows", "4", "--json", str(out)]
    done = _run(ORACLE, args, tmp_path, timeout=120)
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


TRACE = Path(__file__).resolve().parents[1] / "benchmarks" / "decoder_shape_trace.py"


def test_decoder_shape_trace_scores_one_step_denoising_and_samples(tiny_exports, shapes_root, tmp_path):
    """benchmarks/decoder_shape_trace.py on the random tiny exports: the oracle reads the real single-object images
    right; every set is scored; the random decoder's one-step estimate keeps a clean image's colour at t=100 better
    than pure noise does at t=900; a missing export is one line."""
    exports = tmp_path / "exports"
    exports.mkdir()
    for stage in ("clip", "prior", "decoder"):
        (exports / stage).symlink_to(tiny_exports[stage])
    args = ["--exports", str(exports), "--data-root", str(shapes_root), "--num-samples", "32", "--threads", "1"]
    done = _run(TRACE, args, tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads(done.stdout)
    assert data["single_object_scenes"] > 0 and data["real"] == {"colour": 1.0, "shape": 1.0}
    assert {"x0@100", "x0@900", "generated", "text_only"} <= set(data)
    assert set(data["swapped_text"]) == {"follows_text", "follows_image"}
    assert data["x0@100"]["colour"] > data["x0@900"]["colour"]
    missing = _run(TRACE, ["--exports", str(tmp_path / "nothing")], tmp_path, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr[-2000:]
    assert "--exports/clip" in missing.stderr


PROBE = Path(__file__).resolve().parents[1] / "benchmarks" / "shape_probe.py"


def _load_script(path: Path):
    """A benchmark script as a module, for its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _colour_shape_table():
    """Colour index, shape index and held-out flag of every Shapes colour-shape pair."""
    import torch

    from dalle_lightning.data.shapes import COLOURS, HELDOUT_PAIRS, SHAPES

    pairs = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    colour = torch.tensor([list(COLOURS).index(c) for c, _ in pairs])
    shape = torch.tensor([SHAPES.index(s) for _, s in pairs])
    return colour, shape, torch.tensor([pair in HELDOUT_PAIRS for pair in pairs])


def test_shape_probe_tells_factorised_features_from_pair_detectors():
    """The probe's verdict: features that code colour and shape apart carry shape to held-out pairs; features
    with one unit per colour-shape pair (what the demo CLIP learns) do not."""
    import torch
    from torch.nn.functional import one_hot

    from dalle_lightning.data.shapes import COLOURS, SHAPES

    probe = _load_script(PROBE).probe
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

    from dalle_lightning.data.shapes import COLOURS, SHAPES

    module = _load_script(PROBE)
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

    module = _load_script(PROBE)
    train = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9]]), dim=1
    )
    labels = torch.tensor([3, 3, 1, 4, 4])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert module.nearest_neighbour_shapes(train, labels, queries, k=3).tolist() == [3, 4]
    assert module.nearest_neighbour_shapes(train, labels, queries, k=1).tolist() == [3, 4]


def test_shape_probe_reports_seen_and_heldout_accuracy(tiny_clip_export, shapes_root, tmp_path):
    """benchmarks/shape_probe.py on the random tiny CLIP and the small Shapes build: one JSON object with both
    probes' accuracies (in [0, 1]) over the val split's one-shape scenes, seen and held-out both present."""
    args = ["--clip-export", str(tiny_clip_export), "--data", str(shapes_root), "--num-train", "300"]
    done = _run(PROBE, args, tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    data = json.loads(done.stdout)
    assert data["train_scenes"] == 300
    for name in ("image", "text"):
        counts = data[name]["val_scenes"]
        assert counts["seen"] > 0 and counts["heldout"] > 0
        for scores in (data[name], data[name]["colour_removed"], data[name]["nearest_neighbours"]):
            assert 0.0 <= scores["seen"] <= 1.0 and 0.0 <= scores["heldout"] <= 1.0


ERRORS = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval_errors.py"


def test_retrieval_errors_reads_relations_in_canonical_order():
    module = _load_script(ERRORS)
    objects = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "star"}]
    right_of = {"objects": objects, "relation": {"subject": 0, "relation": "right of", "object": 1}}
    below = {"objects": objects, "relation": {"subject": 1, "relation": "below", "object": 0}}
    assert module.arrangement(right_of) == ("left of", ("blue", "star"), ("red", "circle"))
    assert module.arrangement(below) == ("above", ("red", "circle"), ("blue", "star"))


def test_retrieval_errors_reports_r1_per_kind_and_relation_errors(tiny_clip_export, shapes_root, tmp_path):
    done = _run(ERRORS, ["--clip-export", str(tiny_clip_export), "--data", str(shapes_root)], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(done.stdout)
    assert sum(data["queries"].values()) == 256  # every val caption of the small build queries once
    assert {key.rsplit("_", 1)[0] for key in data["r1"]} == {"single", "count", "relation"}
    assert all(0 <= value <= 1 for value in data["r1"].values())
    wrong = data["wrong_relation_top1"]
    assert wrong["count"] > 0 and all(0 <= wrong[k] <= 1 for k in ("other_axis", "colours_swapped", "other_shapes"))
    cosines = data["caption_cosine_to_variant"]
    assert set(cosines) == {
        "same_scene_said_inversely",
        "other_axis",
        "colours_swapped",
        "first_shape_changed",
        "first_colour_changed",
    }
    assert all(-1 <= value < 1 for value in cosines.values())  # every variant is another caption


def test_caption_variants_change_one_thing():
    variants = _load_script(ERRORS).caption_variants("above", ("red", "circle"), ("blue", "star"))
    assert variants["caption"] == "a red circle above a blue star"
    assert variants["same_scene_said_inversely"] == "a blue star below a red circle"
    assert variants["other_axis"] == "a red circle left of a blue star"
    assert variants["colours_swapped"] == "a blue circle above a red star"
    assert variants["first_shape_changed"] == "a red square above a blue star"
    assert variants["first_colour_changed"] == "a yellow circle above a blue star"
