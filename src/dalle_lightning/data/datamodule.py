"""LightningDataModules over webdataset shards: any img2dataset output, and the embedded Shapes set."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader

from dalle_lightning.data import shapes
from dalle_lightning.data.shards import SampleDecoder, eval_pipeline, expand_shards, train_pipeline
from dalle_lightning.errors import UserError

log = logging.getLogger(__name__)


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

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def batches_per_worker(self) -> int:
        """Training batches each worker yields per epoch, so that all ranks together see samples_per_epoch."""
        streams = self.world_size * max(1, self.num_workers)
        return max(1, math.ceil(self.samples_per_epoch / (self.batch_size * streams)))

    def _decoder(self, random_crop: bool = False) -> SampleDecoder:
        context_length = self.context_length or getattr(self.tokenizer, "model_max_length", 77)
        return SampleDecoder(
            self.image_size,
            self.min_image_size,
            self.tokenizer,
            context_length,
            self.npy_fields,
            random_crop,
            self.seed,
        )

    def _loader(self, pipeline, num_workers: int) -> DataLoader:
        on_gpu = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=on_gpu,
            persistent_workers=False,
            prefetch_factor=4 if num_workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        pipeline = train_pipeline(
            self.train_urls,
            self._decoder(self.random_crop),
            self.batch_size,
            self.batches_per_worker(),
            self.shuffle_buffer,
            self.seed,
            self.num_workers,
        )
        return self._loader(pipeline, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        limit = self.val_samples
        # One worker reads the validation shards in order, so "the first val_samples" is well defined.
        pipeline = eval_pipeline(self.val_urls, self._decoder(), self.val_batch_size, limit)
        return self._loader(pipeline, min(1, self.num_workers))

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # Images travel as uint8 (4x less to copy); they become floats in [-1, 1] on the device.
        if "image" in batch and batch["image"].dtype == torch.uint8:
            batch["image"] = batch["image"].float().div_(127.5).sub_(1.0)
        return batch


class ShapesDataModule(ShardDataModule):
    """The embedded Shapes data set: rendered into real shards on first use, then read like any other."""

    def __init__(
        self,
        root: str,
        num_train: int = 20_000,
        num_val: int = 1000,
        render_size: int = 64,
        render_seed: int = 0,
        samples_per_shard: int = 1000,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.build_args = dict(
            num_train=num_train,
            num_val=num_val,
            size=render_size,
            seed=render_seed,
            samples_per_shard=samples_per_shard,
        )

    def prepare_data(self) -> None:
        shapes.build(self.root, **self.build_args)

    def setup(self, stage: str | None = None) -> None:
        manifest = shapes.build(self.root, **self.build_args)  # instant when already built
        self.train_shards = manifest["shards"]["train"]
        self.val_shards = manifest["shards"]["val"]
        super().setup(stage)
