"""Shard sets with every kind of bad input (issue 7, fault injection): real webdataset tars in img2dataset's
layout (`<key>.jpg|png|webp`, `<key>.txt`, `<key>.json`), each mixing good samples with one kind of fault.

A helper module, not a conftest.py: pytest imports a conftest.py outside a package as the module `conftest`,
replacing the root one in sys.modules, and the other test modules' `from conftest import ...` would then
find this file instead.
"""

from __future__ import annotations

import functools
import io
import pickle
import re
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import Detonator, write_tar

MARKER = "pwned"  # what a payload that ran would leave in the shard set's folder


def encode(fmt: str, size: tuple[int, int] = (48, 40), mode: str = "RGB", colour=(200, 30, 30), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype.hasobject)
    return buffer.getvalue()


def good(key: str, with_npy: bool = False) -> dict[str, bytes]:
    """One usable sample (with an `img_emb.npy` member for the embedding configuration)."""
    sample = {f"{key}.jpg": encode("JPEG"), f"{key}.txt": f"a red square number {key}".encode(), f"{key}.json": b"{}"}
    if with_npy:
        sample[f"{key}.img_emb.npy"] = npy(np.arange(8, dtype=np.float16))
    return sample


def corrupt_middle(data: bytes) -> bytes:
    """The first half kept, the rest overwritten: headers parse, the image data does not."""
    half = len(data) // 2
    return data[:half] + b"\x00\xff" * ((len(data) - half) // 2)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims another size (what a decompression bomb looks like)."""
    data = bytearray(encode("JPEG", size=(64, 64)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@functools.cache
def png_bomb(side: int) -> bytes:
    """A 1-bit PNG of `side`² pixels: a few kB that would decode to side² bytes."""
    return encode("PNG", size=(side, side), mode="1", colour=0)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"


@dataclass
class ShardSet:
    """Shard URLs, the keys validation must deliver (in order) and the skips it must count."""

    urls: list[str]
    keys: list[str]
    skipped: dict[str, int]
    npy: bool = False  # read with the embedding configuration (npy_fields=("img_emb",), no image)
    kept: list[str] = field(default_factory=list)  # keys of unusual but valid inputs that must arrive
    optional: list[str] = field(default_factory=list)  # keys that may arrive or not (before a pipe fails)


@dataclass(frozen=True)
class Fault:
    name: str
    reason: str | None  # None: not a fault, the input must decode and be kept
    build: Callable[[Path, str], ShardSet]


def _sample_fault(reason: str | None, bad: Callable[[str, Path], dict[str, bytes]], with_npy: bool = False):
    """One shard: two good samples, the bad one, two good ones (keys prefixed like img2dataset's)."""

    def build(root: Path, prefix: str) -> ShardSet:
        keys = [f"{prefix}{i:04d}" for i in range(5)]
        members: dict[str, bytes] = {}
        for i, key in enumerate(keys):
            members.update(bad(key, root) if i == 2 else good(key, with_npy))
        url = str(write_tar(root / f"{prefix}.tar", members))
        if reason is None:
            return ShardSet([url], keys, {}, with_npy, kept=[keys[2]])
        return ShardSet([url], keys[:2] + keys[3:], {reason: 1}, with_npy)

    return build


def _image(data: bytes | Callable[[], bytes], ext: str = "jpg"):
    return lambda key, root: {
        f"{key}.{ext}": data() if callable(data) else data,
        f"{key}.txt": b"a bad image",
        f"{key}.json": b"{}",
    }


def _caption(data: bytes | None):
    def members(key: str, root: Path) -> dict[str, bytes]:
        out = {f"{key}.jpg": encode("JPEG"), f"{key}.json": b"{}"}
        if data is not None:
            out[f"{key}.txt"] = data
        return out

    return members


def _npy_member(data: Callable[[Path], bytes] | None):
    def members(key: str, root: Path) -> dict[str, bytes]:
        out = {f"{key}.txt": b"an embedding", f"{key}.json": b"{}"}
        if data is not None:
            out[f"{key}.img_emb.npy"] = data(root)
        return out

    return members


def _pickle_members(key: str, root: Path) -> dict[str, bytes]:
    """A good sample next to members that would run code if anything unpickled them."""
    payload = pickle.dumps(Detonator(str(root / MARKER)))
    return {**good(key), **{f"{key}.{ext}": payload for ext in ("pkl", "pickle", "pyd", "pth")}}


def _shard_fault(
    make_bad: Callable[[Path, Path], tuple[str, list[str]]], reason: str | None = "bad_shard", optional: bool = False
):
    """Three shards: good, bad, good. `make_bad(root, source)` gets a complete 4-sample tar to damage and
    returns the bad shard's URL and the keys of it that arrive (those before the damage); with `optional`
    they may or may not arrive."""

    def build(root: Path, prefix: str) -> ShardSet:
        shards = []
        for part in ("a", "b", "c"):
            keys = [f"{prefix}{part}{i:03d}" for i in range(4)]
            members = {k: v for key in keys for k, v in good(key).items()}
            shards.append((write_tar(root / f"{prefix}-{part}.tar", members), keys))
        bad_url, bad_keys = make_bad(root, shards[1][0])
        return ShardSet(
            [str(shards[0][0]), bad_url, str(shards[2][0])],
            shards[0][1] + ([] if optional else bad_keys) + shards[2][1],
            {reason: 1} if reason else {},
            optional=bad_keys if optional else [],
        )

    return build


def _cut_offset(source: Path, into_data: bool) -> int:
    """Where to cut a 4-sample tar: 10 bytes into the third sample's image data, or into its header."""
    with tarfile.open(source) as tar:
        info = tar.getmembers()[6]
    return info.offset_data + 10 if into_data else info.offset + 100


def _keys_before(source: Path, offset: int) -> list[str]:
    """Keys of the samples whose members all end before `offset`."""
    with tarfile.open(source) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    return [k for k in keys if all(m.offset_data + m.size <= offset for m in members if m.name.split(".")[0] == k)]


def _truncated(into_data: bool):
    def make(root: Path, source: Path) -> tuple[str, list[str]]:
        cut = _cut_offset(source, into_data)
        bad = root / f"{source.stem}-cut.tar"
        bad.write_bytes(source.read_bytes()[:cut])
        return str(bad), _keys_before(source, cut)

    return make


def _replaced(data: bytes):
    def make(root: Path, source: Path) -> tuple[str, list[str]]:
        bad = root / f"{source.stem}-replaced.tar"
        bad.write_bytes(data)
        return str(bad), []

    return make


def _pipe_midstream(root: Path, source: Path) -> tuple[str, list[str]]:
    """A `pipe:` source whose command writes part of the tar, then fails (a download that breaks off)."""
    cut = _cut_offset(source, into_data=True)
    script = root / f"{source.stem}-fail.sh"
    script.write_text(f"head -c {cut} '{source}'\nexit 1\n")
    return f"pipe:sh {script}", _keys_before(source, cut)


def _pipe_missing(root: Path, source: Path) -> tuple[str, list[str]]:
    return f"pipe:cat {root / 'no-such-shard.tar'}", []


def _with_symlink(root: Path, source: Path) -> tuple[str, list[str]]:
    """A tar with a symlink member pointing out of the shard: never followed (not a regular file)."""
    bad = root / f"{source.stem}-link.tar"
    data = source.read_bytes()
    bad.write_bytes(data)
    with tarfile.open(bad, "a") as tar:
        info = tarfile.TarInfo("zz-link.txt")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    return str(bad), _keys_before(source, source.stat().st_size)


def sample_fault(name: str, reason: str | None, bad: Callable[[str, Path], dict[str, bytes]], **kw) -> Fault:
    return Fault(name, reason, _sample_fault(reason, bad, **kw))


def shard_fault(name: str, make_bad: Callable[[Path, Path], tuple[str, list[str]]], reason="bad_shard", **kw) -> Fault:
    return Fault(name, reason, _shard_fault(make_bad, reason, **kw))


def _detonator_npy(root: Path) -> bytes:
    return npy(np.array([Detonator(str(root / MARKER))], dtype=object))


# Every kind of bad input, and the unusual-but-valid images that must be kept (reason None).
FAULTS: list[Fault] = [
    # images
    sample_fault("corrupt_jpeg", "corrupt_image", _image(b"\xff\xd8\xff\xe0" + b"\x17" * 500)),
    sample_fault("truncated_jpeg", "corrupt_image", _image(lambda: encode("JPEG")[:300])),
    sample_fault("corrupt_png", "corrupt_image", _image(lambda: corrupt_middle(encode("PNG")), "png")),
    sample_fault("truncated_png", "corrupt_image", _image(lambda: encode("PNG")[:80], "png")),
    sample_fault("corrupt_webp", "corrupt_image", _image(lambda: corrupt_middle(encode("WEBP")), "webp")),
    sample_fault("truncated_webp", "corrupt_image", _image(lambda: encode("WEBP")[:60], "webp")),
    sample_fault("zero_byte_image", "corrupt_image", _image(b"")),
    # Pillow would hand an EPS to Ghostscript, an external program: never opened.
    sample_fault("eps_named_jpg", "corrupt_image", _image(EPS)),
    sample_fault("missing_image", "missing_image", lambda key, root: {f"{key}.txt": b"no image"}),
    sample_fault("too_small", "too_small", _image(lambda: encode("JPEG", size=(12, 80)))),
    sample_fault("png_bomb", "decompression_bomb", _image(lambda: png_bomb(20_000), "png")),
    # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; the decoder must refuse it all the same.
    sample_fault("png_bomb_warning", "decompression_bomb", _image(lambda: png_bomb(10_000), "png")),
    sample_fault("jpeg_bomb", "decompression_bomb", _image(lambda: jpeg_claiming(60_000, 60_000))),
    # captions
    sample_fault("missing_caption", "missing_caption", _caption(None)),
    sample_fault("zero_byte_caption", "empty_caption", _caption(b"")),
    sample_fault("blank_caption", "empty_caption", _caption(b" \n\t ")),
    sample_fault("huge_caption", "huge_caption", _caption(b"a red square " * 200_000)),
    sample_fault("latin1_caption", "bad_caption_encoding", _caption(b"caf\xe9 cr\xe8me")),
    sample_fault("utf16_caption", "bad_caption_encoding", _caption("tea".encode("utf-16"))),
    # members that would run code if unpickled
    sample_fault("pickle_members", None, _pickle_members),
    sample_fault("pickled_npy", "pickled_npy", _npy_member(_detonator_npy), with_npy=True),
    sample_fault(
        "pickle_named_npy",
        "pickled_npy",
        _npy_member(lambda root: pickle.dumps(Detonator(str(root / MARKER)))),
        with_npy=True,
    ),
    sample_fault(
        "truncated_npy", "corrupt_npy", _npy_member(lambda root: npy(np.ones(64, np.float32))[:-40]), with_npy=True
    ),
    sample_fault("zero_byte_npy", "corrupt_npy", _npy_member(lambda root: b""), with_npy=True),
    sample_fault("missing_npy", "missing_npy", _npy_member(None), with_npy=True),
    # shards
    shard_fault("truncated_tar", _truncated(into_data=True)),
    # A tar cut inside a header block reads as a shorter complete tar: Python's tarfile (in the stream mode
    # webdataset uses) takes a partial header after the first as the end of the archive, so nothing can count
    # it. The samples before the cut are kept and the stream goes on.
    shard_fault("truncated_tar_in_header", _truncated(into_data=False), reason=None),
    shard_fault("garbage_tar", _replaced(b"this is not a tar file " * 200)),
    shard_fault("zero_byte_tar", _replaced(b"")),
    # The command may have exited before its output is read: webdataset then fails before using any of it.
    shard_fault("pipe_fails_midstream", _pipe_midstream, optional=True),
    shard_fault("pipe_source_missing", _pipe_missing),
    shard_fault("symlink_member", _with_symlink, reason=None),
    # unusual but valid images: decoded to RGB and kept
    sample_fault("cmyk_jpeg", None, _image(lambda: encode("JPEG", mode="CMYK", colour=(0, 255, 255, 0)))),
    sample_fault("png_16bit", None, _image(lambda: encode("PNG", mode="I;16", colour=40_000), "png")),
    sample_fault("png_alpha", None, _image(lambda: encode("PNG", mode="RGBA", colour=(200, 30, 30, 0)), "png")),
    sample_fault("png_gray_alpha", None, _image(lambda: encode("PNG", mode="LA", colour=(90, 128)), "png")),
    sample_fault("png_palette", None, _image(lambda: encode("PNG", mode="P", colour=3), "png")),
    sample_fault(
        "png_palette_transparency", None, _image(lambda: encode("PNG", mode="P", colour=3, transparency=3), "png")
    ),
    sample_fault("webp_alpha", None, _image(lambda: encode("WEBP", mode="RGBA", colour=(0, 0, 255, 128)), "webp")),
    sample_fault("png_1bit", None, _image(lambda: encode("PNG", mode="1", colour=1), "png")),
    sample_fault("png_named_jpg", None, _image(lambda: encode("PNG"))),
]


def build(fault: Fault, root: Path) -> ShardSet:
    root.mkdir(parents=True, exist_ok=True)
    return fault.build(root, re.sub(r"\W", "", fault.name)[:12] + "-")


def mixed(root: Path) -> ShardSet:
    """Every fault kind read with images (all but the .npy ones) in one shard set, in table order."""
    urls, keys, optional, skipped = [], [], [], Counter()
    for fault in FAULTS:
        shard_set = build(fault, root / fault.name)
        if shard_set.npy:
            continue
        urls += shard_set.urls
        keys += shard_set.keys
        optional += shard_set.optional
        skipped.update(shard_set.skipped)
    return ShardSet(urls, keys, dict(skipped), optional=optional)
