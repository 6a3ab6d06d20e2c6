"""The LightningDataModules: the training-stream logic they share (epochs of a fixed length, exact resume), the one
over webdataset shards (any img2dataset output, embed.py's embedding shards too) and the one over clip-retrieval
embedding folders (LAION's published embeddings, embed.py's format=clip_retrieval)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, IterableDataset

from dalle_lightning.data.clip_retrieval import (
    Batcher,
    EmbeddingStream,
    EvalStream,
    Part,
    PartReader,
    make_chunks,
    npy_shape,
    scan_folder,
)
from dalle_lightning.data.shards import SampleDecoder, TrainStream, eval_pipeline, expand_shards
from dalle_lightning.errors import UserError

log = logging.getLogger(__name__)


class TrainLoader(DataLoader):
    """The training DataLoader: before each pass it sets the stream's epoch, and after a resume it skips the
    batches the interrupted run had already trained on, so that the run goes on with the very next batch.

    A stream that can start at any batch (it has `start_batch`) is told where; any other is read and the batches
    dropped (a shuffled tar stream cannot seek: at most one epoch of loading with no training compute).
    """

    def __init__(self, stream: IterableDataset, position: Callable[[], tuple[int, int]], **kwargs: Any):
        super().__init__(stream, batch_size=None, **kwargs)
        self.position = position

    def __iter__(self):
        epoch, skip = self.position()
        self.dataset.epoch = epoch
        if hasattr(self.dataset, "start_batch"):
            self.dataset.start_batch = skip
            return super().__iter__()
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        return iterator


class StreamDataModule(L.LightningDataModule):
    """What the training streams share: epochs of `samples_per_epoch` samples over all ranks and loader workers,
    the loader options, and the position in the stream saved in every checkpoint for an exact resume."""

    def __init__(self, batch_size: int, num_workers: int, samples_per_epoch: int, seed: int):
        super().__init__()
        if batch_size < 1 or samples_per_epoch < batch_size:
            raise UserError(
                f"data.batch_size={batch_size} and data.samples_per_epoch={samples_per_epoch}: "
                "need batch_size >= 1 and samples_per_epoch >= batch_size"
            )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self._resume_position: tuple[int, int] | None = None

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def global_rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def batches_per_worker(self) -> int:
        """Training batches each worker yields per epoch, so that all ranks together see samples_per_epoch."""
        streams = self.world_size * max(1, self.num_workers)
        return max(1, math.ceil(self.samples_per_epoch / (self.batch_size * streams)))

    def _loader_options(self, num_workers: int) -> dict[str, Any]:
        on_gpu = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return dict(
            num_workers=num_workers,
            pin_memory=on_gpu,
            persistent_workers=False,
            prefetch_factor=4 if num_workers else None,
            # Worker seeds from a generator of their own, not the global RNG, so that making an iterator does
            # not shift the random numbers of training steps (which a resumed run restores exactly).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches to skip) for the training pass that is starting."""
        if self._resume_position is not None:
            position, self._resume_position = self._resume_position, None
            return position
        return (self.trainer.current_epoch if self.trainer is not None else 0), 0

    # Where the training stream stands, saved in every checkpoint (Lightning calls these for datamodules).
    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            return {}
        trained = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_epoch": self.trainer.current_epoch, "train_batches": trained}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_epoch" not in state_dict:
            return
        epoch, batches = int(state_dict["train_epoch"]), int(state_dict["train_batches"])
        per_epoch = self.batches_per_worker() * max(1, self.num_workers)
        # A checkpoint from the end of an epoch resumes with the next epoch's first batch.
        self._resume_position = (epoch + 1, 0) if batches >= per_epoch else (epoch, batches)


