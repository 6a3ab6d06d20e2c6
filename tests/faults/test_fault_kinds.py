"""Every kind of bad input, streamed through the real ShardDataModule (training and validation loaders):
the stream goes on, the good samples all arrive, each bad one is skipped and counted under its reason, and
nothing in a shard runs code."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin
from shardgen import FAULTS, MARKER, Fault, ShardSet, build, good, mixed

from conftest import write_tar
from dalle_lightning.data.datamodule import ShardDataModule
from dalle_lightning.data.decode import SKIP_REASONS
from dalle_lightning.errors import UserError, report_user_errors

FAULT_IDS = [f.name for f in FAULTS]
# Kinds also read with one loader worker process: the counts and the refusal to unpickle must hold there too.
IN_A_WORKER = {"pickle_members", "pickled_npy", "huge_caption", "truncated_tar", "pipe_fails_midstream"}


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch) -> Path:
    """A `gs` on PATH that leaves a file when run: Pillow would call it to render an EPS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "ghostscript-ran"
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch '{marker}'\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches the probe; make it look again
    return marker


def datamodule(shard_set: ShardSet, num_workers: int = 0, samples_per_epoch: int = 64) -> ShardDataModule:
    dm = ShardDataModule(
        shard_set.urls,
        shard_set.urls,
        batch_size=4,
        num_workers=num_workers,
        image_size=None if shard_set.npy else 32,
        min_image_size=16,
        samples_per_epoch=samples_per_epoch,
        val_samples=None,
        shuffle_buffer=8,
        npy_fields=("img_emb",) if shard_set.npy else (),
    )
    dm.setup("fit")
    return dm


def drain(loader) -> tuple[list[str], Counter, list[dict]]:
    keys, skipped, batches = [], Counter(), list(loader)
    for batch in batches:
        keys += batch["key"]
        skipped.update(batch["skipped"])
    return keys, skipped, batches


def check_batches(batches: list[dict], shard_set: ShardSet) -> None:
    for batch in batches:
        if shard_set.npy:
            assert batch["img_emb"].dtype.is_floating_point and batch["img_emb"].shape[1:] == (8,)
        else:  # every image mode arrives as 3-channel uint8 at the training size
            assert batch["image"].dtype == np.uint8 or str(batch["image"].dtype) == "torch.uint8"
            assert tuple(batch["image"].shape[1:]) == (3, 32, 32)


@pytest.mark.parametrize(
    "fault,num_workers",
    [(f, 0) for f in FAULTS] + [(f, 1) for f in FAULTS if f.name in IN_A_WORKER],
    ids=FAULT_IDS + [f"{f.name}-worker" for f in FAULTS if f.name in IN_A_WORKER],
)
def test_fault_is_skipped_counted_and_the_stream_goes_on(fault: Fault, num_workers, tmp_path, fake_ghostscript):
    shard_set = build(fault, tmp_path / "shards")
    assert fault.reason is None or fault.reason in SKIP_REASONS
    dm = datamodule(shard_set, num_workers)

    # Validation reads every sample once, in order: exactly the good ones arrive, exactly the bad one is counted.
    keys, skipped, batches = drain(dm.val_dataloader())
    assert [k for k in keys if k not in shard_set.optional] == shard_set.keys
    assert dict(skipped) == shard_set.skipped
    check_batches(batches, shard_set)
    for key in shard_set.kept:  # unusual but valid input: kept, decoded to RGB
        (batch,) = [b for b in batches if key in b["key"]]
        image = batch["image"][batch["key"].index(key)]
        assert image.shape == (3, 32, 32)
        if fault.name == "cmyk_jpeg":  # C=0, M=Y=1 is red, not inverted or grey
            assert image[0].float().mean() > 200 and image[1].float().mean() < 60

    # Training resamples shards forever: one epoch of it never yields a bad sample and counts only the reason.
    keys, skipped, batches = drain(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader()) == 16
    assert set(keys) <= set(shard_set.keys) | set(shard_set.optional)
    assert set(skipped) <= set(shard_set.skipped)
    if fault.reason is not None:
        assert skipped[fault.reason] > 0, "the training stream never met or never counted the fault"
    check_batches(batches, shard_set)

    assert not (tmp_path / "shards" / MARKER).exists(), "a pickled member was unpickled: its code ran"
    assert not fake_ghostscript.exists(), "an image member ran Ghostscript"


