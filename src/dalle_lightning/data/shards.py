"""Webdataset pipelines over img2dataset shards: which shards, in which order, split how, decoded how.

Sources are brace patterns (`shards/{00000..00099}.tar`), globs, `pipe:` commands (`pipe:aws s3 cp ... -`),
URLs, or lists of these. Training reads an infinite resampled stream (deterministic per rank and worker)
cut into epochs; validation reads every sample once, in order, split across ranks sample by sample so that
even a single validation shard serves every rank.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info, pytorch_worker_seed

from dalle_lightning.data.decode import (
    SkipCounter,
    SkipSample,
    decode_caption,
    decode_image,
    decode_json,
    decode_npy,
    image_member,
)
from dalle_lightning.errors import UserError

log = logging.getLogger(__name__)

_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "ais://", "hf://")


def expand_shards(spec: str | Sequence[str], name: str = "shards") -> list[str]:
    """Expand a shard source spec into a list of URLs; local paths must exist.

    A pattern that matches no file is a `UserError` naming it. Missing files among existing ones (failed
    img2dataset shards) are dropped with a warning.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise UserError(f"{name} is empty: set it to a shard pattern, e.g. {name}='shards/{{00000..00009}}.tar'")
    patterns = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for pattern in patterns:
        expanded = wds.shardlists.expand_urls(pattern)
        if any(u.startswith(_REMOTE_PREFIXES) for u in expanded):
            urls.extend(expanded)
            continue
        local: list[str] = []
        for path in expanded:
            path = os.path.expanduser(path.removeprefix("file:"))
            local.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
        present = [p for p in local if os.path.isfile(p)]
        if not present:
            example = f" (first: '{local[0]}')" if local else ""
            raise UserError(f"{name}: '{pattern}' matches no file{example}; check the path and the brace range")
        if len(present) < len(local):
            log.warning(
                "%s: %d of %d shards of '%s' are missing; using the rest",
                name,
                len(local) - len(present),
                len(local),
                pattern,
            )
        urls.extend(present)
    return urls


def stable_id(text: str) -> int:
    """A stable integer id for a string (same in every process), to compare captions across ranks."""
    return zlib.crc32(text.encode("utf-8"))


class SampleDecoder:
    """Decodes raw samples into training fields and collates them into batches, counting what it skips.

    One instance lives in each data-loader worker (copied at fork), so its counter needs no locking;
    every batch carries the counts of what was skipped since the previous batch (`batch["skipped"]`).
    """

    def __init__(
        self,
        image_size: int | None,
        min_image_size: int,
        tokenizer: Callable | None = None,
        context_length: int = 77,
        npy_fields: Sequence[str] = (),
        random_crop: bool = False,
        seed: int = 0,
    ):
        self.image_size = image_size
        self.min_image_size = min_image_size
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.npy_fields = tuple(npy_fields)
        self.random_crop = random_crop
        self.seed = seed
        self.counter = SkipCounter()
        self._rng: random.Random | None = None

    def handler(self, exn: Exception) -> bool:
        """webdataset error handler for unreadable shards (missing, corrupt, truncated): skip to the next."""
        self.counter.add("bad_shard")
        log.warning("skipping unreadable shard data: %s", str(exn)[:300])
        return True

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"key": sample.get("__key__", "")}
        meta = decode_json(sample.get("json"))
        if self.image_size is not None:
            if self._rng is None:
                self._rng = random.Random(self.seed * 100_003 + pytorch_worker_seed())
            out["image"] = decode_image(
                image_member(sample), self.image_size, self.min_image_size, self.random_crop, self._rng
            )
        caption = decode_caption(sample.get("txt"))
        out["caption"] = caption
        out["meta"] = meta
        out["group"] = str(meta.get("group") or caption)
        out["heldout"] = bool(meta.get("heldout", False))
        for name in self.npy_fields:
            member = sample.get(f"{name}.npy", sample.get(name))
            if member is None:
                raise SkipSample("missing_npy")
            out[name] = decode_npy(member)
        return out

    def samples(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            try:
                yield self.decode(sample)
            except SkipSample as skip:
                self.counter.add(skip.reason)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [s["caption"] for s in samples]
        batch: dict[str, Any] = {
            "key": [s["key"] for s in samples],
            "caption": captions,
            "meta": [s["meta"] for s in samples],
            "caption_id": torch.tensor([stable_id(c) for c in captions], dtype=torch.int64),
            "group_id": torch.tensor([stable_id(s["group"]) for s in samples], dtype=torch.int64),
            "heldout": torch.tensor([s["heldout"] for s in samples], dtype=torch.bool),
        }
        if self.image_size is not None:
            batch["image"] = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2)
        if self.tokenizer is not None:
            tokens = self.tokenizer(
                captions, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
            )
            batch["input_ids"] = tokens["input_ids"]
            batch["attention_mask"] = tokens["attention_mask"]
        for name in self.npy_fields:
            stacked = np.stack([s[name] for s in samples])  # float16 embeddings become float32; ids stay ints
            batch[name] = torch.from_numpy(stacked.astype(np.float32 if stacked.dtype.kind == "f" else np.int64))
        batch["skipped"] = self.counter.pop()
        return batch

    def batches(self, src: Iterable[dict[str, Any]], batch_size: int, partial: bool) -> Iterator[dict]:
        pending: list[dict[str, Any]] = []
        for sample in self.samples(src):
            pending.append(sample)
            if len(pending) == batch_size:
                yield self.collate(pending)
                pending = []
        if pending and partial:
            yield self.collate(pending)


def train_pipeline(
    urls: list[str],
    decoder: SampleDecoder,
    batch_size: int,
    batches_per_worker: int,
    shuffle_buffer: int,
    seed: int,
    num_workers: int = 1,
) -> wds.DataPipeline:
    """Infinite resampled stream, shuffled, batched, cut into epochs of `batches_per_worker` batches.

    Shard choice is seeded by (seed, rank, worker, epoch), so each rank and worker reads its own,
    reproducible sequence; no node splitter is needed because every rank draws its own shards.
    """
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        wds.tarfile_to_samples(handler=decoder.handler),
        wds.detshuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed),
        lambda src: decoder.batches(src, batch_size, partial=False),
    ).with_epoch(batches_per_worker)
    with warnings.catch_warnings():  # it warns that a length does not cut the epoch: with_epoch does that
        warnings.simplefilter("ignore", UserWarning)
        # The epoch's length in batches over all workers, for progress bars and LR schedules.
        return pipeline.with_length(batches_per_worker * max(1, num_workers))


def _rank_slice(src: Iterable[dict], limit: int | None) -> Iterator[dict]:
    """Sample i goes to rank i % world_size; stops after `limit` samples in all."""
    rank, world_size, _, _ = pytorch_worker_info()
    for index, sample in enumerate(src):
        if limit is not None and index >= limit:
            return
        if index % world_size == rank:
            yield sample


def eval_pipeline(urls: list[str], decoder: SampleDecoder, batch_size: int, limit: int | None) -> wds.DataPipeline:
    """Every sample once, in shard order, split across ranks sample by sample (use at most one worker)."""
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=decoder.handler),
        lambda src: _rank_slice(src, limit),
        lambda src: decoder.batches(src, batch_size, partial=True),
    )
