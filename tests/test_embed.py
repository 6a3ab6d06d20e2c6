"""Embedding shards: a frozen CLIP over real Shapes shards, written resumably, read back safely."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, Detonator, lines_starting, write_tar
from dalle_lightning.data.datamodule import ShardDataModule
from dalle_lightning.data.decode import decode_image, image_member
from dalle_lightning.data.shards import expand_shards
from dalle_lightning.embed import SUMMARY, embed_shards, output_name
from dalle_lightning.errors import UserError
from dalle_lightning.models.clip import load_frozen_clip

EMB_MEMBERS = ("img_emb.npy", "txt_emb.npy", "txt_ids.npy")
SAMPLES_PER_SHARD = 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_export(tiny_clip_export) -> Path:
    return tiny_clip_export


@pytest.fixture(scope="module")
def train_shards(shapes_root, tmp_path_factory) -> list[str]:
    """The Shapes training shards cut to their first samples (the CPU CLIP is the slow part), names kept."""
    manifest = json.loads((shapes_root / "manifest.json").read_text())
    folder = tmp_path_factory.mktemp("embed_shards")
    shards = []
    for url in expand_shards(manifest["shards"]["train"]):
        members = tar_members(url)
        keys = sorted({name.split(".", 1)[0] for name in members})[:SAMPLES_PER_SHARD]
        kept = {name: data for name, data in members.items() if name.split(".", 1)[0] in keys}
        shards.append(str(write_tar(folder / Path(url).name, kept)))
    return shards


def tar_members(path: Path | str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_embedding_shards_hold_the_originals_and_the_embeddings(tmp_path, clip_export, train_shards):
    shard = train_shards[0]
    summary = embed_shards(shard, tmp_path / "a", clip=str(clip_export), batch_size=16, num_workers=0)
    clip = load_frozen_clip(clip_export)
    dim, context = clip.projection_dim, clip.context_length
    out = tmp_path / "a" / Path(shard).name
    original, embedded = tar_members(shard), tar_members(out)
    keys = sorted({name.split(".", 1)[0] for name in original})
    assert len(keys) == SAMPLES_PER_SHARD and summary["written"] == SAMPLES_PER_SHARD and summary["complete"]
    assert all(embedded[name] == data for name, data in original.items())  # every member, byte for byte
    assert set(embedded) == set(original) | {f"{k}.{m}" for k in keys for m in EMB_MEMBERS}

    written = json.loads((tmp_path / "a" / SUMMARY).read_text())
    assert (
        written["shards"] == [str(out)] and written["embedding_dim"] == dim and written["written"] == SAMPLES_PER_SHARD
    )
    assert written["clip"] == str(clip_export.resolve()) and written["input"] == shard

    img = np.stack([load_npy(embedded[f"{k}.img_emb.npy"]) for k in keys])
    txt = np.stack([load_npy(embedded[f"{k}.txt_emb.npy"]) for k in keys])
    ids = np.stack([load_npy(embedded[f"{k}.txt_ids.npy"]) for k in keys])
    assert img.dtype == txt.dtype == np.float16 and img.shape == txt.shape == (SAMPLES_PER_SHARD, dim)
    assert ids.dtype == np.int32 and ids.shape == (SAMPLES_PER_SHARD, context)
    for emb in (img, txt):
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=1e-2)

    # The same as encoding the samples directly with the export.
    sample = {"jpg": None}
    images, captions = [], []
    for k in keys[:24]:
        sample["jpg"] = original[f"{k}.jpg"]
        images.append(decode_image(image_member(sample), clip.image_size, 16))
        captions.append(original[f"{k}.txt"].decode())
    tokens = clip.tokenizer(captions, padding="max_length", truncation=True, max_length=context, return_tensors="pt")
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    direct_img = clip.encode_images(pixels).numpy()
    direct_txt = clip.encode_texts(tokens["input_ids"], tokens["attention_mask"]).numpy()
    np.testing.assert_allclose(img[:24].astype(np.float32), direct_img, atol=1e-2)
    np.testing.assert_allclose(txt[:24].astype(np.float32), direct_txt, atol=1e-2)
    np.testing.assert_array_equal(ids[:24], tokens["input_ids"].numpy())

    # Deterministic: reading in worker processes gives byte-identical shards.
    embed_shards([shard], tmp_path / "b", clip=str(clip_export), batch_size=16, num_workers=2)
    assert (tmp_path / "b" / out.name).read_bytes() == out.read_bytes()


def test_clip_retrieval_format_holds_the_same_embeddings_without_the_images(tmp_path, clip_export, train_shards):
    """format=clip_retrieval: a part per shard (no image bytes), row i of its three files one sample, the same
    embeddings as the shard format's, the sample's json flattened into columns; the prior's reader takes it."""
    import pyarrow.parquet as pq

    from dalle_lightning.data.datamodule import ClipRetrievalDataModule

    shards = train_shards[:2]
    embed_shards(shards, tmp_path / "shards", clip=str(clip_export), batch_size=16, num_workers=0)
    summary = embed_shards(
        shards, tmp_path / "parts", clip=str(clip_export), format="clip_retrieval", batch_size=16, num_workers=0
    )
    assert summary["complete"] and summary["written"] == 2 * SAMPLES_PER_SHARD and summary["format"] == "clip_retrieval"
    stem = Path(shards[0]).stem
    img = np.load(tmp_path / "parts" / "img_emb" / f"img_emb_{stem}.npy", allow_pickle=False)
    txt = np.load(tmp_path / "parts" / "text_emb" / f"text_emb_{stem}.npy", allow_pickle=False)
    table = pq.read_table(tmp_path / "parts" / "metadata" / f"metadata_{stem}.parquet")
    assert img.dtype == txt.dtype == np.float16 and img.shape == txt.shape == (SAMPLES_PER_SHARD, 128)
    assert {"key", "caption", "group", "heldout", "kind", "objects"} <= set(table.column_names)
    assert table.schema.field("heldout").type == "bool" and isinstance(table.column("objects")[0].as_py(), str)
    members = tar_members(tmp_path / "shards" / Path(shards[0]).name)
    for row, key in enumerate(table.column("key").to_pylist()):
        assert np.array_equal(img[row], load_npy(members[f"{key}.img_emb.npy"]))
        assert np.array_equal(txt[row], load_npy(members[f"{key}.txt_emb.npy"]))
        assert table.column("caption")[row].as_py() == members[f"{key}.txt"].decode()
    assert not list((tmp_path / "parts").glob("**/*.tar")) and not list((tmp_path / "parts").glob("**/*.tmp"))

    parquet = tmp_path / "parts" / "metadata" / f"metadata_{stem}.parquet"
    mtime = parquet.stat().st_mtime_ns
    embed_shards(shards, tmp_path / "parts", clip=str(clip_export), format="clip_retrieval", num_workers=0)
    assert parquet.stat().st_mtime_ns == mtime  # done parts are skipped
    dm = ClipRetrievalDataModule(str(tmp_path / "parts"), batch_size=8, samples_per_epoch=16, val_samples=8)
    dm.setup("fit")
    assert [p.rows for p in dm.parts] == [SAMPLES_PER_SHARD] * 2 and dm.embedding_dim == 128


