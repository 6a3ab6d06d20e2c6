"""The webdataset datamodule and safe decoding: real shards, real pipelines, bad input skipped and counted."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import Detonator, small_shapes, write_tar
from dalle_lightning.data.datamodule import ShardDataModule
from dalle_lightning.data.decode import (
    SKIP_REASONS,
    SkipSample,
    decode_caption,
    decode_image,
    decode_npy,
    to_rgb,
)
from dalle_lightning.data.shards import SampleDecoder, TrainStream, eval_pipeline, expand_shards
from dalle_lightning.errors import UserError


def jpeg_bytes(size=(48, 40), colour=(200, 30, 30), mode="RGB", fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def good(key: str, caption: str = "a red circle") -> dict[str, bytes]:
    return {f"{key}.jpg": jpeg_bytes(), f"{key}.txt": caption.encode(), f"{key}.json": b'{"group": "g"}'}


# --- decoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,colour",
    [
        ("L", 128),
        ("P", 3),
        ("RGBA", (10, 20, 30, 0)),
        ("LA", (90, 255)),
        ("CMYK", (0, 255, 255, 0)),
        ("I;16", 40000),
    ],
)
def test_any_mode_becomes_rgb(mode, colour):
    image = to_rgb(Image.new(mode, (8, 8), colour))
    assert image.mode == "RGB"
    array = np.asarray(image)
    if mode == "RGBA":  # fully transparent: composited onto white
        assert (array == 255).all()
    if mode == "CMYK":  # C=0, M=Y=1 is red
        assert array[0, 0, 0] > 200 and array[0, 0, 1] < 60
    if mode == "I;16":  # 16-bit scaled to 8 bits, not clipped to white
        assert array.max() == 255 and array.min() == 255  # constant image: peak maps to 255
    assert array.dtype == np.uint8


def test_decode_image_resizes_and_center_crops():
    data = jpeg_bytes(size=(400, 200))
    out = decode_image(data, size=32, min_size=16)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert abs(int(out[16, 16, 0]) - 200) < 12  # colour survives draft-mode decoding


def test_jpeg_draft_mode_decodes_large_jpegs_at_reduced_size(monkeypatch):
    sizes = []
    original = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(self.size)
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    decode_image(jpeg_bytes(size=(1024, 1024)), size=64, min_size=32)
    assert sizes and sizes[0][0] <= 128, f"JPEG was decoded at {sizes[0]}, not reduced by draft mode"


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"\xff\xd8\xff\xe0 not really a jpeg", "corrupt_image"),
        (jpeg_bytes()[:60], "corrupt_image"),
        (jpeg_bytes(size=(10, 10)), "too_small"),
    ],
)
def test_bad_images_are_skipped_with_a_reason(data, reason):
    with pytest.raises(SkipSample) as info:
        decode_image(data, size=32, min_size=16)
    assert info.value.reason == reason


def test_decompression_bomb_is_refused_without_decoding():
    # A PNG header claiming 20000 x 20000 pixels: Pillow's guard must refuse it before allocating.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    with pytest.raises(SkipSample) as info:
        decode_image(buffer.getvalue(), size=32, min_size=16)
    assert info.value.reason == "decompression_bomb"
    assert Image.MAX_IMAGE_PIXELS is not None  # the guard is still on


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"  a   red\ncircle ", "a red circle"),
        ("caf\u00c3\u00a9 au lait".encode(), "café au lait"),  # mojibake fixed by ftfy
        ("\u2603 \U0001f600 \u0000 emoji".encode(), None),
        # ASCII captions skip ftfy only where it would change nothing: entities and control characters still go
        (b"salt &amp; pepper", "salt & pepper"),
        (b"a\x00 red\x7f circle", "a red circle"),
    ],
)
def test_captions_are_cleaned(data, expected):
    text = decode_caption(data)
    assert text and "  " not in text
    if expected:
        assert text == expected


@pytest.mark.parametrize(
    "data,reason",
    [(None, "missing_caption"), (b"   ", "empty_caption"), (b"\xff\xfe\xfa bad", "bad_caption_encoding")],
)
def test_bad_captions_are_skipped(data, reason):
    with pytest.raises(SkipSample) as info:
        decode_caption(data)
    assert info.value.reason == reason


def test_pickled_npy_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    np.save(buffer, np.array([Detonator(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(SkipSample) as info:
        decode_npy(buffer.getvalue())
    assert info.value.reason == "pickled_npy" and not marker.exists()
    plain = io.BytesIO()
    np.save(plain, np.arange(4, dtype=np.float16))
    assert decode_npy(plain.getvalue()).dtype == np.float16


# --- shard sources --------------------------------------------------------------------------------------


def test_expand_shards_brace_glob_list_and_pipe(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"s-{i:03d}.tar", good(f"k{i}"))
    assert len(expand_shards(str(tmp_path / "s-{000..002}.tar"))) == 3
    assert len(expand_shards(str(tmp_path / "s-*.tar"))) == 3
    assert len(expand_shards([str(tmp_path / "s-000.tar"), str(tmp_path / "s-001.tar")])) == 2
    assert expand_shards("pipe:cat /x/{0..1}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]
    # missing shards among present ones are dropped, not fatal
    assert len(expand_shards(str(tmp_path / "s-{000..005}.tar"))) == 3


def test_pattern_matching_nothing_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError) as info:
        expand_shards(str(tmp_path / "nope-{000..009}.tar"), "data.train_shards")
    message = str(info.value)
    assert "data.train_shards" in message and "nope-{000..009}.tar" in message and "\n" not in message


def test_a_glob_over_img2dataset_output_reads_the_tars_only(tmp_path, caplog):
    """img2dataset writes `.parquet` and `_stats.json` sidecars beside its shards: a glob over the folder reads
    the tar shards and leaves the sidecars out (logged), not counting them as bad shards; a sidecar named
    outright, or a glob that matches no tar, is a one-line error."""
    for i in range(2):
        write_tar(tmp_path / f"{i:05d}.tar", {**good(f"k{i}a"), **good(f"k{i}b")})
        (tmp_path / f"{i:05d}.parquet").write_bytes(b"PAR1 not a tar")
        (tmp_path / f"{i:05d}_stats.json").write_text('{"count": 2}')
    with caplog.at_level("INFO", logger="dalle_lightning.data.shards"):
        urls = expand_shards(str(tmp_path / "*"), "data.val_shards")
    assert urls == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert "matches 4 files that are not tar shards, left out: 00000.parquet, 00000_stats.json" in caplog.text
    dm = ShardDataModule(val_shards=str(tmp_path / "*"), image_size=32, num_workers=0, val_samples=None)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in batches) == 4
    assert all(not b["skipped"] for b in batches), [b["skipped"] for b in batches]

    with pytest.raises(UserError, match=r"00000\.parquet' is not a tar shard") as err:
        expand_shards([str(tmp_path / "00000.tar"), str(tmp_path / "00000.parquet")], "data.train_shards")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"'.*\*\.json' matches no tar file, only 2 other files") as err:
        expand_shards(str(tmp_path / "*.json"), "data.train_shards")
    assert "\n" not in str(err.value)


# --- pipelines over bad shards ---------------------------------------------------------------------------


def test_bad_samples_and_shards_are_skipped_and_counted_with_no_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    members = {**good("a"), **good("b")}
    members.update({"c.jpg": b"\xff\xd8 corrupt", "c.txt": b"corrupt image"})
    members.update({"d.jpg": jpeg_bytes()})  # no caption
    members.update({"e.jpg": jpeg_bytes(), "e.txt": b"\xff\xfe bad utf8"})
    members.update({"f.png": bomb.getvalue(), "f.txt": b"a bomb"})
    members.update(
        {
            **good("g"),
            "g.pyd": pickle.dumps(Detonator(str(marker))),
            "g.pickle": pickle.dumps(Detonator(str(marker))),
        }
    )
    write_tar(tmp_path / "mixed.tar", members)
    write_tar(tmp_path / "whole.tar", {**good("h"), **good("i"), **good("j")})
    cut_from = write_tar(tmp_path / "cut.tar", {**good("t1"), **good("t2")})
    # Cut inside a member's data (a cut between members looks like a complete, shorter tar).
    with tarfile.open(cut_from) as tar:
        cut = tar.getmember("t2.jpg").offset_data + 10
    (tmp_path / "truncated.tar").write_bytes(cut_from.read_bytes()[:cut])
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file at all" * 50)

    urls = [str(tmp_path / n) for n in ("mixed.tar", "truncated.tar", "garbage.tar", "whole.tar")]
    decoder = SampleDecoder(image_size=32, min_image_size=16)
    batches = list(eval_pipeline(urls, decoder, batch_size=4, limit=None))
    keys = [k for b in batches for k in b["key"]]
    skipped = {}
    for b in batches:
        for reason, n in b["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert sorted(keys) == ["a", "b", "g", "h", "i", "j", "t1"]  # t1 precedes the cut
    assert skipped.get("corrupt_image") == 1
    assert skipped.get("missing_caption") == 1  # "d"
    assert skipped.get("bad_caption_encoding") == 1
    assert skipped.get("decompression_bomb") == 1
    assert skipped.get("bad_shard", 0) >= 2  # the truncated and the garbage tar
    assert set(skipped) <= set(SKIP_REASONS)
    assert not marker.exists(), "a pickled member was unpickled"
    assert all(b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (3, 32, 32) for b in batches)


def test_a_training_stream_that_can_use_nothing_stops_with_one_line_saying_why(tmp_path):
    """A resampled stream never ends: data that cannot feed the stage at all (here every image smaller than it;
    unreadable shards: tests/faults/test_fault_kinds.py) must stop the run with the reason and the fix."""
    small = {}
    for i in range(8):
        small.update({f"s{i}.jpg": jpeg_bytes(size=(16, 16)), f"s{i}.txt": b"a small red circle"})
    write_tar(tmp_path / "small.tar", small)
    decoder = SampleDecoder(image_size=64, min_image_size=32, max_skipped_in_a_row=20)
    stream = TrainStream([str(tmp_path / "small.tar")], decoder, 4, batches_per_worker=2, shuffle_buffer=4, seed=0)
    with pytest.raises(UserError, match=r"last 20 samples were all skipped \(too_small: 20\)") as err:
        next(iter(stream))
    assert "smaller than 32 px (data.min_image_size" in str(err.value) and "\n" not in str(err.value)

    # Usable samples between the skipped ones reset the count: a mixed stream trains.
    mixed = {**small, **good("a"), **good("b")}
    write_tar(tmp_path / "mixed.tar", mixed)
    decoder = SampleDecoder(image_size=32, min_image_size=24, max_skipped_in_a_row=9)
    stream = TrainStream([str(tmp_path / "mixed.tar")], decoder, 2, batches_per_worker=3, shuffle_buffer=1, seed=0)
    batches = list(stream)
    assert len(batches) == 3 and sum(b["skipped"].get("too_small", 0) for b in batches) >= 8


def test_eval_pipeline_splits_samples_across_ranks(tmp_path, monkeypatch):
    write_tar(tmp_path / "one.tar", {k: v for i in range(10) for k, v in good(f"k{i:02d}").items()})
    seen = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        batches = eval_pipeline([str(tmp_path / "one.tar")], SampleDecoder(32, 16), 4, limit=9)
        seen.append([k for b in batches for k in b["key"]])
    flat = sorted(k for keys in seen for k in keys)
    assert flat == [f"k{i:02d}" for i in range(9)]  # every sample once, limit respected
    assert [len(s) for s in seen] == [3, 3, 3]


def test_train_stream_is_deterministic_for_a_seed_and_differs_by_epoch(shapes_root):
    urls = expand_shards(json.loads((shapes_root / "manifest.json").read_text())["shards"]["train"])

    def keys(seed, epoch=0, num_workers=0):
        stream = TrainStream(urls, SampleDecoder(32, 16), 8, 3, shuffle_buffer=50, seed=seed)
        stream.epoch = epoch
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
        return [k for b in loader for k in b["key"]]

    assert keys(1) == keys(1)
    assert keys(1) != keys(2)
    assert len(keys(1)) == 24  # 3 batches of 8: the epoch length
    # Each epoch reads its own order, also in a fresh worker process (a copy of the stream each epoch).
    assert keys(1, epoch=1, num_workers=1) == keys(1, epoch=1) != keys(1, epoch=0, num_workers=1)


def test_train_loader_resumes_at_the_batch_after_the_checkpoint(shapes_root):
    """A datamodule restored from a checkpoint's state goes on with the next batch of the interrupted epoch,
    and a checkpoint from an epoch's end goes on with the next epoch."""
    dm = small_shapes(shapes_root, image_size=32, batch_size=8, samples_per_epoch=48, num_workers=2)
    dm.setup("fit")
    epochs = []
    for epoch in (0, 1):
        dm.load_state_dict({"train_epoch": epoch, "train_batches": 0})
        epochs.append([b["key"] for b in dm.train_dataloader()])
    assert len(epochs[0]) == 6 and epochs[0] != epochs[1]
    dm.load_state_dict({"train_epoch": 0, "train_batches": 4})
    assert [b["key"] for b in dm.train_dataloader()] == epochs[0][4:]
    dm.load_state_dict({"train_epoch": 0, "train_batches": 6})
    assert [b["key"] for b in dm.train_dataloader()] == epochs[1]


