"""Surviving faults in training: preemption signals (save, exit, SLURM requeue and automatic resume),
non-finite losses, a kill in the middle of writing a checkpoint, and an unusable output directory."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import FAST_CLIP, ROOT, csv_losses, lines_starting, run_script, run_train, shapes_overrides
from dalle_lightning.errors import UserError
from dalle_lightning.train import check_output_dir

TESTS = {"PYTHONPATH": str(ROOT / "tests")}


class SignalDuringStep(L.Callback):
    """Test-only: send this process `signum` while training batch `step` runs (as a scheduler would); on
    rank zero only, as when the signal reaches the launching process and not its children."""

    def __init__(self, step: int, signum: str):
        self.step, self.signum = step, signal.Signals[signum]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0:
            os.kill(os.getpid(), self.signum)


class PoisonBatches(L.Callback):
    """Test-only: NaN images in the batches of these steps (a corrupt sample, an overflow)."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            batch["image"].fill_(float("nan"))


def _args(tmp_path: Path, shapes_root: Path, name: str, steps: int = 6) -> list[str]:
    return [
        *FAST_CLIP,
        *shapes_overrides(shapes_root),
        f"trainer.max_steps={steps}",
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.export_dir={tmp_path}/export",
        "logger=csv",
        f"run_name={name}",
    ]


def _run_dir(tmp_path: Path, name: str) -> Path:
    return tmp_path / "outputs" / "clip" / "runs" / name


def _step(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"]


@pytest.mark.slow
def test_preemption_signal_saves_exits_and_resumes(tmp_path, shapes_root):
    """SIGTERM here; SIGUSR1 in the DDP and SLURM tests below."""
    signum = "SIGTERM"
    cb = [f"+callbacks.signal._target_={__name__}.SignalDuringStep", "+callbacks.signal.step=3"]
    stopped = run_train(
        [*_args(tmp_path, shapes_root, "a"), *cb, f"+callbacks.signal.signum={signum}"], tmp_path, env=TESTS
    )
    assert stopped.returncode == 128 + signal.Signals[signum], stopped.stderr[-3000:]
    (line,) = lines_starting(stopped.stderr, "stopped: ")
    assert f"preempted by {signum} at step 4" in line and "resume with ckpt_path=last" in line
    assert "Traceback" not in stopped.stderr
    assert _step(_run_dir(tmp_path, "a") / "checkpoints" / "last.ckpt") == 4
    assert not (tmp_path / "export" / "clip").exists()  # an unfinished run does not replace the export

    resumed = run_train([*_args(tmp_path, shapes_root, "b"), "ckpt_path=last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _step(_run_dir(tmp_path, "b") / "checkpoints" / "last.ckpt") == 6
    assert (tmp_path / "export" / "clip" / "model.safetensors").exists()


@pytest.mark.slow
def test_preemption_of_one_ddp_rank_stops_both_with_one_checkpoint(tmp_path, shapes_root):
    cb = [f"+callbacks.signal._target_={__name__}.SignalDuringStep", "+callbacks.signal.step=3"]
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "+callbacks.signal.signum=SIGUSR1"]
    stopped = run_train([*_args(tmp_path, shapes_root, "ddp"), *cb, *ddp], tmp_path, env=TESTS, timeout=240)
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    assert any("preempted by SIGUSR1 at step 4" in line for line in lines_starting(stopped.stderr, "stopped: "))
    assert _step(_run_dir(tmp_path, "ddp") / "checkpoints" / "last.ckpt") == 4


@pytest.mark.slow
def test_slurm_job_is_requeued_and_its_next_attempt_resumes(tmp_path, shapes_root):
    """Inside a SLURM job (faked: a job id and an `scontrol` that records its arguments), preemption requeues
    the job, and the requeued attempt (SLURM_RESTART_COUNT=1) resumes from that job's checkpoint by itself."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}", **TESTS}
    cb = [f"+callbacks.signal._target_={__name__}.SignalDuringStep", "+callbacks.signal.step=2"]
    first = run_train(
        [*_args(tmp_path, shapes_root, "attempt0"), *cb, "+callbacks.signal.signum=SIGUSR1"], tmp_path, env=slurm
    )
    assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-3000:]
    assert "requeued SLURM job 4242" in lines_starting(first.stderr, "stopped: ")[0]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]

    # Another job's run, newer, must not be picked up.
    other = run_train(_args(tmp_path, shapes_root, "other", steps=3), tmp_path, env={**slurm, "SLURM_JOB_ID": "7"})
    assert other.returncode == 0, other.stderr[-3000:]
    again = run_train(_args(tmp_path, shapes_root, "attempt1"), tmp_path, env={**slurm, "SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "resuming from" in output and "attempt0" in output, output[-3000:]
    steps = csv_losses(_run_dir(tmp_path, "attempt1"))
    assert _step(_run_dir(tmp_path, "attempt1") / "checkpoints" / "last.ckpt") == 6
    assert sorted(steps) == [3, 4, 5]  # continued after step 3, not from zero


@pytest.mark.slow
def test_non_finite_steps_are_skipped_and_counted_then_stop_the_run(tmp_path, shapes_root):
    cb = [f"+callbacks.poison._target_={__name__}.PoisonBatches"]
    skipped = run_train(
        [*_args(tmp_path, shapes_root, "two"), *cb, "+callbacks.poison.steps=[1,3]"], tmp_path, env=TESTS
    )
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    run = _run_dir(tmp_path, "two")
    assert json.loads((run / "metrics.json").read_text())["train/nonfinite_steps"] == 2
    weights = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())

    guard = ["callbacks.nonfinite_guard.max_in_a_row=3", "+callbacks.poison.steps=[4,5,6,7]"]
    stopped = run_train([*_args(tmp_path, shapes_root, "many", steps=9), *cb, *guard], tmp_path, env=TESTS)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    (line,) = lines_starting(stopped.stderr, "error: ")
    assert "not finite for 3 steps in a row (up to step 6)" in line and "last.ckpt" in line and "lower optim.lr" in line


KILLER = """
import io, os, runpy, sys, torch
saves, original = 0, torch.save
def dying_save(obj, f, *args, **kwargs):
    global saves
    saves += 1
    if saves < 2:
        return original(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    original(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    target = f if hasattr(f, "write") else open(f, "wb")
    target.write(data[: len(data) // 2])  # half of the second checkpoint reaches the disk, then the kill
    target.flush()
    os._exit(137)
torch.save = dying_save
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_kill_while_saving_leaves_the_previous_checkpoint_readable(tmp_path, shapes_root):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    args = [
        str(ROOT / "train.py"),
        *_args(tmp_path, shapes_root, "k"),
        "callbacks.last_checkpoint.every_n_train_steps=2",
    ]
    killed = run_script(str(killer), args, tmp_path)
    assert killed.returncode == 137, killed.stderr[-3000:]
    checkpoints = _run_dir(tmp_path, "k") / "checkpoints"
    assert _step(checkpoints / "last.ckpt") == 2  # the first save, whole; the second never replaced it


def test_unwritable_output_dir_is_a_one_line_error_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"cannot write to the output directory .*a_file/run.*paths.log_dir"):
        check_output_dir(blocker / "run", needed_bytes=1)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(UserError, match=r"MiB free on the disk of .*a checkpoint needs about .*paths.log_dir"):
        check_output_dir(tmp_path / "run", needed_bytes=free + 2**30)
    check_output_dir(tmp_path / "run", needed_bytes=1)  # room enough: no error, nothing left behind
    assert list((tmp_path / "run").iterdir()) == []
