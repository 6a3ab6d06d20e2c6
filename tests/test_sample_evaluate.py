"""sample.py and evaluate.py: the real entry points on tiny exports (random weights, few sampling steps)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import compose_config, fd_clip_in_range, run_script, shapes_overrides
from dalle_lightning.errors import UserError
from dalle_lightning.evaluate import evaluate
from dalle_lightning.sample import sample

FEW_STEPS = ["prior.steps=2", "prior.candidates=1", "decoder.steps=2", "upsampler.steps=2"]


def stack(exports) -> list[str]:
    """Overrides naming the test's exports, sampled with few steps."""
    return [f"exports.{stage}={path}" for stage, path in exports.items()] + FEW_STEPS


def test_sample_cli_writes_images_grid_and_wandb_run(tiny_exports, tmp_path):
    run = tmp_path / "run"
    result = run_script(
        "sample.py",
        [
            "prompts=[a red circle,two blue squares]",
            "num_images=2",
            f"hydra.run.dir={run}",
            "wandb=true",
            *stack(tiny_exports),
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((run / "samples.json").read_text())
    assert [r["caption"] for r in records] == ["a red circle"] * 2 + ["two blue squares"] * 2
    for record in records:
        assert Image.open(run / record["file"]).size == (64, 64)
    assert Image.open(run / "grid.png").width > 2 * 64
    assert list((run / "wandb").glob("offline-run-*")), "no offline wandb run"


def test_sample_inpaint_keeps_pixels_outside_the_box(tiny_exports, tmp_path):
    source = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    cfg = compose_config(
        ["mode=inpaint", f"images=[{source}]", "mask=[0.25,0.25,0.75,0.75]", *stack(tiny_exports)],
        tmp_path,
        "sample",
    )
    sample(cfg)
    before = np.asarray(Image.open(source)).astype(int)
    after = np.asarray(Image.open(tmp_path / "run" / "0000.png")).astype(int)
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    assert np.array_equal(before[outside], after[outside])
    assert np.abs(before[~outside] - after[~outside]).mean() > 5


def test_sample_cli_error_is_one_line(tiny_exports, tmp_path):
    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    result = run_script("sample.py", ["mode=paint", *stack(tiny_exports), run_dir], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: mode='paint' is unknown: use one of text, ")
    assert "Traceback" not in result.stderr
    # No exports where the config looks (nothing trained yet): said first, before the imports.
    result = run_script("sample.py", ["prompts=[a red circle]", run_dir], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: exports.clip='{tmp_path}/export/clip' does not exist"), last


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prompt_file=/nonexistent/prompts.txt"], "prompt_file='/nonexistent/prompts.txt' does not exist"),
        (["mode=textdiff", "images=[{x}]"], "mode=textdiff needs source="),
        (["mode=inpaint", "images=[{x}]"], "mode=inpaint needs mask="),
        (["mode=interpolate"], "mode=interpolate needs 2 ends"),
        (["exports.prior=/nonexistent"], "exports.prior='/nonexistent' is not a prior export"),
    ],
)
def test_sample_errors_name_the_fix(tiny_exports, tmp_path, overrides, message):
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    overrides = [o.replace("{x}", str(tmp_path / "x.png")) for o in overrides]
    keys = {o.split("=")[0] for o in overrides}
    exports = [o for o in stack(tiny_exports) if o.split("=")[0] not in keys]
    cfg = compose_config(["prompts=[a red circle]", *exports, *overrides], tmp_path, "sample")
    with pytest.raises(UserError, match=re.escape(message)):
        sample(cfg)


def test_evaluate_on_shapes_val_reports_every_metric(tiny_exports, shapes_root, tmp_path):
    cfg = compose_config(
        ["num_samples=12", "batch_size=6", *shapes_overrides(shapes_root), *stack(tiny_exports)],
        tmp_path,
        "evaluate",
    )
    report = evaluate(cfg)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["num_samples"] == 12 and saved["fd_name"] == "fd_clip" and fd_clip_in_range(saved["fd"])
    assert 0 <= saved["clip_score_generated"] <= 100 and 0 <= saved["clip_score_real"] <= 100
    compositional = saved["compositional"]
    assert compositional["unparsed"] == 0
    assert compositional["seen"]["n"] + compositional["heldout"]["n"] == 12
    for category in ("colour", "shape", "count", "all"):
        assert 0 <= compositional["seen"][category] <= 1
    records = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert len(records) == 12 and all("all" in r and "clip_score_real" in r for r in records)
    assert report["grid"].endswith("grid.png")


def test_evaluate_prompt_file_without_real_images(tiny_exports, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na photo of a dog\n\na red circle\n")
    cfg = compose_config([f"prompt_file={prompts}", "wandb=true", *stack(tiny_exports)], tmp_path, "evaluate")
    report = evaluate(cfg)
    assert report["num_samples"] == 2
    assert "fd" not in report and "clip_score_real" not in report  # no real images to compare with
    assert report["compositional"]["unparsed"] == 1  # the dog is not a Shapes prompt
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_evaluate_scores_with_a_reference_clip(tiny_exports, shapes_root, tmp_path):
    """`scorer_clip` judges the same images with another CLIP (here a pretrained-style folder with other
    weights): the CLIP scores change, what the oracle reads does not; a folder with no CLIP is one error."""
    import torch
    from transformers import CLIPModel

    from dalle_lightning.models.tokenizer import load_tokenizer

    own = CLIPModel.from_pretrained(str(tiny_exports["clip"]))
    torch.manual_seed(1)
    reference = tmp_path / "reference_clip"
    CLIPModel(own.config).save_pretrained(str(reference))
    load_tokenizer(tiny_exports["clip"]).save_pretrained(str(reference))
    args = ["num_samples=6", "batch_size=6", *shapes_overrides(shapes_root), *stack(tiny_exports)]
    by_own = evaluate(compose_config(args, tmp_path, "evaluate"))
    cfg = compose_config([*args, f"scorer_clip={reference}"], tmp_path, "evaluate")
    by_reference = evaluate(cfg)
    assert by_reference["scorer_clip"] == str(reference) and by_own["scorer_clip"] == str(tiny_exports["clip"])
    assert by_reference["clip_score_real"] != pytest.approx(by_own["clip_score_real"])
    assert by_reference["compositional"] == by_own["compositional"]
    cfg = compose_config([*args, f"scorer_clip={tmp_path}"], tmp_path, "evaluate")
    with pytest.raises(UserError, match="is not a CLIP folder"):
        evaluate(cfg)
