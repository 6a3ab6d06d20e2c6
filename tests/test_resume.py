"""Exact resume: a run killed with SIGKILL and resumed from its last checkpoint trains on exactly the losses of
the run that was never interrupted (optimizer, LR schedule, EMA, RNG and the data stream's position restored)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest

from conftest import ROOT, csv_losses, run_train, shapes_overrides

pytestmark = pytest.mark.slow

STEPS = 34


class KillAtStep(L.Callback):
    """Test-only: `kill -9` this very process once `step` optimizer steps are done (as a crash or the OOM
    killer would: no handler runs, nothing is flushed)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _args(tmp_path: Path, shapes_root: Path, clip_export: Path, name: str, every: int) -> list[str]:
    # The decoder: a diffusion loss (random timesteps and noise), warmup + cosine LR, EMA, two loader workers,
    # 12 batches an epoch with validation between epochs, so the resumed span crosses epoch ends.
    return [
        "stage=decoder",
        f"stage.clip={clip_export}",
        *shapes_overrides(shapes_root),
        "trainer=cpu",
        f"trainer.max_steps={STEPS}",
        "trainer.max_epochs=-1",
        "trainer.log_every_n_steps=1",
        "+trainer.limit_val_batches=1",
        "+trainer.num_sanity_val_steps=1",
        "data.batch_size=8",
        "data.samples_per_epoch=96",
        "data.val_samples=8",
        "data.num_workers=2",
        "data.shuffle_buffer=64",
        "stage.metrics.every_n_epochs=0",
        "scheduler.warmup_steps=4",
        f"callbacks.last_checkpoint.every_n_train_steps={every}",
        "callbacks.export=null",
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.export_dir={tmp_path}/export",
        "logger=csv",
        f"run_name={name}",
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shapes_root, tiny_clip_export) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = run_train(_args(tmp, shapes_root, tiny_clip_export, "whole", every=5), tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = csv_losses(tmp / "outputs" / "decoder" / "runs" / "whole")
    assert sorted(losses) == list(range(STEPS))
    return losses


# Killed at step 14, resumed from the step-10 checkpoint, in the middle of the first epoch (the resume at an
# epoch's end is checked on the loader alone: test_data.py::test_train_loader_resumes_at_the_batch_after_...).
def test_killed_run_resumes_with_the_same_losses(uninterrupted, tmp_path, shapes_root, tiny_clip_export):
    every, kill_at, resume_at = 5, 14, 10
    killed_args = [
        *_args(tmp_path, shapes_root, tiny_clip_export, "killed", every),
        f"+callbacks.kill._target_={__name__}.KillAtStep",
        f"+callbacks.kill.step={kill_at}",
    ]
    killed = run_train(killed_args, tmp_path, env={"PYTHONPATH": str(ROOT / "tests")})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoint = tmp_path / "outputs" / "decoder" / "runs" / "killed" / "checkpoints" / "last.ckpt"

    resumed_args = [*_args(tmp_path, shapes_root, tiny_clip_export, "resumed", every), f"ckpt_path={checkpoint}"]
    resumed = run_train(resumed_args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = csv_losses(tmp_path / "outputs" / "decoder" / "runs" / "resumed")
    assert sorted(after) == list(range(resume_at, STEPS)), sorted(after)
    assert len(after) >= 20
    differences = {step: abs(loss - uninterrupted[step]) for step, loss in after.items()}
    print(
        f"resumed at step {resume_at}: max |loss difference| over {len(after)} steps = {max(differences.values()):.2e}"
    )
    assert max(differences.values()) <= 1e-5, differences
