"""clip-retrieval / LAION embedding folders for the prior: the reader (memory-mapped, disjoint rows per rank, shuffled,
exact resume, NaN rows skipped), one-line errors for bad folders, and train.py on such a folder in both modes,
resumed after kill -9, then the whole chain fed by the prior it trained."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, csv_losses, lines_starting, run_train, write_stage_export
from dalle_lightning.data.clip_retrieval import EmbeddingStream, make_chunks, write_part
from dalle_lightning.data.datamodule import ClipRetrievalDataModule
from dalle_lightning.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = (97, 150, 61)  # three parts of unequal size, as a real folder's last part is


def unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def laion_folder(root: Path, dim: int = 32, sizes=SIZES, seed: int = 0) -> dict[str, np.ndarray]:
    """A folder as LAION published its embeddings: random unit-norm float16 rows, zero-padded part names, parquet
    captions (and a url column) of which row i says "... sample <global row>". Returns every row, parts in order."""
    rng = np.random.default_rng(seed)
    img, txt, start = [], [], 0
    for index, rows in enumerate(sizes):
        captions = [f"a red circle, sample {start + i}" for i in range(rows)]
        metadata = pa.table({"url": [f"https://x/{start + i}.jpg" for i in range(rows)], "caption": captions})
        img.append(unit(rng, rows, dim))
        txt.append(unit(rng, rows, dim))
        write_part(root, f"{index:04d}", img[-1], txt[-1], metadata)
        start += rows
    return {"img_emb": np.concatenate(img), "txt_emb": np.concatenate(txt)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("laion") / "emb"
    return root, laion_folder(root)


def sample_ids(batch: dict, table: dict[str, np.ndarray]) -> np.ndarray:
    """Which rows of the folder a batch holds, found from its image embeddings (rows are random: no two alike)."""
    reference = torch.from_numpy(table["img_emb"].astype(np.float32))
    reference = reference / reference.norm(dim=-1, keepdim=True)
    return (batch["img_emb"] @ reference.T).argmax(1).numpy()


def datamodule(root: Path, **options) -> ClipRetrievalDataModule:
    defaults = dict(batch_size=8, num_workers=0, samples_per_epoch=96, val_samples=20, shuffle_buffer=32)
    dm = ClipRetrievalDataModule(str(root), **{**defaults, **options})
    dm.setup("fit")
    return dm


def test_every_training_row_once_per_cycle_and_each_rank_its_own(folder):
    root, _ = folder
    dm = datamodule(root)
    assert [p.rows for p in dm.parts] == list(SIZES) and dm.val_range == (288, 308) and dm.embedding_dim == 32
    world, workers = 2, 3
    chunks = make_chunks(dm.parts, dm.train_ranges, max(1, 288 // (world * workers)))
    assert {(c.start, c.stop) for c in chunks if c.start < 97 < c.stop} == set()  # chunks never cross a part's end
    streams = [
        EmbeddingStream(dm._batcher(), chunks, 8, 2, 32, seed=0, rank=rank, world_size=world, num_workers=workers)
        for rank in range(world)
    ]
    for cycle in range(2):
        seen = []
        for stream in range(world * workers):
            firsts, counts = streams[stream // workers]._cycle(stream, cycle)
            seen += [row for first, count in zip(firsts, counts) for row in range(first, first + count)]
        assert sorted(seen) == list(range(288))  # each training row once, none of the validation rows
    # The shuffled order of a stream is a permutation of its unshuffled rows, and not their order.
    stream = streams[1]
    plain, shuffled = stream.rows(4, 0, 64), np.concatenate([stream.window_rows(4, w) for w in (0, 1)])
    assert sorted(plain) == sorted(shuffled) and not np.array_equal(plain, shuffled)


@pytest.mark.parametrize("captions", [False, True])
def test_batches_line_up_with_their_captions_and_resume_exactly(folder, pretrained_clips, captions):
    from dalle_lightning.export import tokenizer_of_clip

    root, table = folder
    tokenizer = tokenizer_of_clip(None, pretrained_clips["towers"]) if captions else None
    dm = datamodule(root, num_workers=2, captions=captions, tokenizer=tokenizer)
    full = list(dm.train_dataloader())
    assert len(full) == 12 and all(b["img_emb"].shape == (8, 32) and b["img_emb"].dtype == torch.float32 for b in full)
    ids = np.concatenate([sample_ids(b, table) for b in full])
    assert len(set(ids)) == len(ids) and ids.max() < 288  # 96 different training rows, no validation row
    assert not np.array_equal(ids, np.sort(ids))  # shuffled
    batch, rows = full[0], sample_ids(full[0], table)
    expected_txt = torch.from_numpy(table["txt_emb"][rows].astype(np.float32))
    assert torch.allclose(batch["txt_emb"], expected_txt / expected_txt.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(batch["img_emb"].norm(dim=-1), torch.ones(8), atol=1e-6)  # "unit", as stored
    if captions:
        expected = tokenizer([f"a red circle, sample {r}" for r in rows], padding="max_length", max_length=24)
        assert batch["txt_ids"].tolist() == expected["input_ids"] and batch["txt_ids"].shape == (8, 24)
    else:
        assert "txt_ids" not in batch

    for skip in (1, 5):  # resumed mid-epoch: the same batches from the next one on, none read twice
        dm._resume_position = (0, skip)
        resumed = list(dm.train_dataloader())
        assert len(resumed) == len(full) - skip
        assert all(torch.equal(a["img_emb"], b["img_emb"]) for a, b in zip(resumed, full[skip:]))
    dm._resume_position = (1, 0)
    second = np.concatenate([sample_ids(b, table) for b in dm.train_dataloader()])
    assert not set(second) & set(ids)  # the next epoch goes on through the cycle


def test_rows_with_nan_or_inf_are_skipped_and_counted(tmp_path):
    table = laion_folder(tmp_path, sizes=(40, 40))
    bad = {3: np.nan, 17: np.inf, 50: -np.inf}
    img = np.load(tmp_path / "img_emb" / "img_emb_0000.npy")
    txt = np.load(tmp_path / "text_emb" / "text_emb_0001.npy")
    img[3, 5], img[17, 0], txt[50 - 40, 7] = bad[3], bad[17], bad[50]
    np.save(tmp_path / "img_emb" / "img_emb_0000.npy", img)
    np.save(tmp_path / "text_emb" / "text_emb_0001.npy", txt)
    dm = datamodule(tmp_path, val_samples=0, samples_per_epoch=80, batch_size=8, shuffle_buffer=80)
    batches = list(dm.train_dataloader())
    skipped = sum(b["skipped"].get("nonfinite_embedding", 0) for b in batches)
    rows = np.concatenate([sample_ids(b, table) for b in batches])
    assert skipped == 3 and len(rows) == 77 and not set(bad) & set(rows)
    assert all(torch.isfinite(b["img_emb"]).all() and torch.isfinite(b["txt_emb"]).all() for b in batches)
    from dalle_lightning.data.decode import SKIP_REASONS

    assert "nonfinite_embedding" in SKIP_REASONS  # logged as data/skipped/nonfinite_embedding


def test_validation_rows_by_part_by_range_or_the_last_ones(folder):
    root, table = folder
    dm = datamodule(root, val_part=1)  # as Hydra reads data.val_part=0001
    assert dm.val_range == (97, 247) and dm.train_ranges == [(0, 97), (247, 308)]
    assert datamodule(root, val_rows=[10, 30]).val_range == (10, 30)
    dm = datamodule(root, val_samples=20, val_batch_size=16)
    batches = list(dm.val_dataloader())
    assert [len(b["caption"]) for b in batches] == [16, 4]
    assert batches[0]["caption"][0] == "a red circle, sample 288"
    assert batches[0]["group_id"].dtype == torch.int64 and not batches[0]["heldout"].any()
    assert sample_ids(batches[1], table).tolist() == [304, 305, 306, 307]


def test_bad_folders_are_one_line_errors(folder, tmp_path):
    root, _ = folder

    def broken(name: str) -> Path:
        return shutil.copytree(root, tmp_path / name)

    def error(path: Path, **options) -> str:
        with pytest.raises(UserError) as err:
            datamodule(path, **options)
        assert "\n" not in str(err.value)
        return str(err.value)

    no_img = broken("no_img")
    shutil.rmtree(no_img / "img_emb")
    assert "has no img_emb/ folder" in error(no_img) and "clip-retrieval output" in error(no_img)

    empty = tmp_path / "empty"
    for sub in ("img_emb", "text_emb", "metadata"):
        (empty / sub).mkdir(parents=True)
    assert "holds no img_emb_<part>.npy: the folder is empty" in error(empty)

    uneven = broken("uneven")
    np.save(uneven / "text_emb" / "text_emb_0001.npy", np.zeros((149, 32), np.float16))
    message = error(uneven)
    assert "part 0001" in message and "img_emb_0001.npy has 150 rows, text_emb_0001.npy 149" in message

    no_caption = broken("no_caption")
    pq.write_table(pa.table({"url": ["x"] * 61}), no_caption / "metadata" / "metadata_0002.parquet")
    message = error(no_caption)
    assert "metadata_0002.parquet has no caption column (columns: url)" in message

    pickled = broken("pickled")
    np.save(pickled / "img_emb" / "img_emb_0000.npy", np.array([{"a": 1}] * 97, dtype=object), allow_pickle=True)
    assert "img_emb_0000.npy holds a object array" in error(pickled)

    missing = broken("missing")
    (missing / "metadata" / "metadata_0001.parquet").unlink()
    assert "metadata_0001.parquet is missing" in error(missing)

    assert "data.val_part=7 is not a part" in error(root, val_part=7)
    dm = datamodule(root)
    with pytest.raises(UserError) as err:
        dm.check_embedding_dim(768, "stage.clip")
    assert "img_emb_0000.npy holds 32-wide embeddings but stage.clip is 768-wide" in str(err.value)
    with pytest.raises(UserError, match="needs the CLIP's tokenizer"):
        list(datamodule(root, captions=True).train_dataloader())


# --- train.py on a LAION-style folder --------------------------------------------------------------------------

STEPS = 14


def prior_args(tmp: Path, root: Path, clip: Path, captions: bool, name: str) -> list[str]:
    # Two loader workers, epochs of 5 batches with validation between them, warmup + cosine LR, EMA: the resumed
    # span crosses an epoch's end.
    return [
        "stage=prior",
        f"stage.clip={clip}",
        "data=clip_retrieval",
        f"data.path={root}",
        f"model.prior.text_tokens={captions}",
        "model.prior.stats_batches=2",
        "model.prior.sample_steps=2",
        "model.prior.candidates=1",
        "trainer=cpu",
        f"trainer.max_steps={STEPS}",
        "trainer.max_epochs=-1",
        "trainer.log_every_n_steps=1",
        "+trainer.num_sanity_val_steps=1",
        "data.batch_size=16",
        "data.samples_per_epoch=160",
        "data.val_samples=20",
        "data.num_workers=2",
        "data.shuffle_buffer=64",
        "scheduler.warmup_steps=3",
        "callbacks.last_checkpoint.every_n_train_steps=4",
        f"paths.log_dir={tmp}/outputs",
        f"paths.export_dir={tmp}/export-{name}",
        "logger=csv",
        f"run_name={name}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("captions", [False, True], ids=["text_embedding_only", "caption_tokens"])
def test_train_py_trains_the_prior_on_the_folder_and_resumes_after_kill_9(folder, pretrained_clips, tmp_path, captions):
    root, _ = folder
    clip = pretrained_clips["towers" if captions else "text_only"]  # LAION's prior needs no image tower at all
    whole = run_train(prior_args(tmp_path, root, clip, captions, "whole"), tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    losses = csv_losses(tmp_path / "outputs" / "prior" / "runs" / "whole")
    assert sorted(losses) == list(range(STEPS))
    metrics = json.loads((tmp_path / "outputs" / "prior" / "runs" / "whole" / "metrics.json").read_text())
    assert -1 <= metrics["val/cos_sampled"] <= 1 and metrics["data/skipped/nonfinite_embedding"] == 0
    export = tmp_path / "export-whole" / "prior"
    manifest = json.loads((export / "dalle_lightning.json").read_text())
    assert json.loads((export / "prior_config.json").read_text())["embeddings"] == "unit"
    assert manifest["config"]["stage"]["clip"] == manifest["clip"] == str(clip)
    assert manifest["embeddings"] == {"convention": "unit", "dim": 32}

    killed = run_train(
        [
            *prior_args(tmp_path, root, clip, captions, "killed"),
            "+callbacks.kill._target_=test_resume.KillAtStep",
            "+callbacks.kill.step=10",
        ],
        tmp_path,
        env={"PYTHONPATH": str(ROOT / "tests")},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoint = tmp_path / "outputs" / "prior" / "runs" / "killed" / "checkpoints" / "last.ckpt"
    resumed = run_train([*prior_args(tmp_path, root, clip, captions, "resumed"), f"ckpt_path={checkpoint}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = csv_losses(tmp_path / "outputs" / "prior" / "runs" / "resumed")
    assert sorted(after) == list(range(8, STEPS)), sorted(after)
    assert max(abs(loss - losses[step]) for step, loss in after.items()) <= 1e-6


@pytest.mark.slow
def test_embeddings_of_another_clip_are_one_line_from_train_py(folder, tiny_clip_export, tmp_path):
    root, _ = folder  # 32-wide; the CLIP export projects to 128
    result = run_train(prior_args(tmp_path, root, tiny_clip_export, False, "other"), tmp_path)
    lines = lines_starting(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "img_emb_0000.npy holds 32-wide embeddings but stage.clip is 128-wide" in lines[0]


@pytest.mark.slow
def test_the_chain_hands_laion_style_embeddings_through_in_one_convention(folder, pretrained_clips, tmp_path):
    """A prior trained by train.py on unit-norm float16 embeddings, a decoder on the same CLIP: prompts go through
    text embedding (unit) → prior → image embedding (unit) → the decoder, which gets them in its convention."""
    from dalle_lightning.pipeline import UnCLIPPipeline

    root, _ = folder
    clip = pretrained_clips["towers"]
    args = prior_args(tmp_path, root, clip, False, "chain")
    result = run_train([a for a in args if "last_checkpoint" not in a], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    decoder = write_stage_export("decoder", clip, tmp_path, ["model.decoder.sample_steps=2"])
    assert json.loads((decoder / "decoder_config.json").read_text())["embeddings"] == "unit"
    pipe = UnCLIPPipeline.from_exports(clip, tmp_path / "export-chain" / "prior", decoder, device="cpu")
    assert pipe.prior.clip is pipe.clip and pipe.decoder.clip is pipe.clip  # one CLIP in memory, not one per stage

    received = []
    generate = pipe.decoder.generate

    def recording(image_embeds, *args, **kwargs):
        received.append(image_embeds.clone())
        return generate(image_embeds, *args, **kwargs)

    pipe.decoder.generate = recording
    out = pipe(["a red circle", "two blue squares"], seed=0, progress=False)
    assert out.images.shape == (2, 3, 32, 32) and torch.isfinite(out.images).all()
    assert torch.allclose(received[0].norm(dim=-1), torch.ones(2), atol=1e-5)  # "unit": as trained
    assert torch.allclose(out.image_embeds, received[0])
    # A prior and a decoder of different conventions do not fit together: one line naming both.
    pipe.decoder.normalize_embeddings = False  # as Karlo's decoder: embeddings as CLIP projects them
    with pytest.raises(UserError, match="the prior makes L2-normalised image embeddings, the decoder takes"):
        UnCLIPPipeline(pipe.clip, pipe.prior, pipe.decoder)
