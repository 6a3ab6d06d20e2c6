"""Embedding folders as clip-retrieval writes them and LAION published LAION-5B's: the prior's training data
(read by `datamodule.ClipRetrievalDataModule`, written by `write_part`).

A folder holds parts: `img_emb/img_emb_<part>.npy` and `text_emb/text_emb_<part>.npy` ((N, D) float16,
L2-normalised) and `metadata/metadata_<part>.parquet` (column `caption`; row i of the three files of a part is one
sample). `embed.py format=clip_retrieval` writes the same. The `.npy` files are memory-mapped (read with
`allow_pickle=False`), never loaded whole; captions are read from the parquet files with pyarrow only when wanted.

Training reads an infinite stream cut into epochs of `samples_per_epoch`. The training rows are cut into chunks
(contiguous rows of one part); every cycle through the data deals a fresh permutation of the chunks to the
streams (one per rank and loader worker), so each rank reads its own disjoint rows; a stream reads its chunks in
order and shuffles them through a window of `shuffle_buffer` rows. Where every stream stands is a function of
(seed, epoch, batch), so a resumed run starts at the very next batch, reading only the window it falls in.
embedding-reader was not used: it streams pieces in order and leaves shuffling, rank splits and resuming to us.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dalle_lightning.data.shards import stable_id
from dalle_lightning.errors import UserError

log = logging.getLogger(__name__)

_PART = re.compile(r"^img_emb_(.+)\.npy$")


@dataclass(frozen=True)
class Part:
    """One part of a clip-retrieval folder: its three files and where its rows start among all the folder's."""

    name: str
    img_emb: Path
    text_emb: Path
    metadata: Path
    rows: int
    start: int


def _part_order(name: str) -> tuple[int, int, str]:
    return (0, int(name), name) if name.isdigit() else (1, 0, name)


def npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file from its header alone (no pickle, nothing else read)."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(file)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"{path} is not a readable .npy file ({err}): write the part again") from err
    return shape, dtype


def scan_folder(path: str | Path, option: str = "data.path") -> list[Part]:
    """The parts of a clip-retrieval folder, checked: three files per part, as many rows in each, float embeddings
    of one width, a `caption` column. Any problem is a one-line error naming the file and the fix."""
    import pyarrow.parquet as pq

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{option}='{path}' is not a folder: point it at a clip-retrieval output (img_emb/, ...)")
    for sub in ("img_emb", "text_emb", "metadata"):
        if not (folder / sub).is_dir():
            raise UserError(
                f"{option}='{path}' has no {sub}/ folder: point {option} at a clip-retrieval output (img_emb/, "
                "text_emb/, metadata/), as embed.py format=clip_retrieval and LAION's embeddings are laid out"
            )
    names = sorted((m.group(1) for f in (folder / "img_emb").iterdir() if (m := _PART.match(f.name))), key=_part_order)
    if not names:
        raise UserError(
            f"{option}='{path}': {folder / 'img_emb'} holds no img_emb_<part>.npy: the folder is empty; embed "
            "some shards into it (embed.py format=clip_retrieval) or point at another folder"
        )
    parts, start, width = [], 0, None
    for name in names:
        files = (
            folder / "img_emb" / f"img_emb_{name}.npy",
            folder / "text_emb" / f"text_emb_{name}.npy",
            folder / "metadata" / f"metadata_{name}.parquet",
        )
        for file in files[1:]:
            if not file.is_file():
                raise UserError(f"{file} is missing: part {name} has img_emb_{name}.npy but not this; write it again")
        counts = []
        for file in files[:2]:
            shape, dtype = npy_shape(file)
            if len(shape) != 2 or dtype.kind != "f":
                raise UserError(
                    f"{file} holds a {dtype} array of shape {shape}, not (rows, width) float embeddings: write it again"
                )
            if width is not None and shape[1] != width:
                raise UserError(f"{file} holds {shape[1]}-wide embeddings, the folder's others {width}-wide")
            width = shape[1]
            counts.append(shape[0])
        try:
            metadata = pq.ParquetFile(files[2])
        except Exception as err:  # pyarrow raises its own errors for files that are not parquet
            raise UserError(f"{files[2]} is not a readable parquet file ({err}): write it again") from err
        counts.append(metadata.metadata.num_rows)
        if len(set(counts)) > 1:
            raise UserError(
                f"part {name} of {option}='{path}' does not line up: img_emb_{name}.npy has {counts[0]} rows, "
                f"text_emb_{name}.npy {counts[1]}, metadata_{name}.parquet {counts[2]}: row i of each must be one "
                "sample; write the part again or remove its three files"
            )
        if "caption" not in metadata.schema_arrow.names:
            raise UserError(
                f"{files[2]} has no caption column (columns: {', '.join(metadata.schema_arrow.names)}): the "
                "metadata must hold each sample's caption; write it again"
            )
        parts.append(Part(name, *files, counts[0], start))
        start += counts[0]
    if start == 0:
        raise UserError(f"{option}='{path}': every part is empty (0 rows): embed some shards into it first")
    return parts


