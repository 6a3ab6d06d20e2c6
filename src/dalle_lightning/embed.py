"""Embedding shards: a frozen CLIP run over image-caption shards (the logic behind the root `embed.py`).

Each input shard becomes one output shard of the same name holding every original member, byte for byte,
plus `img_emb.npy` and `txt_emb.npy` (float16, shape (D,): L2-normalised, or with `normalize=False` as CLIP
projects them, the convention of Karlo's and Kandinsky's priors) and `txt_ids.npy` (int32 token ids, one
context length). Work is resumable shard by shard: a shard is written to `<name>.tmp`, then renamed,
so an output shard that exists is complete and a rerun skips it. Next to each shard, `<stem>_stats.json`
(img2dataset's convention) records its counts; once every shard is done, `embeddings.json` sums them up.
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

from dalle_lightning.data.decode import SkipSample, decode_caption, decode_image, image_member
from dalle_lightning.data.shards import expand_shards
from dalle_lightning.errors import UserError

log = logging.getLogger(__name__)

SUMMARY = "embeddings.json"
EMBEDDING_MEMBERS = ("img_emb.npy", "txt_emb.npy", "txt_ids.npy")
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


def load_clip(clip_export: str | None, pretrained: str | None) -> tuple[Any, Any, str]:
    """(CLIPModel in eval mode, tokenizer, source): from `pretrained` when set, else from the CLIP export."""
    if pretrained:
        from transformers import CLIPModel

        from dalle_lightning.models.tokenizer import load_tokenizer

        try:
            model = CLIPModel.from_pretrained(str(pretrained)).eval()
        except (OSError, ValueError) as err:
            raise UserError(
                f"pretrained='{pretrained}' cannot be loaded as a CLIP ({str(err).splitlines()[0]}); give a hub "
                "name or a folder saved with save_pretrained, or pretrained=null to use clip_export"
            ) from err
        return model, load_tokenizer(pretrained), str(pretrained)
    if not clip_export:
        raise UserError("no CLIP to embed with: set clip_export=<CLIP export folder> or pretrained=<hub name>")
    from dalle_lightning.export import load_clip_export

    model, tokenizer = load_clip_export(clip_export, option="clip_export")
    return model, tokenizer, str(Path(clip_export).expanduser().resolve())


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


def _stats_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".tar") + "_stats.json")


def _count_samples(shard: Path) -> int:
    """Samples in an embedding shard, from its member names (for a shard whose stats file is gone)."""
    with tarfile.open(shard) as tar:
        return sum(1 for member in tar if member.name.endswith(".img_emb.npy"))


class _Embedder:
    """The frozen CLIP and its tokenizer on one device: decoded samples in, numpy embeddings out."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, normalize: bool = True):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = device
        self.normalize = normalize
        text_config = model.config.text_config
        # Some tokenizers report an effectively unbounded model_max_length; the model's positions bound it.
        self.context_length = int(min(tokenizer.model_max_length, text_config.max_position_embeddings))

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], captions: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from dalle_lightning.models.clip import encode_images, encode_texts

        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        pixels = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        input_ids = tokens["input_ids"].to(self.device)
        attention_mask = tokens["attention_mask"].to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            img_emb = encode_images(self.model, pixels, self.normalize).float()
            txt_emb = encode_texts(self.model, input_ids, attention_mask, self.normalize).float()
        if self.normalize:  # again in float32, so that the float16 copies are unit vectors to float16 precision
            img_emb, txt_emb = F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1)
        as_half = lambda x: x.cpu().numpy().astype(np.float16)  # noqa: E731
        return as_half(img_emb), as_half(txt_emb), tokens["input_ids"].numpy().astype(np.int32)


@dataclass
class _OpenShard:
    path: Path
    tmp: Path
    file: Any
    writer: wds.TarWriter
    written: int = 0


def _open_shard(path: Path) -> _OpenShard:
    tmp = path.with_name(path.name + ".tmp")
    file = open(tmp, "wb")  # noqa: SIM115  (closed in _close_shard)
    writer = wds.TarWriter(file, encoder=False, mtime=_TAR_MTIME)
    return _OpenShard(path, tmp, file, writer)


