"""Pictures of results: grids of images with captions (PNG and for wandb), and training curves."""

from __future__ import annotations

import csv
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

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
    """One row per (caption, images): the caption on the left, the images (scaled to `cell` px high, as wide as
    the first image's aspect makes them) beside it."""
    font = ImageFont.load_default()
    columns = max(len(images) for _, images in rows)
    first = next((to_pil(image) for _, images in rows for image in images), None)
    width = cell if first is None else max(1, round(cell * first.width / first.height))
    grid = Image.new("RGB", (caption_width + columns * (width + 4), len(rows) * (cell + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (caption, images) in enumerate(rows):
        top = r * (cell + 4)
        lines = textwrap.wrap(caption, width=max(10, caption_width // 7))[:6]
        draw.multiline_text((4, top + 4), "\n".join(lines), fill=(0, 0, 0), font=font)
        for c, image in enumerate(images):
            tile = to_pil(image).resize((width, cell), Image.NEAREST)
            grid.paste(tile, (caption_width + c * (width + 4), top))
    return grid


def read_csv_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's `CSVLogger` file (`metrics.csv`) as {metric: [(step, value), ...]}, empty cells left out."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["step"]))
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(name, []).append((step, float(value)))
    return series


def plot_training_curves(runs: Mapping[str, Path], metrics: Mapping[str, Sequence[str]], path: Path) -> None:
    """One column per run (its CSV log): training and validation loss over the steps on top, the run's named
    validation metrics below (the first solid, the others, references such as a baseline, dashed). Saved as PNG."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend

    figure = Figure(figsize=(3.6 * len(runs), 5.6), layout="constrained")
    axes = figure.subplots(2, len(runs), squeeze=False)
    for column, (name, csv_path) in enumerate(runs.items()):
        series = read_csv_log(csv_path)
        top, bottom = axes[0][column], axes[1][column]
        top.set_title(name)
        train, val = series.get("train/loss", []), series.get("val/loss", [])
        if train:
            top.plot(*zip(*train), label="train/loss", alpha=0.35)
            top.plot(*zip(*_running_mean(train, 10)), label="train/loss (mean of 10)")
        if val:
            top.plot(*zip(*val), label="val/loss", marker="o")
        top.set_yscale("log")
        top.legend(fontsize="small")
        for i, metric in enumerate(metrics.get(name, ())):
            points = series.get(metric, [])
            if points:
                bottom.plot(*zip(*points), label=metric, marker="o", linestyle="-" if i == 0 else "--")
            else:
                bottom.plot([], [], label=f"{metric} (not logged)")
        bottom.set_xlabel("step")
        bottom.legend(fontsize="small")
    figure.savefig(path, dpi=100)


def _running_mean(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    values = [v for _, v in points]
    return [
        (step, sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window)) for i, (step, _) in enumerate(points)
    ]
