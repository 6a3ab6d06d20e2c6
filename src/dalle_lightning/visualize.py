"""Pictures of results: grids of images with captions, as PNG and for wandb."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor | np.ndarray | Image.Image) -> Image.Image:
    """A (3, H, W) tensor in [-1, 1], an (H, W, 3) uint8 array, or a PIL image → RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if torch.is_tensor(image):
        image = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


def captioned_grid(rows: Sequence[tuple[str, Sequence]], cell: int = 96, caption_width: int = 200) -> Image.Image:
    """One row per (caption, images): the caption on the left, the images (scaled to `cell` px) beside it."""
    font = ImageFont.load_default()
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (caption_width + columns * (cell + 4), len(rows) * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (caption, images) in enumerate(rows):
        top = r * (cell + 4)
        lines = textwrap.wrap(caption, width=max(10, caption_width // 7))[:6]
        draw.multiline_text((4, top + 4), "\n".join(lines), fill=(0, 0, 0), font=font)
        for c, image in enumerate(images):
            tile = to_pil(image).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (caption_width + c * (cell + 4), top))
    return grid