def replace_synced(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path` once its bytes are on disk: the rename never exposes a half-written file."""
    with open(tmp, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(tmp, path)


def write_part(folder: str | Path, name: str, img_emb: np.ndarray, text_emb: np.ndarray, metadata: Any) -> None:
    """Write part `name` of a clip-retrieval folder: the two (N, D) embedding arrays and the metadata table (a
    pyarrow Table with a `caption` column, N rows). Each file goes under a temporary name and is renamed, the
    parquet last: a part whose parquet exists is whole."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    for sub, array in (("img_emb", img_emb), ("text_emb", text_emb)):
        path = folder / sub / f"{sub}_{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as file:
            np.save(file, array, allow_pickle=False)
        replace_synced(tmp, path)
    path = folder / "metadata" / f"metadata_{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(metadata, tmp)
    replace_synced(tmp, path)


class PartReader:
    """Rows of a folder's parts: embeddings from memory maps, captions (and the optional `group` / `heldout`
    columns) from parquet, a row group at a time, the last one kept. Loader workers open their own maps."""

    def __init__(self, parts: Sequence[Part]):
        self.parts = list(parts)
        self.starts = np.array([p.start for p in self.parts], dtype=np.int64)
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._files: dict[int, Any] = {}
        self._row_group: tuple[int, int, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}, "_files": {}, "_row_group": None}

    def _map(self, part: int, field: str) -> np.ndarray:
        key = (part, field)
        if key not in self._maps:
            self._maps[key] = np.load(getattr(self.parts[part], field), mmap_mode="r", allow_pickle=False)
        return self._maps[key]

    def _metadata(self, part: int, start: int, stop: int, columns: dict[str, list]) -> None:
        import pyarrow.parquet as pq

        if part not in self._files:
            self._files[part] = pq.ParquetFile(self.parts[part].metadata)
        file = self._files[part]
        names = [c for c in ("caption", "group", "heldout") if c in file.schema_arrow.names]
        first = 0
        for index in range(file.num_row_groups):
            rows = file.metadata.row_group(index).num_rows
            lo, hi = max(start, first), min(stop, first + rows)
            if lo < hi:
                if self._row_group is None or self._row_group[:2] != (part, index):
                    self._row_group = (part, index, file.read_row_group(index, columns=names))
                table = self._row_group[2].slice(lo - first, hi - lo)
                for name in names:
                    columns.setdefault(name, []).extend(table.column(name).to_pylist())
            first += rows
            if first >= stop:
                break

    def read(self, rows: np.ndarray, metadata: bool) -> dict[str, Any]:
        """The embeddings (as stored) of global rows, in the order given, read a run of consecutive rows at a
        time; with `metadata`, also their `caption` (and `group`, `heldout`) lists."""
        order = None if (np.diff(rows) >= 0).all() else np.argsort(rows, kind="stable")
        ordered = rows if order is None else rows[order]
        part_of = np.searchsorted(self.starts, ordered, side="right") - 1
        breaks = np.flatnonzero((np.diff(ordered) != 1) | (np.diff(part_of) != 0)) + 1
        img, txt, columns = [], [], {}
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(ordered)]):
            part = int(part_of[lo])
            first, last = int(ordered[lo] - self.starts[part]), int(ordered[hi - 1] - self.starts[part]) + 1
            img.append(self._map(part, "img_emb")[first:last])
            txt.append(self._map(part, "text_emb")[first:last])
            if metadata:
                self._metadata(part, first, last, columns)
        out: dict[str, Any] = {"img_emb": np.concatenate(img), "txt_emb": np.concatenate(txt), **columns}
        if order is None:
            return out
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return _take(out, inverse)


def _float32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows as float32 and their squared lengths (not finite exactly where a row holds NaN or inf)."""
    x = x.astype(np.float32)
    return x, np.einsum("ij,ij->i", x, x)


def _unit(x: np.ndarray, squared: np.ndarray) -> torch.Tensor:
    x /= np.sqrt(np.maximum(squared, 1e-24))[:, None]
    return torch.from_numpy(x)


class Batcher:
    """Batches from rows read by a `PartReader`: embeddings L2-normalised in float32 (the "unit" convention),
    rows with NaN or inf dropped and counted, captions tokenized when the prior reads their tokens."""

    def __init__(self, reader: PartReader, captions: bool, tokenizer: Any = None, context_length: int | None = None):
        if captions and tokenizer is None:
            raise UserError(
                "data.captions=true (the prior reads the captions' tokens) needs the CLIP's tokenizer: give the "
                "stage a tokenizer (stage.tokenizer), or set model.prior.text_tokens=false"
            )
        self.reader = reader
        self.captions = captions
        self.tokenizer = tokenizer
        self.context_length = context_length or getattr(tokenizer, "model_max_length", 77)

    def read(self, rows: np.ndarray, metadata: bool = False) -> dict[str, Any]:
        return self.reader.read(rows, metadata or self.captions)

    def batch(self, data: dict[str, Any], metadata: bool = False) -> dict[str, Any]:
        """The batch of the rows of `data` (what `read` returned, or a selection of it); `metadata` adds `caption`,
        `group_id` and `heldout` (validation)."""
        (img, img_sq), (txt, txt_sq) = _float32(data["img_emb"]), _float32(data["txt_emb"])
        rows = len(img)
        keep = np.flatnonzero(np.isfinite(img_sq) & np.isfinite(txt_sq))
        if not len(keep):
            raise UserError(
                f"a whole batch of rows of {self.reader.parts[0].img_emb.parent.parent} holds NaN or inf "
                f"embeddings ({rows} rows): the embeddings are broken there; embed those parts again or "
                "remove their files"
            )
        if len(keep) < rows:
            img, img_sq, txt, txt_sq = img[keep], img_sq[keep], txt[keep], txt_sq[keep]
        batch: dict[str, Any] = {
            "img_emb": _unit(img, img_sq),
            "txt_emb": _unit(txt, txt_sq),
            "skipped": {"nonfinite_embedding": rows - len(keep)} if len(keep) < rows else {},
        }
        if "caption" not in data:
            return batch
        captions = [str(data["caption"][i] or "") for i in keep]
        if metadata:
            groups, heldout = data.get("group") or data["caption"], data.get("heldout")
            batch["caption"] = captions
            batch["group_id"] = torch.tensor([stable_id(str(groups[i])) for i in keep], dtype=torch.int64)
            batch["heldout"] = torch.tensor([bool(heldout and heldout[i]) for i in keep], dtype=torch.bool)
        if self.captions:
            # Lists to one numpy array: half the time of the tokenizer's own return_tensors="pt".
            tokens = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.context_length)
            batch["txt_ids"] = torch.from_numpy(np.asarray(tokens["input_ids"], dtype=np.int64))
        return batch


def _take(data: dict[str, Any], index: np.ndarray) -> dict[str, Any]:
    return {k: v[index] if isinstance(v, np.ndarray) else [v[i] for i in index] for k, v in data.items()}


def _join(parts: list[dict[str, Any]]) -> dict[str, Any]:
    joined: dict[str, Any] = {}
    for key, value in parts[0].items():
        if isinstance(value, np.ndarray):
            joined[key] = np.concatenate([p[key] for p in parts])
        else:
            joined[key] = [item for p in parts for item in p[key]]
    return joined


@dataclass(frozen=True)
class Chunk:
    """Contiguous global rows [start, stop) of one part."""

    start: int
    stop: int


def make_chunks(parts: Sequence[Part], ranges: Sequence[tuple[int, int]], chunk_rows: int) -> list[Chunk]:
    """The global row ranges `ranges` cut at part ends and into pieces of at most `chunk_rows` rows."""
    chunks = []
    for lo, hi in ranges:
        for part in parts:
            a, b = max(lo, part.start), min(hi, part.start + part.rows)
            chunks += [Chunk(s, min(s + chunk_rows, b)) for s in range(a, b, chunk_rows)]
    return chunks


class EmbeddingStream(IterableDataset):
    """The training stream of one epoch on one rank: `batches_per_worker` batches per loader worker.

    Stream g (of G = world size x workers) reads, in cycle c, the chunks at g, g + G, ... of the permutation of
    all chunks drawn from (seed, c), each in row order, and shuffles that sequence within consecutive windows of
    `shuffle_buffer` rows (a permutation drawn from (seed, g, window)); a window is read at once, a run of rows at a
    time. Epochs are consecutive stretches of every stream. `start_batch` (set by the loader on a resume) starts the
    pass at that batch of the epoch: loader worker w then plays the stream and the position that the worker of the
    uninterrupted run had at that batch.
    """

    def __init__(
        self,
        batcher: Batcher,
        chunks: list[Chunk],
        batch_size: int,
        batches_per_worker: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
    ):
        super().__init__()
        self.batcher, self.chunks = batcher, chunks
        self.batch_size, self.batches_per_worker = batch_size, batches_per_worker
        self.window = max(batch_size, shuffle_buffer)
        self.seed, self.rank = seed, rank
        self.workers = max(1, num_workers)
        self.streams = world_size * self.workers
        self.epoch = 0
        self.start_batch = 0
        self._cycles: dict[int, list[int]] = {}  # stream -> where each cycle ends in its sequence

    def __len__(self) -> int:
        return self.batches_per_worker * self.workers

    def _cycle(self, stream: int, cycle: int) -> tuple[np.ndarray, np.ndarray]:
        """(first rows, row counts) of the chunks the stream reads in a cycle, in order."""
        order = np.random.default_rng([self.seed, cycle]).permutation(len(self.chunks))[stream :: self.streams]
        starts = np.array([self.chunks[i].start for i in order], dtype=np.int64)
        return starts, np.array([self.chunks[i].stop for i in order], dtype=np.int64) - starts

    def _locate(self, stream: int, position: int) -> tuple[int, int]:
        """(cycle, offset in it) of a position in the stream's sequence."""
        ends = self._cycles.setdefault(stream, [])
        while not ends or ends[-1] <= position:
            ends.append((ends[-1] if ends else 0) + int(self._cycle(stream, len(ends))[1].sum()))
        cycle = int(np.searchsorted(ends, position, side="right"))
        return cycle, position - (ends[cycle - 1] if cycle else 0)

    def rows(self, stream: int, start: int, stop: int) -> np.ndarray:
        """Global row ids at positions [start, stop) of the stream's unshuffled sequence."""
        out = []
        while start < stop:
            cycle, offset = self._locate(stream, start)
            firsts, counts = self._cycle(stream, cycle)
            ends = np.cumsum(counts)
            index = int(np.searchsorted(ends, offset, side="right"))
            within = offset - (int(ends[index - 1]) if index else 0)
            take = min(stop - start, int(counts[index]) - within)
            out.append(np.arange(firsts[index] + within, firsts[index] + within + take))
            start += take
        return np.concatenate(out)

    def window_rows(self, stream: int, window: int) -> np.ndarray:
        """Global row ids of a window of the stream's shuffled sequence."""
        rows = self.rows(stream, window * self.window, (window + 1) * self.window)
        return rows[np.random.default_rng([self.seed, stream, window]).permutation(self.window)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # The loader hands batch i of a pass to worker i % workers: a pass starting at batch s gives worker w the
        # batches that worker (s + w) % workers had from its batch (s + w) // workers on.
        plays, first = (self.start_batch + worker) % self.workers, (self.start_batch + worker) // self.workers
        stream = self.rank * self.workers + plays
        windows: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}  # window -> (shuffled order, rows' data)
        for index in range(first, self.batches_per_worker):
            start = (self.epoch * self.batches_per_worker + index) * self.batch_size
            stop = start + self.batch_size
            needed = range(start // self.window, (stop - 1) // self.window + 1)
            windows = {w: windows[w] for w in needed if w in windows}
            pieces = []
            for window in needed:
                if window not in windows:
                    rows = self.window_rows(stream, window)
                    order = np.argsort(rows, kind="stable")  # read in row order, a run at a time
                    windows[window] = (np.argsort(order), self.batcher.read(rows[order]))
                shuffled, data = windows[window]
                lo, hi = max(start, window * self.window), min(stop, (window + 1) * self.window)
                pieces.append(_take(data, shuffled[lo - window * self.window : hi - window * self.window]))
            yield self.batcher.batch(pieces[0] if len(pieces) == 1 else _join(pieces))


class EvalStream(IterableDataset):
    """Validation rows once, in order, row i to rank i % world size, in batches with captions and group ids."""

    def __init__(self, batcher: Batcher, rows: np.ndarray, batch_size: int, rank: int, world_size: int):
        super().__init__()
        self.batcher, self.rows, self.batch_size = batcher, rows, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        mine = self.rows[self.rank :: self.world_size]
        for start in range(0, len(mine), self.batch_size):
            yield self.batcher.batch(self.batcher.read(mine[start : start + self.batch_size], True), metadata=True)
