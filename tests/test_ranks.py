"""Several processes, for real (gloo on CPU, the decoder stage): each rank draws its own diffusion timesteps and
noise; a two-process run killed with SIGKILL resumes with every rank's losses as before; and two torchrun "nodes"
of one process each train exactly as one node of two processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from conftest import ROOT, run_train, shapes_overrides

pytestmark = pytest.mark.slow

STEPS = 28  # 4 epochs of 7 batches per rank; a checkpoint every 4 steps
EVERY, KILL_AT, RESUME_AT = 4, 10, 8


class RecordDraws(L.Callback):
    """Test-only: on every rank, each training step's loss and the timesteps and noise the stage drew (the
    arguments of its noise scheduler's `add_noise`), one JSON line per step in `<out>/rank<r>.jsonl`."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.draws: dict = {}

    def setup(self, trainer, pl_module, stage) -> None:
        add_noise = pl_module.noise.add_noise

        def recording(x0, noise, t):
            if pl_module.training:
                self.draws = {"t": t.tolist(), "noise": noise.flatten()[:16].tolist()}
            return add_noise(x0, noise, t)

        pl_module.noise.add_noise = recording

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {"step": trainer.global_step - 1, "loss": outputs["loss"].item(), **self.draws}
        record.update(node=trainer.node_rank, cluster=type(trainer.strategy.cluster_environment).__name__)
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / f"rank{trainer.global_rank}.jsonl").open("a") as file:
            file.write(json.dumps(record) + "\n")


def records(out: Path) -> dict[int, dict[int, dict]]:
    """rank → step → what RecordDraws wrote."""
    by_rank = {}
    for path in sorted(out.glob("rank*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        by_rank[int(path.stem.removeprefix("rank"))] = {r["step"]: r for r in lines}
    return by_rank


# One intra-op thread per process (two processes share the two cores), the same in every run so that the
# numbers compared are computed the same way; tests/ on the path for the test-only callbacks.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}


def _args(tmp: Path, shapes_root: Path, clip_export: Path, name: str) -> list[str]:
    # The decoder: timesteps, noise and classifier-free dropout masks drawn every step; warmup + cosine LR, EMA,
    # validation between epochs, so the resumed span crosses epoch ends.
    return [
        "stage=decoder",
        f"stage.clip={clip_export}",
        *shapes_overrides(shapes_root),
        "trainer=cpu",
        f"trainer.max_steps={STEPS}",
        "trainer.max_epochs=-1",
        "+trainer.limit_val_batches=1",
        "+trainer.num_sanity_val_steps=0",
        "data.batch_size=4",
        "data.samples_per_epoch=56",
        "data.val_samples=8",
        "data.num_workers=0",
        "data.shuffle_buffer=32",
        "stage.metrics.every_n_epochs=0",
        "scheduler.warmup_steps=4",
        f"callbacks.last_checkpoint.every_n_train_steps={EVERY}",
        "callbacks.progress_bar=null",
        f"+callbacks.record._target_={__name__}.RecordDraws",
        f"+callbacks.record.out={tmp}/draws/{name}",
        "logger=none",
        f"paths.log_dir={tmp}/outputs",
        f"paths.export_dir={tmp}/export",
        f"run_name={name}",
    ]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, shapes_root, tiny_clip_export) -> dict[int, dict[int, dict]]:
    """An uninterrupted run of two processes on one node, asked for with `trainer.devices=2` alone (Lightning
    picks DDP and re-launches train.py): rank → step → loss and draws. Rank zero writes the export."""
    tmp = tmp_path_factory.mktemp("one_node")
    args = [*_args(tmp, shapes_root, tiny_clip_export, "whole"), "trainer.devices=2"]
    result = run_train(args, tmp, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp / "export" / "decoder" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    ranks = records(tmp / "draws" / "whole")
    assert sorted(ranks) == [0, 1] and all(sorted(steps) == list(range(STEPS)) for steps in ranks.values())
    return ranks


def test_each_rank_draws_its_own_timesteps_and_noise(one_node):
    for step in range(STEPS):
        first, second = one_node[0][step], one_node[1][step]
        assert first["t"] != second["t"] and first["noise"] != second["noise"], step


def test_killed_two_process_run_resumes_every_rank_exactly(one_node, tmp_path, shapes_root, tiny_clip_export):
    """Killed (SIGKILL, both ranks, as when a job is killed) at step 10, resumed with ckpt_path=last from the
    step-8 checkpoint: every rank's losses, timesteps and noise of the 20 steps after it are those of the run
    that was never interrupted."""
    killed = [
        *_args(tmp_path, shapes_root, tiny_clip_export, "killed"),
        "trainer.devices=2",
        "callbacks.export=null",
        "+callbacks.kill._target_=test_resume.KillAtStep",
        f"+callbacks.kill.step={KILL_AT}",
    ]
    result = run_train(killed, tmp_path, env=ENV)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]

    resumed = [*_args(tmp_path, shapes_root, tiny_clip_export, "resumed"), "trainer.devices=2", "ckpt_path=last"]
    resumed.append("callbacks.export=null")
    result = run_train(resumed, tmp_path, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    after = records(tmp_path / "draws" / "resumed")
    assert sorted(after) == [0, 1]
    differences = []
    for rank, steps in after.items():
        assert sorted(steps) == list(range(RESUME_AT, STEPS)), (rank, sorted(steps))
        for step, record in steps.items():
            expected = one_node[rank][step]
            assert record["t"] == expected["t"] and record["noise"] == expected["noise"], (rank, step)
            differences.append(abs(record["loss"] - expected["loss"]))
    print(
        f"resumed at step {RESUME_AT}: max |loss difference| over 2 ranks x {STEPS - RESUME_AT} steps = "
        f"{max(differences):.2e}"
    )
    assert max(differences) <= 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_train_as_one_node_of_two_processes(one_node, tmp_path, shapes_root, tiny_clip_export):
    """`torchrun --nnodes=2 --nproc-per-node=1` twice, a c10d rendezvous on 127.0.0.1: Lightning takes its
    ranks from torchrun (TorchElasticEnvironment), and both ranks' losses are those of one node of two."""
    port = free_port()
    args = [*_args(tmp_path, shapes_root, tiny_clip_export, "nodes"), "trainer.num_nodes=2", "trainer.devices=1"]
    args += ["trainer.strategy=ddp", "callbacks.export=null"]
    tests_first = os.pathsep.join(p for p in (ENV["PYTHONPATH"], os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **ENV, "PYTHONPATH": tests_first}
    nodes = []
    for node_rank in (0, 1):
        torchrun = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=two-nodes",
            f"--rdzv-conf=is_host={int(node_rank == 0)}",
            "--local-addr=127.0.0.1",
            str(ROOT / "train.py"),
            *args,
        ]
        log = (tmp_path / f"node{node_rank}.log").open("w")
        nodes.append(subprocess.Popen(torchrun, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    logs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    ranks = records(tmp_path / "draws" / "nodes")
    assert sorted(ranks) == [0, 1]
    assert {ranks[rank][0]["node"] for rank in (0, 1)} == {0, 1}
    assert {ranks[rank][0]["cluster"] for rank in (0, 1)} == {"TorchElasticEnvironment"}
    differences = [
        abs(ranks[rank][step]["loss"] - one_node[rank][step]["loss"]) for rank in (0, 1) for step in range(STEPS)
    ]
    print(
        f"two nodes against one node of two processes: max |loss difference| over 2 ranks x {STEPS} steps = "
        f"{max(differences):.2e}"
    )
    assert max(differences) <= 1e-5
