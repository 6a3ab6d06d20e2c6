"""Webdataset pipelines over img2dataset shards: which shards, in which order, split how, decoded how.

Sources are brace patterns (`shards/{00000..00099}.tar`), globs, `pipe:` commands (`pipe:aws s3 cp ... -`),
URLs, or lists of these. Training reads an infinite resampled stream (deterministic per rank and worker)
cut into epochs; validation reads every sample once, in order, split across ranks sample by sample so that
even a single validation shard serves every rank.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset
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


# What webdataset reads as a shard: a tar, plain or compressed (tarfile's "r|*").
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")


def expand_shards(spec: str | Sequence[str], name: str = "shards") -> list[str]:
    """Expand a shard source spec into a list of URLs; local paths must exist.

    A pattern that matches no file is a `UserError` naming it. Missing files among existing ones (failed
    img2dataset shards) are dropped with a warning. A glob keeps only tar files (`TAR_SUFFIXES`), so that
    `/data/*` over img2dataset's output skips its `.parquet` and `_stats.json` sidecars (logged); a file named
    outright (a path or a brace pattern) that is not a tar is a `UserError`.
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
        left_out: list[str] = []
        for path in expanded:
            path = os.path.expanduser(path.removeprefix("file:"))
            if not glob.has_magic(path):
                local.append(path)
                continue
            for match in sorted(glob.glob(path)):
                (local if match.endswith(TAR_SUFFIXES) else left_out).append(match)
        if left_out:
            examples = ", ".join(os.path.basename(p) for p in left_out[:3]) + (", ..." if len(left_out) > 3 else "")
            log.info(
                "%s: '%s' matches %d files that are not tar shards, left out: %s",
                name,
                pattern,
                len(left_out),
                examples,
            )
        present = [p for p in local if os.path.isfile(p)]
        if not present:
            example = f" (first: '{local[0]}')" if local else ""
            other = f", only {len(left_out)} other files ('{left_out[0]}', ...)" if left_out else ""
            raise UserError(
                f"{name}: '{pattern}' matches no {'tar ' if left_out else ''}file{example}{other}; "
                "check the path and the brace range"
            )
        if not_tar := [p for p in present if not p.endswith(TAR_SUFFIXES)]:
            raise UserError(
                f"{name}: '{not_tar[0]}' is not a tar shard (shards end in {', '.join(TAR_SUFFIXES)}): name the "
                "shards only, e.g. '/data/{00000..00099}.tar' or '/data/*.tar'"
            )
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


