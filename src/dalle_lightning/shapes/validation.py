"""The Shapes validation split as tensors: read in shard order (as evaluate.py reads it), and through a CLIP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dalle_lightning.data.datamodule import ShardDataModule
from dalle_lightning.errors import UserError
from dalle_lightning.models.clip import FrozenClip
from dalle_lightning.shapes.datamodule import ShapesDataModule


def read_val_split(data_root: Path, image_size: int, num_samples: int, batch_size: int, tokenizer: Any) -> dict:
    """The first `num_samples` validation images (in [-1, 1], at the decoder's size), their caption tokens,
    captions and metadata (the scenes' objects), read as evaluate.py reads them (the data module's validation
    loader, in shard order). Only existing shards are read: nothing is rendered."""
    shards = sorted(str(p) for p in (data_root / "val").glob("*.tar"))
    if not shards:
        raise UserError(
            f"no validation shards under {data_root}/val: build Shapes first "
            f"(python -m dalle_lightning.shapes --out {data_root} --num-samples 20000) or give --data-root"
        )
    dm = ShardDataModule(
        val_shards=shards,
        image_size=image_size,
        batch_size=batch_size,
        num_workers=0,
        val_samples=num_samples,
        tokenizer=tokenizer,
    )
    dm.setup("validate")
    parts: dict[str, list[Any]] = {"image": [], "input_ids": [], "attention_mask": [], "caption": [], "meta": []}
    count = 0
    for batch in dm.val_dataloader():
        batch = dm.on_after_batch_transfer(batch, 0)
        for key in parts:
            parts[key].append(batch[key])
        count += len(batch["caption"])
        if count >= num_samples:
            break
    if count < num_samples:
        raise UserError(f"{data_root}/val holds {count} readable samples, fewer than the {num_samples} asked for")
    out = {k: torch.cat(v)[:num_samples] for k, v in parts.items() if k not in ("caption", "meta")}
    for key in ("caption", "meta"):
        out[key] = [c for part in parts[key] for c in part][:num_samples]
    return out


def embed_val_split(clip: FrozenClip, data_dir: Path) -> dict[str, Any]:
    """The Shapes val split (of the build at `data_dir`) through a frozen CLIP (`load_frozen_clip`): the batches'
    tensors concatenated, their captions and metadata, and the image and text embeddings (`image_emb`,
    `text_emb`)."""

    manifest = json.loads((data_dir / "manifest.json").read_text())
    dm = ShapesDataModule(
        str(data_dir),
        num_train=manifest["num_train"],
        num_val=manifest["num_val"],
        samples_per_shard=manifest["samples_per_shard"],
        image_size=clip.image_size,
        batch_size=250,
        num_workers=0,
        val_samples=manifest["num_val"],
        tokenizer=clip.tokenizer,
    )
    dm.setup("validate")
    batches = [dm.on_after_batch_transfer(b, 0) for b in dm.val_dataloader()]
    val: dict[str, Any] = {
        k: torch.cat([b[k] for b in batches])
        for k in ("image", "input_ids", "attention_mask", "group_id", "caption_id", "heldout")
    }
    val["caption"] = [c for b in batches for c in b["caption"]]
    val["meta"] = [m for b in batches for m in b["meta"]]
    val["image_emb"] = torch.cat([clip.encode_images(x) for x in val["image"].split(250)])
    val["text_emb"] = clip.encode_texts(val["input_ids"], val["attention_mask"])
    return val