class ShardDataModule(StreamDataModule):
    """Text-image (and embedding) batches from img2dataset-format shards.

    Batches hold `image` (uint8 on the loader side, float in [-1, 1] once on the device), `caption`, `meta`
    (the sample's json),
    `input_ids`/`attention_mask` (when a tokenizer is given), `caption_id`/`group_id` (stable ids; the
    optional json field `group` marks captions that any image of the group answers), `heldout` (optional
    json field), any `npy_fields`, and `skipped` (counts of skipped samples by reason).
    """

    def __init__(
        self,
        train_shards: str | Sequence[str] | None = None,
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int | None = 64,
        min_image_size: int | None = None,
        random_crop: bool = False,
        samples_per_epoch: int = 10_000,
        val_samples: int | None = 1000,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        npy_fields: Sequence[str] = (),
        tokenizer: Callable | None = None,
        context_length: int | None = None,
        max_failed_shards: int = 20,
        max_skipped_in_a_row: int = 5000,
    ):
        if image_size is not None and image_size < 8:
            raise UserError(f"data.image_size={image_size} is too small: use at least 8 (e.g. 64)")
        super().__init__(batch_size, num_workers, samples_per_epoch, seed)
        self.train_shards, self.val_shards = train_shards, val_shards
        self.val_batch_size = val_batch_size or batch_size
        self.val_samples = val_samples
        self.shuffle_buffer = shuffle_buffer
        self.tokenizer = tokenizer  # may be set later, before the loaders are made
        self.context_length = context_length
        self.max_failed_shards = max_failed_shards
        self.max_skipped_in_a_row = max_skipped_in_a_row
        self.image_size = image_size
        self.min_image_size = min_image_size or (image_size // 2 if image_size else 1)
        self.npy_fields = tuple(npy_fields)
        self.random_crop = random_crop
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_urls = expand_shards(self.train_shards, "data.train_shards")
        if self.val_shards:
            self.val_urls = expand_shards(self.val_shards, "data.val_shards")

    def captions(self, limit: int) -> Iterator[str]:
        """Up to `limit` training captions in shard order (reads only the text members), e.g. for a tokenizer."""
        self.prepare_data()
        self.setup("fit")
        decoder = SampleDecoder(image_size=None, min_image_size=1)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.train_urls),
            wds.tarfile_to_samples(handler=decoder.handler, select_files=lambda name: name.endswith(".txt")),
            decoder.samples,
        )
        for sample in itertools.islice(pipeline, limit):
            yield sample["caption"]

    def _decoder(self, random_crop: bool = False, count_bad_shards: bool = True) -> SampleDecoder:
        context_length = self.context_length or getattr(self.tokenizer, "model_max_length", 77)
        return SampleDecoder(
            self.image_size,
            self.min_image_size,
            self.tokenizer,
            context_length,
            self.npy_fields,
            random_crop,
            self.seed,
            self.max_failed_shards,
            count_bad_shards,
            self.max_skipped_in_a_row,
        )

    def train_dataloader(self) -> DataLoader:
        stream = TrainStream(
            self.train_urls,
            self._decoder(self.random_crop),
            self.batch_size,
            self.batches_per_worker(),
            self.shuffle_buffer,
            self.seed,
            self.num_workers,
        )
        return TrainLoader(stream, self._train_position, **self._loader_options(self.num_workers))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        limit = self.val_samples
        # One worker reads the validation shards in order, so "the first val_samples" is well defined.
        rank = self.global_rank
        pipeline = eval_pipeline(self.val_urls, self._decoder(count_bad_shards=rank == 0), self.val_batch_size, limit)
        return DataLoader(pipeline, batch_size=None, **self._loader_options(min(1, self.num_workers)))

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # Images travel as uint8 (4x less to copy); they become floats in [-1, 1] on the device.
        if "image" in batch and batch["image"].dtype == torch.uint8:
            batch["image"] = batch["image"].float().div_(127.5).sub_(1.0)
        return batch