def _close_shard(shard: _OpenShard, keep: bool) -> None:
    shard.writer.close()
    if keep:
        shard.file.flush()
        os.fsync(shard.file.fileno())  # the rename below then never exposes a half-written shard
    shard.file.close()
    if keep:
        os.replace(shard.tmp, shard.path)
    else:
        shard.tmp.unlink(missing_ok=True)


def embed_shards(
    shards: str | Sequence[str],
    output_dir: str | Path,
    clip_export: str | None = None,
    pretrained: str | None = None,
    batch_size: int = 256,
    num_workers: int = 4,
    min_image_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    normalize: bool = True,
) -> dict[str, Any]:
    """Write one embedding shard per input shard into `output_dir`; return the summary of all shards so far.

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
    model, tokenizer, source = load_clip(clip_export, pretrained)
    embedder = _Embedder(model, tokenizer, _device(device), normalize)
    image_size = int(model.config.vision_config.image_size)
    min_size = int(min_image_size) if min_image_size else max(1, image_size // 2)
    dim = int(model.config.projection_dim)
    header = {"clip": source, "embedding_dim": dim, "context_length": embedder.context_length, "normalized": normalize}

    mine = [i for i in range(len(urls)) if i % world_size == rank]
    todo: list[int] = []
    for i in mine:
        path = out / names[i]
        if not path.exists():
            todo.append(i)
            continue
        log.debug("skip %s: already embedded", path)
        stats = _read_json(_stats_path(path)) or {}
        for key in ("embedding_dim", "context_length", "normalized"):
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
        open_shards: dict[int, _OpenShard] = {}
        samples = 0
        try:
            for chunk in loader:
                shard = open_shards.get(chunk.index)
                if shard is None:
                    shard = open_shards[chunk.index] = _open_shard(out / names[todo[chunk.index]])
                if chunk.members:
                    img_emb, txt_emb, txt_ids = embedder(chunk.images, chunk.captions)
                    for j, members in enumerate(chunk.members):
                        shard.writer.write(
                            {
                                **members,
                                "img_emb.npy": _npy(img_emb[j]),
                                "txt_emb.npy": _npy(txt_emb[j]),
                                "txt_ids.npy": _npy(txt_ids[j]),
                            }
                        )
                    shard.written += len(chunk.members)
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
                    _write_json(_stats_path(shard.path), {**stats, "skipped": dict(counts), "error": chunk.error})
                    _close_shard(shard, keep=chunk.error is None)
                    written[url] = stats["written"]
                    skipped.update(counts)
                    bar.update(1)
        finally:
            for shard in open_shards.values():
                _close_shard(shard, keep=False)
            bar.close()
        log.info(
            "rank %d/%d: embedded %d samples into %d shards (skipped %s)",
            rank,
            world_size,
            sum(written.values()),
            len(todo) - skipped["bad_shard"],
            _format_counts(skipped),
        )

    summary = _summarise(urls, names, out, shards, header)
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
    urls: list[str], names: list[str], out: Path, spec: str | Sequence[str], header: dict[str, Any]
) -> dict[str, Any]:
    """Sum the per-shard stats on disk: what every rank has written so far, what failed, what is pending."""
    done: list[str] = []
    bad: list[str] = []
    pending: list[str] = []
    written = 0
    skipped: Counter = Counter()
    for url, name in zip(urls, names):
        path = out / name
        stats = _read_json(_stats_path(path))
        if path.exists():
            done.append(str(path))
            written += stats["written"] if stats and "written" in stats else _count_samples(path)
            skipped.update((stats or {}).get("skipped", {}))
        elif stats is not None and stats.get("error"):
            bad.append(url)
            skipped["bad_shard"] += 1
        else:
            pending.append(url)
    return {
        **header,
        "input": spec if isinstance(spec, str) else list(spec),
        "output_dir": str(out),
        "members": list(EMBEDDING_MEMBERS),
        "dtype": {"img_emb": "float16", "txt_emb": "float16", "txt_ids": "int32"},
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
        clip_export=cfg.get("clip_export"),
        pretrained=cfg.get("pretrained"),
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.get("num_workers", 4)),
        min_image_size=cfg.get("min_image_size"),
        device=str(cfg.get("device", "auto")),
        seed=int(cfg.get("seed", 0)),
        normalize=bool(cfg.normalize),
    )