def test_reruns_skip_finished_shards_and_redo_deleted_ones(tmp_path, clip_export, train_shards):
    shards = train_shards[:2]
    out = tmp_path / "emb"
    embed_shards(shards, out, clip=str(clip_export), batch_size=16, num_workers=0, progress=False)
    paths = [out / Path(s).name for s in shards]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    summary = embed_shards(shards, out, clip=str(clip_export), num_workers=0, progress=False)
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert (
        summary["written"] == 2 * SAMPLES_PER_SHARD and summary["complete"]
    )  # counts of skipped shards come from their stats

    before = paths[0].read_bytes()
    paths[0].unlink()
    summary = embed_shards(shards, out, clip=str(clip_export), batch_size=16, num_workers=0)
    assert paths[0].read_bytes() == before and paths[1].stat().st_mtime_ns == mtimes[1]
    assert summary["written"] == 2 * SAMPLES_PER_SHARD and not list(out.glob("*.tmp"))
    (out / Path(shards[1]).name.replace(".tar", "_stats.json")).unlink()  # counted from the shard itself
    assert embed_shards(shards, out, clip=str(clip_export))["written"] == 2 * SAMPLES_PER_SHARD


def test_unreadable_shards_are_counted_and_redone_on_the_next_run(tmp_path, clip_export, train_shards):
    data = Path(train_shards[0]).read_bytes()
    source = tmp_path / "in" / "cut-000000.tar"
    source.parent.mkdir()
    with tarfile.open(train_shards[0]) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][SAMPLES_PER_SHARD // 2]
    source.write_bytes(data[: member.offset_data + member.size // 2])  # truncated in an image
    out = tmp_path / "emb"
    summary = embed_shards(str(source), out, clip=str(clip_export), batch_size=8, num_workers=0)
    assert summary["bad_shards"] == [str(source)] and summary["skipped"] == {"bad_shard": 1}
    assert summary["written"] == 0 and summary["shards"] == [] and not list(out.glob("*.tar*"))
    source.write_bytes(data)  # repaired: the next run does it
    summary = embed_shards(str(source), out, clip=str(clip_export), batch_size=8, num_workers=0)
    assert summary["written"] == SAMPLES_PER_SHARD and not summary["bad_shards"] and summary["skipped"] == {}


def test_pickles_are_copied_never_run_and_refused_when_read_back(tmp_path, clip_export, train_shards):
    marker = tmp_path / "pwned"
    original = tar_members(train_shards[0])
    good = {name: data for name, data in original.items() if name < "train00000004"}  # 4 samples
    payload = pickle.dumps(Detonator(str(marker)))
    extra = {
        "train00000002.pyd": payload,
        "train00000003.pickle": payload,
        "train00000004.jpg": b"not an image",
        "train00000004.txt": b"a red circle",
        "train00000005.jpg": original["train00000000.jpg"],
        "train00000005.txt": b"  ",
    }
    evil = dict(sorted({**good, **extra}.items()))  # in tar order: a sample's members are consecutive
    source = write_tar(tmp_path / "evil-000000.tar", evil)

    out = tmp_path / "emb"
    summary = embed_shards(str(source), out, clip=str(clip_export), num_workers=0)
    embedded = tar_members(out / source.name)
    assert summary["written"] == 4 and not marker.exists()
    assert summary["skipped"] == {"corrupt_image": 1, "empty_caption": 1}
    assert embedded["train00000002.pyd"] == payload and embedded["train00000003.pickle"] == payload

    # An embedding shard whose img_emb.npy is a pickled object array: refused on read, nothing runs.
    buffer = io.BytesIO()
    np.save(buffer, np.array([Detonator(str(marker))], dtype=object), allow_pickle=True)
    embedded["train00000001.img_emb.npy"] = buffer.getvalue()
    tampered = write_tar(tmp_path / "tampered.tar", embedded)
    dm = ShardDataModule(val_shards=str(tampered), image_size=None, npy_fields=["img_emb", "txt_emb"], num_workers=0)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert not marker.exists()
    assert sum(b["skipped"].get("pickled_npy", 0) for b in batches) == 1
    dim = summary["embedding_dim"]
    for name in ("img_emb", "txt_emb"):
        values = torch.cat([b[name] for b in batches])
        assert values.dtype == torch.float32 and values.shape == (3, dim)


def test_root_embed_py_runs_and_reports_errors_in_one_line(tmp_path, clip_export, train_shards):
    pattern = str(Path(train_shards[0]).parent / "train-{000000..000001}.tar")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    base = [sys.executable, str(ROOT / "embed.py"), f"shards='{pattern}'", f"output_dir={tmp_path / 'emb'}"]
    ok = subprocess.run(
        [*base, f"clip={clip_export}", "num_workers=0", "batch_size=32"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((tmp_path / "emb" / SUMMARY).read_text())["written"] == 2 * SAMPLES_PER_SHARD
    assert list((tmp_path / "outputs" / "embed").iterdir())  # Hydra's log folder

    bad = subprocess.run(
        [*base, "clip=/nowhere/no-clip"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    errors = lines_starting(bad.stderr)
    assert bad.returncode == 2 and len(errors) == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "clip='/nowhere/no-clip' does not exist" in errors[0]


def test_ranks_split_the_shards(tmp_path, clip_export, train_shards, monkeypatch):
    out = tmp_path / "emb"
    names = [Path(s).name for s in train_shards]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    summary = embed_shards(train_shards, out, clip=str(clip_export), batch_size=16, num_workers=0)
    assert sorted(p.name for p in out.glob("*.tar")) == [names[0], names[2]]
    assert not summary["complete"] and summary["pending"] == [train_shards[1]] and not (out / SUMMARY).exists()
    monkeypatch.setenv("RANK", "1")
    summary = embed_shards(train_shards, out, clip=str(clip_export), batch_size=16, num_workers=0)
    assert sorted(p.name for p in out.glob("*.tar")) == names
    assert summary["complete"] and summary["written"] == 3 * SAMPLES_PER_SHARD
    assert json.loads((out / SUMMARY).read_text())["shards"] == [str(out / n) for n in names]


def test_user_errors(tmp_path, clip_export, train_shards):
    with pytest.raises(UserError, match="matches no file"):
        embed_shards(str(tmp_path / "none-{0..3}.tar"), tmp_path / "o", clip=str(clip_export))
    with pytest.raises(UserError, match="is not a CLIP folder"):
        embed_shards(train_shards[0], tmp_path / "o", clip=str(tmp_path))
    with pytest.raises(UserError, match="clip='/nowhere/no-clip' does not exist"):
        embed_shards(train_shards[0], tmp_path / "o", clip="/nowhere/no-clip")
    with pytest.raises(UserError, match="format='tar' is unknown"):
        embed_shards(train_shards[0], tmp_path / "o", clip=str(clip_export), format="tar")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot be created"):
        embed_shards(train_shards[0], tmp_path / "file" / "o", clip=str(clip_export))
    with pytest.raises(UserError, match="holds the input shards"):
        embed_shards(train_shards[0], Path(train_shards[0]).parent, clip=str(clip_export))
    assert output_name("pipe:aws s3 cp s3://bucket/laion/00012.tar -") == "00012.tar"
    assert output_name("https://host/shards/00007.tar.gz?token=x") == "00007.tar"
