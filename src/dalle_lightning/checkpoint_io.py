"""Checkpoint files written atomically: a kill or a full disk mid-save never leaves `last.ckpt` unreadable."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file beside the destination, syncs it to disk, then renames it over the
    destination, so readers see the old checkpoint or the new one, never a partial file.

    Lightning's own save goes through fsspec, which stages local files in the system temp dir: when that is
    another file system (a tmpfs /tmp, a cluster's scratch or NFS output dir) the final move is a copy into
    the destination, which a kill can cut short, and a multi-GB checkpoint has to fit in /tmp. Remote URLs
    (s3://, gs://) keep Lightning's path, where the object store's upload is atomic.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while saving
            with contextlib.suppress(OSError):
                stale.unlink()
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        # The rename itself is durable once the directory entry is synced.
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