def _this_worker() -> str:
    """Where a loader error happened, for its message: rank and loader worker."""
    rank, world_size, worker, _ = pytorch_worker_info()
    return f"rank {rank} of {world_size} (loader worker {worker})"


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
        max_failed_shards: int = 20,
        count_bad_shards: bool = True,
        max_skipped_in_a_row: int = 5000,
    ):
        self.image_size = image_size
        self.min_image_size = min_image_size
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.npy_fields = tuple(npy_fields)
        self.random_crop = random_crop
        self.seed = seed
        self.counter = SkipCounter()
        # Unreadable shards in a row since the last usable sample: past `max_failed_shards` the source is
        # broken, not unlucky, and the resampled training stream would retry it forever (and under DDP the
        # other ranks would wait for this one in their next collective until the job's time limit).
        self.max_failed_shards = max_failed_shards
        self.failed_shards = 0
        # Validation reads every shard on every rank: only one rank counts unreadable ones, so the summed
        # data/skipped/bad_shard is the number of bad shards, not that times the world size.
        self.count_bad_shards = count_bad_shards
        # Samples skipped since the last usable one, by reason: thousands in a row mean the data does not fit the
        # stage at all (images smaller than its size, no embeddings in the shards), and the resampled training
        # stream would skip forever without yielding a batch.
        self.max_skipped_in_a_row = max_skipped_in_a_row
        self.skipped_in_a_row: Counter[str] = Counter()
        # Random crops draw from this; the training stream reseeds it per (seed, epoch, rank, worker).
        self.rng: random.Random | None = None

    def handler(self, exn: Exception) -> bool:
        """webdataset error handler for unreadable shards (missing, corrupt, truncated, a failing `pipe:`
        command): count the shard once and go on with the next one.

        Which webdataset stage caught the error decides what "go on" means. In the member loop
        (`tar_file_iterator`) a failed read leaves the tar stream at an unknown position, so that shard is
        abandoned (False ends only its loop; webdataset then closes the shard's last sample at the shard's end
        instead of merging it with the next shard's first, and the same failure is not caught and counted a
        second time one level up). A duplicate member name (`group_by_keys`) is not an unreadable shard: the
        sample keeps its first member and reading goes on.
        """
        message = " ".join(str(exn).split())[:300]
        stage = exn.__traceback__.tb_frame.f_code.co_name if exn.__traceback__ is not None else ""
        if stage == "group_by_keys":
            log.warning("shard data with a duplicate member, first one kept: %s", message)
            return True
        if self.count_bad_shards:
            self.counter.add("bad_shard")
        self.failed_shards += 1
        log.warning("skipping unreadable shard data: %s", message)
        if self.failed_shards >= self.max_failed_shards:
            raise UserError(
                f"{_this_worker()}: {self.failed_shards} shards in a row could not be read, the last with: "
                f"{message[:200]}; check data.train_shards (and data.val_shards): the paths, their permissions, "
                "and that a pipe: command works on its own in a shell"
            )
        return stage != "tar_file_iterator"

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"key": sample.get("__key__", "")}
        meta = decode_json(sample.get("json"))
        if self.image_size is not None:
            if self.rng is None:
                self.rng = random.Random(self.seed * 100_003 + pytorch_worker_seed())
            out["image"] = decode_image(
                image_member(sample), self.image_size, self.min_image_size, self.random_crop, self.rng
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
                decoded = self.decode(sample)
            except SkipSample as skip:
                self.counter.add(skip.reason)
                self.skipped_in_a_row[skip.reason] += 1
                if self.skipped_in_a_row.total() >= self.max_skipped_in_a_row:
                    raise UserError(self.nothing_usable()) from None
                continue
            self.failed_shards = 0  # the source works: failures so far were bad shards, not a bad source
            self.skipped_in_a_row.clear()
            yield decoded

    def nothing_usable(self) -> str:
        counts = self.skipped_in_a_row.most_common()
        commonest = counts[0][0]
        if commonest == "too_small":
            fix = (
                f"the images are smaller than {self.min_image_size} px (data.min_image_size; by default half the "
                f"stage's image size, {self.image_size} px): train at a size the data has, or use larger images"
            )
        elif "npy" in commonest:
            fix = f"the shards lack readable {', '.join(self.npy_fields)} members: point the stage at embed.py's shards"
        else:
            fix = "check data.train_shards and data.val_shards hold img2dataset samples (an image and a .txt caption)"
        reasons = ", ".join(f"{reason}: {count}" for reason, count in counts)
        return f"{_this_worker()}: the last {self.skipped_in_a_row.total()} samples were all skipped ({reasons}); {fix}"

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
        """Batches of `batch_size` samples; with `partial` (a finite pass, validation) also the last short one.

        A finite pass counts exactly what it skipped: it starts from zero (a pass broken off early, like
        Lightning's sanity check, leaves its reads behind in the counter) and holds each batch back until the
        next one is due, so that what is skipped after the last usable sample (a bad last shard) still
        travels with the pass's last batch instead of being lost.
        """
        if partial:
            self.counter.pop()
        held: dict[str, Any] | None = None
        pending: list[dict[str, Any]] = []
        for sample in self.samples(src):
            pending.append(sample)
            if len(pending) < batch_size:
                continue
            batch, pending = self.collate(pending), []
            if not partial:
                yield batch
                continue
            if held is not None:
                yield held
            held = batch
        if not partial:
            return
        if pending:
            if held is not None:
                yield held
            held = self.collate(pending)
        if held is not None:
            for reason, count in self.counter.pop().items():
                held["skipped"][reason] = held["skipped"].get(reason, 0) + count
            yield held


class TrainStream(IterableDataset):
    """The training stream of one epoch: resampled shards, shuffled, batched, `batches_per_worker` batches.

    Every random choice (shards, shuffle order, crops) is seeded by (seed, epoch, rank, worker), and `epoch`
    is set by the loader before each pass, so epochs differ from each other and a resumed run reads exactly
    the batches the uninterrupted run would have read. (webdataset's own epoch counters restart in every
    fresh worker copy, which would replay the first epoch's order every epoch.) No node splitter is needed:
    every rank draws its own shards.
    """

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder,
        batch_size: int,
        batches_per_worker: int,
        shuffle_buffer: int,
        seed: int,
        num_workers: int = 0,
    ):
        super().__init__()
        self.urls = urls
        self.decoder = decoder
        self.batch_size = batch_size
        self.batches_per_worker = batches_per_worker
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.num_workers = num_workers
        self.epoch = 0

    def __len__(self) -> int:
        """Batches per epoch over all workers of this rank (for progress bars and LR schedules)."""
        return self.batches_per_worker * max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        seed = wds.utils.make_seed(self.seed, self.epoch)
        self.decoder.rng = random.Random(wds.utils.make_seed(seed, pytorch_worker_seed()))
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=seed, deterministic=True),
            wds.tarfile_to_samples(handler=self.decoder.handler),
            wds.detshuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), seed=seed),
            lambda src: self.decoder.batches(src, self.batch_size, partial=False),
        )
        return itertools.islice(iter(pipeline), self.batches_per_worker)


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
