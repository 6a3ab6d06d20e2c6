"""The real `python train.py` over bad data: a run whose validation shards hold every fault kind finishes and
logs exactly what was injected; a 2-process DDP run where one rank's shards all fail ends, not hangs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from shardgen import MARKER, good, mixed

from conftest import FAST_CLIP, lines_starting, run_train, write_tar
from dalle_lightning.data.decode import SKIP_REASONS

pytestmark = pytest.mark.slow


def good_shards(root: Path, n: int = 2, per_shard: int = 48) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for i in range(n):
        members = {k: v for j in range(per_shard) for k, v in good(f"{i:05d}{j:04d}").items()}
        shards.append(write_tar(root / f"{i:05d}.tar", members))
    return shards


def hydra_list(items: list[str]) -> str:
    return "[" + ",".join(f"'{item}'" for item in items) + "]"


def common(tmp_path: Path) -> list[str]:
    return [
        *FAST_CLIP,
        "data=webdataset",
        "data.min_image_size=16",
        "data.shuffle_buffer=16",
        "model.clip.vocab_size=300",
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.export_dir={tmp_path}/export",
    ]


def test_train_py_over_every_fault_kind_logs_what_was_injected(tmp_path):
    """Training on good shards, validating on the mixed set: the one epoch's `data/skipped/<reason>` totals are
    the validation pass's skips, exactly as injected (the sanity check's partial pass is not counted)."""
    shard_set = mixed(tmp_path / "bad")
    train = good_shards(tmp_path / "good")
    result = run_train(
        [
            *common(tmp_path),
            f"data.train_shards={hydra_list([str(p) for p in train])}",
            f"data.val_shards={hydra_list(shard_set.urls)}",
            "data.val_samples=null",
            "data.samples_per_epoch=192",  # 6 batches of 32: one epoch, one validation pass
            "logger=csv",
            "callbacks.export=null",
            "run_name=faults",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs" / "clip" / "runs" / "faults" / "metrics.json").read_text())
    logged = {reason: metrics[f"data/skipped/{reason}"] for reason in SKIP_REASONS}
    assert logged == {reason: float(shard_set.skipped.get(reason, 0)) for reason in SKIP_REASONS}
    assert not list(tmp_path.rglob(MARKER))


def test_ddp_run_where_one_rank_reads_only_failing_shards_ends_with_a_one_line_error(tmp_path):
    """Rank 1's every shard fails (a pipe: command that exits 1 on that rank): instead of retrying forever while
    rank 0 waits in its first all-reduce, rank 1 stops with the error naming the shards, and Lightning's
    launcher ends the other rank."""
    good_shards(tmp_path / "good", n=4, per_shard=16)
    serve = tmp_path / "serve.sh"
    serve.write_text('[ "${LOCAL_RANK:-0}" = 1 ] && exit 1\nexec cat "$1"\n')
    shards = f"pipe:sh {serve} {tmp_path}/good/{{00000..00003}}.tar"
    start = time.monotonic()
    result = run_train(
        [
            *common(tmp_path),
            f"data.train_shards='{shards}'",
            "data.val_shards=null",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "logger=none",
            "callbacks=none",
            "run_name=ddp",
        ],
        tmp_path,
        timeout=240,
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0, result.stderr[-3000:]
    errors = lines_starting(result.stderr, "error:")
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: rank 1 of 2") and "20 shards in a row could not be read" in errors[0]
    assert "data.train_shards" in errors[0]
    assert elapsed < 120, f"the run took {elapsed:.0f} s to end"
