"""The real `python train.py` on Shapes shards: wandb offline, checkpoints, export, resume and multirun. (Exact
resume: test_resume.py; several processes and nodes: test_ranks.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST_CLIP, csv_losses, fd_clip_in_range, lines_starting, run_train, shapes_overrides

pytestmark = pytest.mark.slow


def _common(tmp_path: Path, shapes_root: Path) -> list[str]:
    return [
        *FAST_CLIP,
        *shapes_overrides(shapes_root),
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.export_dir={tmp_path}/export",
    ]


def test_clip_trains_logs_offline_to_wandb_exports_and_resumes(tmp_path, shapes_root):
    result = run_train([*_common(tmp_path, shapes_root), "logger=wandb", "run_name=first"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "outputs" / "clip" / "runs"
    run = runs / "first"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["val/t2i_r1"] <= 1.0 and metrics["train/loss"] > 0
    assert "data/skipped/corrupt_image" in metrics
    assert list(run.glob("wandb/offline-run-*/files/media/*")) or list(run.glob("wandb/offline-run-*/run-*.wandb"))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 6
    export = tmp_path / "export" / "clip"
    manifest = json.loads((export / "dalle_lightning.json").read_text())
    assert manifest["stage"] == "clip" and manifest["config"]["model"]["clip"]["image_size"] == 32
    assert (export / "model.safetensors").stat().st_size > 100_000

    # ckpt_path=last goes on from the newest run's last.ckpt (exact resume: tests/test_resume.py), in a run folder
    # of its own that gets the first run's BPE tokenizer, not a new one trained on the captions.
    second = run_train(
        [*_common(tmp_path, shapes_root), "logger=csv", "run_name=b", "ckpt_path=last", "trainer.max_steps=10"],
        tmp_path,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    after = csv_losses(runs / "b")
    assert len(after) == 4 and min(after) > 5  # four more steps, not a restart
    checkpoint = torch.load(runs / "b" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 10
    assert (runs / "b" / "checkpoints" / "tokenizer" / "tokenizer.json").read_text() == (
        run / "checkpoints" / "tokenizer" / "tokenizer.json"
    ).read_text()


def test_export_dir_over_the_runs_folder_is_refused_before_training(tmp_path, shapes_root):
    """paths.export_dir = paths.log_dir would make the export replace `<log_dir>/clip`, the runs' folder."""
    args = [*_common(tmp_path, shapes_root), f"paths.export_dir={tmp_path}/outputs", "logger=csv", "run_name=a"]
    result = run_train(args, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = lines_starting(result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"would replace '{tmp_path}/outputs/clip', which is not an export" in errors[0]
    run = tmp_path / "outputs" / "clip" / "runs" / "a"
    assert (run / ".hydra" / "config.yaml").is_file() and not (run / "checkpoints" / "last.ckpt").exists()


def test_data_that_cannot_feed_the_stage_stops_the_run_in_one_line(tmp_path, shapes_root):
    """Shapes are 64 px: with data.min_image_size=128 every sample is too small, in the loader's worker."""
    args = [*_common(tmp_path, shapes_root), "data.min_image_size=128", "data.num_workers=1", "logger=csv"]
    result = run_train(args, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = lines_starting(result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "samples were all skipped (too_small: 5000)" in errors[0] and "smaller than 128 px" in errors[0]


def test_an_export_replaces_an_export_but_not_other_files(tmp_path):
    from dalle_lightning.errors import UserError
    from dalle_lightning.export import write_export

    def save(folder: Path) -> None:
        (folder / "weights.safetensors").write_bytes(b"new")

    target = tmp_path / "export" / "prior"
    write_export(target, "prior", save)
    write_export(target, "prior", save)  # a retrained stage's export replaces its earlier export
    assert (target / "weights.safetensors").read_bytes() == b"new"
    other_run = target.with_name(".prior.12345.0badcafe.tmp")  # another run's export in progress
    other_run.mkdir()

    def fail(folder: Path) -> None:
        (folder / "weights.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_export(target, "prior", fail)
    assert (target / "weights.safetensors").read_bytes() == b"new"  # the earlier export is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == [".prior.12345.0badcafe.tmp", "prior"]
    runs = tmp_path / "outputs" / "prior"
    (runs / "runs" / "a").mkdir(parents=True)
    (runs / "runs" / "a" / "last.ckpt").write_bytes(b"checkpoint")
    with pytest.raises(UserError, match="not an export"):
        write_export(runs, "prior", save)
    assert (runs / "runs" / "a" / "last.ckpt").read_bytes() == b"checkpoint"


def test_multirun_over_two_values(tmp_path, shapes_root):
    result = run_train(
        [
            "-m",
            *_common(tmp_path, shapes_root),
            "logger=none",
            "run_name=sweep",
            "optim.lr=1e-3,3e-3",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "clip" / "multiruns" / "sweep"
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    assert all("val/t2i_r1" in m for m in lrs)
    overrides = [(j / ".hydra" / "overrides.yaml").read_text() for j in jobs]
    assert "optim.lr=0.001" in overrides[0] and "optim.lr=0.003" in overrides[1]
    # Each job exports into its own folder: into the shared export folder, the second would replace the first's.
    assert all((j / "export" / "clip" / "dalle_lightning.json").is_file() for j in jobs)
    assert not (tmp_path / "export" / "clip").exists()


def test_embed_then_train_prior_decoder_and_upsampler(tmp_path, shapes_root, tiny_clip_export):
    """embed.py over Shapes shards, then train.py for the prior and the decoder on the result and for the
    upsampler on Shapes: each logs its metrics and writes its export; a CLIP of another width is refused."""
    import subprocess
    import sys

    from conftest import ROOT, compose_config

    manifest = json.loads((shapes_root / "manifest.json").read_text())
    env_run = dict(cwd=tmp_path, capture_output=True, text=True, timeout=300)
    for split in ("train", "val"):
        embed = subprocess.run(
            [
                sys.executable,
                str(ROOT / "embed.py"),
                f"clip={tiny_clip_export}",
                f"shards='{manifest['shards'][split]}'",
                f"output_dir={tmp_path}/emb/{split}",
                "num_workers=0",
            ],
            **env_run,
        )
        assert embed.returncode == 0, embed.stderr[-3000:]
    prior_args = [
        "stage=prior",
        f"stage.clip={tiny_clip_export}",
        "trainer=cpu",
        "trainer.max_steps=8",
        "trainer.max_epochs=-1",
        "data.batch_size=64",
        "data.samples_per_epoch=256",
        "data.val_samples=128",
        "data.num_workers=0",
        "model.prior.sample_steps=4",
        "scheduler.warmup_steps=2",
        f"data.train_shards='{tmp_path}/emb/train/*.tar'",
        f"data.val_shards='{tmp_path}/emb/val/*.tar'",
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.export_dir={tmp_path}/export",
        "logger=csv",
        "run_name=prior",
    ]
    result = run_train(prior_args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs" / "prior" / "runs" / "prior" / "metrics.json").read_text())
    assert -1 <= metrics["val/cos_sampled"] <= 1 and "val/cos_text_baseline_heldout" in metrics
    assert (tmp_path / "export" / "prior" / "prior" / "diffusion_pytorch_model.safetensors").exists()

    small_run = [
        f"stage.clip={tiny_clip_export}",
        "trainer=cpu",
        "trainer.max_steps=4",
        "trainer.max_epochs=-1",
        "data.batch_size=16",
        "data.samples_per_epoch=32",
        "data.val_samples=16",
        "data.num_workers=0",
        "stage.metrics.num_samples=8",
        "scheduler.warmup_steps=2",
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.export_dir={tmp_path}/export",
        "logger=csv",
    ]
    decoder_args = ["stage=decoder", "data=embeddings", "stage.embeddings=shards", "model.decoder.sample_steps=2"]
    shards = [f"data.train_shards='{tmp_path}/emb/train/*.tar'", f"data.val_shards='{tmp_path}/emb/val/*.tar'"]
    decoder_args += [*small_run, *shards, "run_name=decoder"]
    result = run_train(decoder_args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "outputs" / "decoder" / "runs" / "decoder"
    metrics = json.loads((run / "metrics.json").read_text())
    assert fd_clip_in_range(metrics["val/fd_clip"]) and 0 <= metrics["val/clip_score"] <= 100
    assert (run / "samples" / "epoch000.png").exists()
    assert (tmp_path / "export" / "decoder" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "export" / "decoder" / "context.safetensors").exists()

    upsampler_args = ["stage=upsampler", "model.upsampler.sample_steps=2", *small_run, *shapes_overrides(shapes_root)]
    upsampler_args += ["run_name=upsampler"]
    result = run_train(upsampler_args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs" / "upsampler" / "runs" / "upsampler" / "metrics.json").read_text())
    assert fd_clip_in_range(metrics["val/fd_clip"]) and 0 < metrics["val/psnr"] < 100
    assert (tmp_path / "export" / "upsampler" / "unet" / "diffusion_pytorch_model.safetensors").exists()

    # A CLIP export of another embedding width than the shards: one line naming both widths.
    from omegaconf import OmegaConf

    from dalle_lightning.export import write_export
    from dalle_lightning.models.tokenizer import load_tokenizer
    from dalle_lightning.stages.clip import ClipModule

    cfg = OmegaConf.to_container(compose_config(["model.clip.projection_dim=64"], tmp_path), resolve=True)
    narrow = ClipModule(cfg["model"]["clip"], cfg["optim"], None, load_tokenizer(tiny_clip_export))
    other = write_export(tmp_path / "clip64", "clip", narrow.export)
    result = run_train([*prior_args, f"stage.clip={other}", "run_name=mismatch"], tmp_path)
    lines = lines_starting(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "128-wide" in lines[0] and "64-wide" in lines[0]