class ClipRetrievalDataModule(StreamDataModule):
    """The prior's batches from a clip-retrieval folder (see `data.clip_retrieval`): `img_emb`, `txt_emb` (float32,
    L2-normalised), with `captions` also `txt_ids` (the captions tokenized by the CLIP's tokenizer, which the stage
    sets as `tokenizer`); validation batches add `caption`, `group_id` (from a `group` column, else the caption)
    and `heldout` (from a `heldout` column, else false). Every batch carries `skipped` (non-finite rows dropped).

    Validation rows: the part `val_part`, or the global rows `val_rows` = [start, stop) (parts in order), or by
    default the last `val_samples` rows; the first `val_samples` of them are read, and never trained on.
    """

    def __init__(
        self,
        path: str,
        captions: bool = False,
        batch_size: int = 512,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        samples_per_epoch: int = 1_000_000,
        val_samples: int | None = 2000,
        val_part: str | int | None = None,
        val_rows: Sequence[int] | None = None,
        shuffle_buffer: int = 20_000,
        chunk_rows: int = 1 << 20,
        seed: int = 0,
        tokenizer: Any = None,
        context_length: int | None = None,
    ):
        super().__init__(batch_size, num_workers, samples_per_epoch, seed)
        self.path, self.captions = path, bool(captions)
        self.val_batch_size = val_batch_size or batch_size
        self.val_samples = val_samples
        self.val_part, self.val_rows = val_part, val_rows
        self.shuffle_buffer, self.chunk_rows = shuffle_buffer, chunk_rows
        self.tokenizer, self.context_length = tokenizer, context_length
        self.parts: list[Part] = []
        self.train_ranges: list[tuple[int, int]] = []
        self.val_range: tuple[int, int] = (0, 0)

    @property
    def embedding_dim(self) -> int:
        return int(npy_shape(self.parts[0].img_emb)[0][1])

    def check_embedding_dim(self, dim: int, option: str) -> None:
        """One line naming the first part's file when the folder's width is not `dim` (the CLIP's)."""
        if self.embedding_dim != dim:
            raise UserError(
                f"{self.parts[0].img_emb} holds {self.embedding_dim}-wide embeddings but {option} is {dim}-wide: "
                f"these embeddings come from another CLIP; set {option} to that CLIP or point data.path elsewhere"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.parts:
            return
        self.parts = scan_folder(self.path)
        total = self.parts[-1].start + self.parts[-1].rows
        if self.val_part is not None:
            wanted = str(self.val_part)
            same = lambda name: name == wanted or (name.isdigit() and wanted.isdigit() and int(name) == int(wanted))  # noqa: E731
            part = next((p for p in self.parts if same(p.name)), None)
            if part is None:
                names = ", ".join(p.name for p in self.parts[:5])
                raise UserError(f"data.val_part={self.val_part} is not a part of data.path (parts: {names}, ...)")
            self.val_range = (part.start, part.start + part.rows)
        elif self.val_rows is not None:
            lo, hi = (int(v) for v in self.val_rows)
            if not 0 <= lo < hi <= total:
                raise UserError(f"data.val_rows={list(self.val_rows)}: give [start, stop] within the {total} rows")
            self.val_range = (lo, hi)
        else:
            self.val_range = (total - min(int(self.val_samples or 0), total // 2), total)
        lo, hi = self.val_range
        self.train_ranges = [r for r in ((0, lo), (hi, total)) if r[1] > r[0]]
        if sum(b - a for a, b in self.train_ranges) < self.batch_size:
            raise UserError(
                f"data.path holds {total - (hi - lo)} training rows besides the validation rows, fewer than "
                f"data.batch_size={self.batch_size}: use a smaller batch or more data"
            )
        log.info(
            "%s: %d parts, %d rows (%d for validation), %d-wide embeddings",
            self.path,
            len(self.parts),
            total,
            hi - lo,
            self.embedding_dim,
        )

    def _batcher(self) -> Batcher:
        return Batcher(PartReader(self.parts), self.captions, self.tokenizer, self.context_length)

    def train_dataloader(self) -> DataLoader:
        streams = self.world_size * max(1, self.num_workers)
        rows = sum(b - a for a, b in self.train_ranges)
        # Every stream needs a chunk of its own in every cycle.
        chunk_rows = max(1, min(self.chunk_rows, rows // streams))
        if rows < streams:
            raise UserError(f"data.path has {rows} training rows, fewer than the {streams} streams (ranks x workers)")
        stream = EmbeddingStream(
            self._batcher(),
            make_chunks(self.parts, self.train_ranges, chunk_rows),
            self.batch_size,
            self.batches_per_worker(),
            self.shuffle_buffer,
            self.seed,
            self.global_rank,
            self.world_size,
            self.num_workers,
        )
        return TrainLoader(stream, self._train_position, **self._loader_options(self.num_workers))

    def val_dataloader(self) -> DataLoader | list:
        lo, hi = self.val_range
        if hi <= lo or not self.val_samples:
            return []
        rows = np.arange(lo, min(hi, lo + int(self.val_samples)), dtype=np.int64)
        stream = EvalStream(self._batcher(), rows, self.val_batch_size, self.global_rank, self.world_size)
        return DataLoader(stream, batch_size=None, **self._loader_options(min(1, self.num_workers)))