def test_datamodule_batches_from_shards(shapes_root):
    from dalle_lightning.models.tokenizer import train_bpe

    manifest = json.loads((shapes_root / "manifest.json").read_text())
    dm = ShardDataModule(
        manifest["shards"]["train"],
        manifest["shards"]["val"],
        batch_size=16,
        num_workers=2,
        image_size=32,
        samples_per_epoch=64,
        val_samples=40,
    )
    dm.tokenizer = train_bpe(dm.captions(500), vocab_size=300, context_length=24)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == len(dm.train_dataloader()) == 4  # 64 samples / 16 per batch, over 2 workers
    batch = dm.on_after_batch_transfer(train[0], 0)
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["input_ids"].shape == (16, 24) and batch["input_ids"].dtype == torch.int64
    assert len(batch["caption"]) == 16 and batch["heldout"].dtype == torch.bool
    val = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in val) == 40
    assert any(b["heldout"].any() for b in val) and any((~b["heldout"]).any() for b in val)


def test_datamodule_rejects_a_bad_image_size():
    with pytest.raises(UserError, match="image_size"):
        ShardDataModule("x.tar", image_size=4)


def test_pipe_sources_stream_through_the_pipeline(tmp_path):
    # The same path a `pipe:aws s3 cp s3://... -` source takes, with a command that exists everywhere.
    write_tar(tmp_path / "a.tar", {**good("k1"), **good("k2")})
    urls = expand_shards(f"pipe:cat {tmp_path}/a.tar")
    batches = list(eval_pipeline(urls, SampleDecoder(32, 16), batch_size=8, limit=None))
    assert [k for b in batches for k in b["key"]] == ["k1", "k2"]
    failing = list(eval_pipeline([f"pipe:cat {tmp_path}/missing.tar"], SampleDecoder(32, 16), 8, None))
    assert failing == []  # a failing command is a bad shard, skipped; the stream goes on
