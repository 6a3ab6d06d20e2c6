"""Embeddings: a frozen CLIP run over image-caption shards (the logic behind the root `embed.py`).

Two output formats, one output per input shard:

- `shards`: a shard of the same name holding every original member, byte for byte, plus `img_emb.npy` and
  `txt_emb.npy` (float16, shape (D,)) and `txt_ids.npy` (int32 token ids, one context length).
  Next to each shard, `<stem>_stats.json` (img2dataset's convention) records its counts. What the decoder reads
  when it takes its embeddings from shards.
- `clip_retrieval`: the format clip-retrieval writes and LAION published its embeddings in, no image bytes: the
  part `<stem>` of an input shard `<stem>.tar` is `img_emb/img_emb_<stem>.npy` and `text_emb/text_emb_<stem>.npy`
  (float16, (N, D)) and `metadata/metadata_<stem>.parquet` (row i: `key`, `caption` and the
  sample's json fields); its counts go to `stats/<stem>_stats.json`. What the prior reads (`data=clip_retrieval`).

Embeddings are L2-normalised (the "unit" convention of `models.clip`), or with `normalize=False` as CLIP projects
them ("raw", the convention of Karlo's and Kandinsky's priors). Work is resumable shard by shard: files are written
under temporary names and renamed (a part's parquet last), so an output that exists is complete and a rerun skips it.
Once every shard is done, `embeddings.json` sums it up.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from dalle_lightning.data.clip_retrieval import replace_synced, write_part
from dalle_lightning.data.decode import SkipSample, decode_caption, decode_image, decode_json, image_member
from dalle_lightning.data.shards import expand_shards
from dalle_lightning.errors import UserError
from dalle_lightning.models.clip import FrozenClip

log = logging.getLogger(__name__)

SUMMARY = "embeddings.json"
EMBEDDING_MEMBERS = ("img_emb.npy", "txt_emb.npy", "txt_ids.npy")
FORMATS = ("shards", "clip_retrieval")
# Fixed member times (TarWriter stamps the clock otherwise): the same input gives byte-identical shards.
_TAR_MTIME = 0
_SHARD_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


@dataclass
class _Chunk:
    """Up to one batch of decoded samples of one shard, handed from a reader worker to the main process."""

    index: int  # the shard's position in this rank's list of shards to do
    members: list[dict[str, Any]] = field(default_factory=list)  # raw members, and "__key__"
    images: list[np.ndarray] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    last: bool = False  # the shard's final chunk: it carries the shard's skip counts and read error
    skipped: dict[str, int] = field(default_factory=dict)
    error: str | None = None


class _ShardReader(IterableDataset):
    """Reads shards (each worker its own), decodes only the image and the caption, yields `_Chunk`s.

    Members are kept as raw bytes: nothing else is decoded, so a `.pyd`/`.pickle` member is never unpickled.
    """

    def __init__(self, urls: list[str], image_size: int, min_image_size: int, batch_size: int):
        self.urls = urls
        self.image_size = image_size
        self.min_image_size = min_image_size
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[_Chunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(worker, len(self.urls), workers):
            yield from self._read(index)

    def _read(self, index: int) -> Iterator[_Chunk]:
        url = self.urls[index]
        errors: list[str] = []

        def handler(exn: Exception) -> bool:
            errors.append(str(exn).splitlines()[0][:300] if str(exn) else type(exn).__name__)
            return False  # stop reading this shard: it is redone on the next run

        skipped: Counter = Counter()
        chunk = _Chunk(index)
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=handler)):
            try:
                image = decode_image(image_member(sample), self.image_size, self.min_image_size)
                caption = decode_caption(sample.get("txt"))
            except SkipSample as skip:
                skipped[skip.reason] += 1
                continue
            chunk.members.append({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("_")})
            chunk.images.append(image)
            chunk.captions.append(caption)
            if len(chunk.members) == self.batch_size:
                yield chunk
                chunk = _Chunk(index)
        chunk.last, chunk.skipped, chunk.error = True, dict(skipped), errors[0] if errors else None
        yield chunk


def _identity(item: Any) -> Any:
    return item


def output_name(url: str) -> str:
    """The output shard's file name for an input shard URL: its basename, with a `.tar` extension.

    `pipe:` commands are searched for the word naming the shard (`pipe:aws s3 cp s3://b/00012.tar -`).
    """
    words = url.removeprefix("pipe:").split() if url.startswith("pipe:") else [url]
    for word in reversed(words):
        base = os.path.basename(word.split("?")[0].rstrip("/"))
        for suffix in _SHARD_SUFFIXES:
            if base.endswith(suffix) and len(base) > len(suffix):
                return base[: -len(suffix)] + ".tar"
    raise UserError(f"shards: cannot tell the shard name of '{url}' (no word ending in .tar); name shards *.tar")


def _rank() -> tuple[int, int]:
    try:
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as err:
        raise UserError(f"RANK and WORLD_SIZE must be integers ({err})") from err
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} WORLD_SIZE={world_size}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    return rank, world_size


def _device(device: str) -> torch.device:
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # Under torchrun each process on a node takes its own GPU.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        chosen = torch.device(device)
    except RuntimeError as err:
        raise UserError(f"device='{device}' is not a device: use auto, cpu, cuda or cuda:N") from err
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device='{device}' but no CUDA GPU is available: use device=cpu or device=auto")
    return chosen


def load_clip(clip: str | None) -> tuple[FrozenClip, str]:
    """(the frozen CLIP with both towers, how the summary names it: a folder resolved, a hub name as given)."""
    from dalle_lightning.models.clip import load_frozen_clip

    if not clip:
        raise UserError("no CLIP to embed with: set clip=<CLIP export, transformers CLIP folder or hub name>")
    model = load_frozen_clip(clip, "clip", text=True, image=True)
    path = Path(str(clip)).expanduser()
    return model, str(path.resolve()) if path.exists() else str(clip)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _count_samples(shard: Path) -> int:
    """Samples in an embedding shard, from its member names (for a shard whose stats file is gone)."""
    with tarfile.open(shard) as tar:
        return sum(1 for member in tar if member.name.endswith(".img_emb.npy"))


class _Embedder:
    """The frozen CLIP on one device: decoded samples in, numpy embeddings and token ids out."""

    def __init__(self, clip: FrozenClip, device: torch.device, normalize: bool = True):
        self.clip = clip.to(device)
        self.device = device
        self.normalize = normalize

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], captions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        input_ids, attention_mask = self.clip.tokenize(captions)
        pixels = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            img_emb = self.clip.encode_images(pixels, self.normalize).float()
            txt_emb = self.clip.encode_texts(input_ids.to(self.device), attention_mask.to(self.device), self.normalize)
        txt_emb = txt_emb.float()
        if self.normalize:  # again in float32, so that the float16 copies are unit vectors to float16 precision
            img_emb, txt_emb = F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1)
        as_half = lambda x: x.cpu().numpy().astype(np.float16)  # noqa: E731
        return as_half(img_emb), as_half(txt_emb), input_ids.numpy().astype(np.int32)


class _ShardWriter:
    """One output shard (format=shards) being written: the input's members and the embeddings, sample by sample."""

    def __init__(self, path: Path):
        self.path, self.tmp, self.written = path, path.with_name(path.name + ".tmp"), 0
        self.file = open(self.tmp, "wb")  # noqa: SIM115  (closed in close)
        self.writer = wds.TarWriter(self.file, encoder=False, mtime=_TAR_MTIME)

    def add(self, members: list[dict[str, Any]], img_emb, txt_emb, txt_ids, captions: list[str]) -> None:
        for j, sample in enumerate(members):
            arrays = {"img_emb.npy": img_emb[j], "txt_emb.npy": txt_emb[j], "txt_ids.npy": txt_ids[j]}
            self.writer.write({**sample, **{name: _npy(array) for name, array in arrays.items()}})
        self.written += len(members)

    def close(self, keep: bool) -> None:
        self.writer.close()
        self.file.close()
        if keep:
            replace_synced(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _metadata_table(keys: list[str], captions: list[str], metas: list[dict[str, Any]]):
    """A part's metadata as an arrow table: `key`, `caption`, then the samples' json fields, one column each (as
    clip-retrieval flattens them); a field whose values are not all of one scalar kind is kept as json text."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {"key": keys, "caption": captions}
    for name in sorted({k for meta in metas for k in meta} - set(columns)):
        values = [meta.get(name) for meta in metas]
        kinds = {type(v) for v in values if v is not None}
        if not (kinds <= {bool} or kinds <= {int, float} or kinds <= {str}):
            values = [None if v is None else json.dumps(v) for v in values]
        columns[name] = values
    return pa.table(columns)


class _PartWriter:
    """One clip-retrieval part (format=clip_retrieval) being written: rows collected, the files written at close."""

    def __init__(self, out: Path, stem: str, dim: int):
        self.out, self.stem, self.dim, self.written = out, stem, dim, 0
        self.img_emb: list[np.ndarray] = []
        self.txt_emb: list[np.ndarray] = []
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.metas: list[dict[str, Any]] = []

    def add(self, members: list[dict[str, Any]], img_emb, txt_emb, txt_ids, captions: list[str]) -> None:
        self.img_emb.append(img_emb)
        self.txt_emb.append(txt_emb)
        self.keys += [str(sample.get("__key__", "")) for sample in members]
        self.captions += captions
        self.metas += [decode_json(sample.get("json")) for sample in members]
        self.written += len(members)

    def close(self, keep: bool) -> None:
        if keep:
            empty = np.zeros((0, self.dim), np.float16)
            img = np.concatenate(self.img_emb) if self.img_emb else empty
            txt = np.concatenate(self.txt_emb) if self.txt_emb else empty
            write_part(self.out, self.stem, img, txt, _metadata_table(self.keys, self.captions, self.metas))


@dataclass
class _Layout:
    """Where the output for an input shard named `<stem>.tar` goes in `out`, in `format`."""

    out: Path
    format: str
    dim: int

    def target(self, name: str) -> Path:
        """The file whose existence marks the input shard as done."""
        if self.format == "shards":
            return self.out / name
        return self.out / "metadata" / f"metadata_{name.removesuffix('.tar')}.parquet"

    def stats(self, name: str) -> Path:
        stem = name.removesuffix(".tar")
        return self.out / f"{stem}_stats.json" if self.format == "shards" else self.out / "stats" / f"{stem}_stats.json"

    def open(self, name: str) -> _ShardWriter | _PartWriter:
        if self.format == "shards":
            return _ShardWriter(self.target(name))
        return _PartWriter(self.out, name.removesuffix(".tar"), self.dim)

    def count(self, name: str) -> int:
        """Samples written for a done shard whose stats file is gone."""
        if self.format == "shards":
            return _count_samples(self.target(name))
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.target(name)).metadata.num_rows


def embed_shards(
    shards: str | Sequence[str],
    output_dir: str | Path,
    clip: str | None = None,
    format: str = "shards",
    batch_size: int = 256,
    num_workers: int = 4,
    min_image_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    normalize: bool = True,
) -> dict[str, Any]:
    """Embed every input shard with the frozen CLIP `clip` (see `models.clip.load_frozen_clip`) into `output_dir`,
    in `format` (`FORMATS`, see the module's doc); return the summary of all shards so far.

    Shard i goes to rank i % WORLD_SIZE (env vars RANK/WORLD_SIZE; one process by default). Output shards
    that exist are skipped. Samples without a usable image or caption are skipped and counted by reason; an
    unreadable shard is counted as `bad_shard` and left for the next run. Images are decoded at the CLIP's
    resolution (`min_image_size`: smaller ones are skipped; default half that resolution). `normalize`: unit-norm
    embeddings (false: as CLIP projects them). `embeddings.json`
    is written by whichever process finds every shard done (the only one, in a single-process run); the
    summary returned has `complete` false while other ranks still have shards to do.
    """
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: use at least 1")
    if num_workers < 0:
        raise UserError(f"num_workers={num_workers}: use 0 (read in the main process) or more")
    if format not in FORMATS:
        raise UserError(f"format='{format}' is unknown: use shards (the decoder's) or clip_retrieval (the prior's)")
    rank, world_size = _rank()
    urls = expand_shards(shards, "shards")
    names = [output_name(url) for url in urls]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"shards: several input shards are named {duplicates[0]}; output shards keep input names")
    out = Path(output_dir).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"output_dir='{output_dir}' cannot be created ({err.strerror or err})") from err
    for url in urls:
        if os.path.exists(url) and Path(url).resolve() == out / output_name(url):
            raise UserError(f"output_dir='{output_dir}' holds the input shards: write the embeddings elsewhere")

    torch.manual_seed(seed)
    model, source = load_clip(clip)
    embedder = _Embedder(model, _device(device), normalize)
    # Decoded square at the size the CLIP sees (shorter side resized, centre crop: its preprocessing then has
    # nothing left to do but normalise).
    image_size = int((model.preprocess.crop or (model.image_size,) * 2)[0])
    min_size = int(min_image_size) if min_image_size else max(1, image_size // 2)
    dim = model.projection_dim
    header = {
        "clip": source,
        "format": format,
        "embeddings": "unit" if normalize else "raw",
        "embedding_dim": dim,
        "context_length": model.context_length,
    }
    layout = _Layout(out, format, dim)

    mine = [i for i in range(len(urls)) if i % world_size == rank]
    todo: list[int] = []
    for i in mine:
        path = layout.target(names[i])
        if not path.exists():
            todo.append(i)
            continue
        log.debug("skip %s: already embedded", path)
        stats = _read_json(layout.stats(names[i])) or {}
        for key in ("embedding_dim", "context_length", "embeddings"):
            if key in stats and stats[key] != header[key]:
                raise UserError(
                    f"output_dir='{output_dir}' holds embeddings with {key}={stats[key]} (from {stats.get('clip')}), "
                    f"this CLIP gives {header[key]}: use another output_dir, or delete it to start over"
                )
    if len(mine) > len(todo):
        log.info("skip %d of %d shards of this process: already embedded in %s", len(mine) - len(todo), len(mine), out)

    written: Counter = Counter()
    skipped: Counter = Counter()
    if todo:
        reader = _ShardReader([urls[i] for i in todo], image_size, min_size, batch_size)
        workers = min(num_workers, len(todo))
        loader = DataLoader(reader, batch_size=None, num_workers=workers, collate_fn=_identity)
        bar = tqdm(total=len(todo), desc="embed", unit="shard", disable=not progress or rank != 0, dynamic_ncols=True)
        open_shards: dict[int, _ShardWriter | _PartWriter] = {}
        samples = 0
        try:
            for chunk in loader:
                shard = open_shards.get(chunk.index)
                if shard is None:
                    shard = open_shards[chunk.index] = layout.open(names[todo[chunk.index]])
                if chunk.members:
                    shard.add(chunk.members, *embedder(chunk.images, chunk.captions), chunk.captions)
                    samples += len(chunk.members)
                    bar.set_postfix(samples=samples, refresh=False)
                if chunk.last:
                    del open_shards[chunk.index]
                    url = urls[todo[chunk.index]]
                    counts = Counter(chunk.skipped)
                    if chunk.error is not None:
                        counts = Counter(bad_shard=1)
                        log.warning("skipping unreadable shard %s (redone on the next run): %s", url, chunk.error)
                    stats = {**header, "input": url, "written": 0 if chunk.error else shard.written}
                    # The stats go first: a shard that exists always has its stats.
                    stats_path = layout.stats(names[todo[chunk.index]])
                    stats_path.parent.mkdir(exist_ok=True)
                    _write_json(stats_path, {**stats, "skipped": dict(counts), "error": chunk.error})
                    shard.close(keep=chunk.error is None)
                    written[url] = stats["written"]
                    skipped.update(counts)
                    bar.update(1)
        finally:
            for shard in open_shards.values():
                shard.close(keep=False)
            bar.close()
        log.info(
            "rank %d/%d: embedded %d samples into %d shards (skipped %s)",
            rank,
            world_size,
            sum(written.values()),
            len(todo) - skipped["bad_shard"],
            _format_counts(skipped),
        )

    summary = _summarise(urls, names, layout, shards, header)
    if summary["complete"]:
        _write_json(out / SUMMARY, summary)
        log.info(
            "embeddings: %d samples in %d shards of %s (dim %d; skipped %s; %d bad shards) -> %s",
            summary["written"],
            len(summary["shards"]),
            out,
            dim,
            _format_counts(summary["skipped"]),
            len(summary["bad_shards"]),
            out / SUMMARY,
        )
        if summary["written"] == 0:
            log.warning("no sample was embedded: see the skip counts in %s", out / SUMMARY)
    else:
        log.info(
            "rank %d: done; %d shards still to do by other ranks: the last to finish writes %s",
            rank,
            len(summary["pending"]),
            SUMMARY,
        )
    return summary


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v) or "none"


def _summarise(
    urls: list[str], names: list[str], layout: _Layout, spec: str | Sequence[str], header: dict[str, Any]
) -> dict[str, Any]:
    """Sum the per-shard stats on disk: what every rank has written so far, what failed, what is pending."""
    done: list[str] = []
    bad: list[str] = []
    pending: list[str] = []
    written = 0
    skipped: Counter = Counter()
    for url, name in zip(urls, names):
        path = layout.target(name)
        stats = _read_json(layout.stats(name))
        if path.exists():
            done.append(str(path))
            written += stats["written"] if stats and "written" in stats else layout.count(name)
            skipped.update((stats or {}).get("skipped", {}))
        elif stats is not None and stats.get("error"):
            bad.append(url)
            skipped["bad_shard"] += 1
        else:
            pending.append(url)
    if layout.format == "shards":
        contents = {
            "members": list(EMBEDDING_MEMBERS),
            "dtype": {"img_emb": "float16", "txt_emb": "float16", "txt_ids": "int32"},
        }
    else:
        files = ["img_emb/img_emb_<part>.npy", "text_emb/text_emb_<part>.npy", "metadata/metadata_<part>.parquet"]
        contents = {"files": files, "dtype": {"img_emb": "float16", "text_emb": "float16"}}
    return {
        **header,
        "input": spec if isinstance(spec, str) else list(spec),
        "output_dir": str(layout.out),
        **contents,
        "written": written,
        "skipped": dict(sorted(skipped.items())),
        "shards": done,
        "bad_shards": bad,
        "pending": pending,
        "complete": not pending,
    }


def embed(cfg: DictConfig) -> dict[str, Any]:
    """Run `embed_shards` as the composed `conf/embed.yaml` says."""
    shards = cfg.shards  # read first: a missing value is the error to report
    if isinstance(shards, ListConfig):
        shards = OmegaConf.to_container(shards, resolve=True)
    return embed_shards(
        shards=shards,
        output_dir=cfg.output_dir,
        clip=cfg.get("clip"),
        format=str(cfg.get("format", "shards")),
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.get("num_workers", 4)),
        min_image_size=cfg.get("min_image_size"),
        device=str(cfg.get("device", "auto")),
        seed=int(cfg.get("seed", 0)),
        normalize=bool(cfg.normalize),
    )