def test_every_reason_a_fault_produces_is_in_the_logged_list():
    produced = {f.reason for f in FAULTS if f.reason}
    assert produced <= set(SKIP_REASONS)
    # Every logged reason a shard can produce has a fault kind here; a clip-retrieval folder's NaN/inf rows are
    # tests/test_clip_retrieval.py's.
    assert set(SKIP_REASONS) - {"nonfinite_embedding"} == produced


def test_all_kinds_in_one_shard_set(tmp_path, fake_ghostscript):
    """The mixed set train.py is run on: every image fault kind at once, in one validation pass and one
    training epoch."""
    shard_set = mixed(tmp_path / "shards")
    dm = datamodule(shard_set, samples_per_epoch=256)
    keys, skipped, _ = drain(dm.val_dataloader())
    assert [k for k in keys if k not in shard_set.optional] == shard_set.keys
    assert dict(skipped) == shard_set.skipped
    keys, skipped, _ = drain(dm.train_dataloader())
    assert set(keys) <= set(shard_set.keys) | set(shard_set.optional) and len(keys) == 256
    assert set(skipped) <= set(shard_set.skipped)
    assert not list(tmp_path.rglob(MARKER)) and not fake_ghostscript.exists()


# --- a source where every shard fails ------------------------------------------------------------------------


def failing_sources(tmp_path: Path, n: int = 3) -> list[str]:
    return [f"pipe:sh -c 'exit 1' {tmp_path}/{i}.tar" for i in range(n)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_training_source_whose_every_shard_fails_is_a_one_line_error_not_a_hang(tmp_path, num_workers, capsys):
    """Resampling retries failing shards forever: past the limit of failures in a row the loader stops with a
    UserError naming the rank, the count and the last error; `report_user_errors` prints it as one line even
    when torch re-raises it from a loader worker with the worker's traceback in the message."""
    dm = datamodule(ShardSet(failing_sources(tmp_path), [], {}), num_workers)
    with pytest.raises(UserError) as info:
        next(iter(dm.train_dataloader()))
    assert "20 shards in a row" in str(info.value) and "data.train_shards" in str(info.value)

    with pytest.raises(SystemExit) as exit_info, report_user_errors():
        next(iter(dm.train_dataloader()))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, lines
    assert error_lines[0].startswith("error: rank 0 of 1")
    assert "20 shards in a row could not be read" in error_lines[0] and "exit 1" in error_lines[0]
    assert "Traceback" not in error_lines[0]


def test_failures_are_counted_in_a_row_only(tmp_path):
    """More bad shards than the limit, but never as many in a row: each usable sample starts the count again."""
    urls = []
    for i in range(2):
        urls += failing_sources(tmp_path / str(i), 19)
        members = {k: v for j in range(3) for k, v in good(f"g{i}{j}").items()}
        urls.append(str(write_tar(tmp_path / f"good{i}.tar", members)))
    keys, skipped, _ = drain(datamodule(ShardSet(urls, [], {})).val_dataloader())
    assert keys == ["g00", "g01", "g02", "g10", "g11", "g12"] and dict(skipped) == {"bad_shard": 38}


def test_what_is_skipped_after_the_last_usable_sample_is_counted_once_per_pass(tmp_path):
    """A bad last sample and a bad last shard still reach the pass's last batch; a pass broken off early (as
    Lightning's sanity check does) leaves nothing behind for the next pass."""
    members = {k: v for j in range(4) for k, v in good(f"k{j}").items()}
    members["k9.jpg"] = members["k0.jpg"]  # no caption
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar " * 100)
    urls = [str(write_tar(tmp_path / "last.tar", members)), str(garbage)]
    loader = datamodule(ShardSet(urls, [], {})).val_dataloader()
    next(iter(loader))  # broken off after its first (here: only) batch
    keys, skipped, batches = drain(loader)
    assert keys == [f"k{j}" for j in range(4)] and len(batches) == 1
    assert dict(skipped) == {"missing_caption": 1, "bad_shard": 1}
