"""The LightningDataModule over webdataset shards: any img2dataset output (embed.py's embedding shards too)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
import webdataset as wds
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader

from dalle_lightning.data.shards import SampleDecoder, TrainStream, eval_pipeline, expand_shards
from dalle_lightning.errors import UserError

log = logging.getLogger(__name__)


class TrainLoader(DataLoader):
    """The training DataLoader: before each pass it sets the stream's epoch, and after a resume it skips the
    batches the interrupted run had already trained on, so that the run goes on with the very next batch.

    Skipping re-reads those batches (a shuffled tar stream cannot seek), at most one epoch of loading with
    no training compute.
    """

    def __init__(self, stream: TrainStream, position: Callable[[], tuple[int, int]], **kwargs: Any):
        super().__init__(stream, batch_size=None, **kwargs)
        self.position = position

    def __iter__(self):
        epoch, skip = self.position()
        self.dataset.epoch = epoch
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        return iterator


class ShardDataModule(L.LightningDataModule):
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
        super().__init__()
        if image_size is not None and image_size < 8:
            raise UserError(f"data.image_size={image_size} is too small: use at least 8 (e.g. 64)")
        if batch_size < 1 or samples_per_epoch < batch_size:
            raise UserError(
                f"data.batch_size={batch_size} and data.samples_per_epoch={samples_per_epoch}: "
                "need batch_size >= 1 and samples_per_epoch >= batch_size"
            )
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.val_samples = val_samples
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
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
        self._resume_position: tuple[int, int] | None = None

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

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def batches_per_worker(self) -> int:
        """Training batches each worker yields per epoch, so that all ranks together see samples_per_epoch."""
        streams = self.world_size * max(1, self.num_workers)
        return max(1, math.ceil(self.samples_per_epoch / (self.batch_size * streams)))

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

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        limit = self.val_samples
        # One worker reads the validation shards in order, so "the first val_samples" is well defined.
        rank = self.trainer.global_rank if self.trainer is not None else 0
        pipeline = eval_pipeline(self.val_urls, self._decoder(count_bad_shards=rank == 0), self.val_batch_size, limit)
        return DataLoader(pipeline, batch_size=None, **self._loader_options(min(1, self.num_workers)))

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # Images travel as uint8 (4x less to copy); they become floats in [-1, 1] on the device.
        if "image" in batch and batch["image"].dtype == torch.uint8:
            batch["image"] = batch["image"].float().div_(127.5).sub_(1.0)
        return batch
