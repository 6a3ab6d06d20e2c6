"""Pictures: captioned grids, and training curves read from Lightning's CSV log (what the demo draws)."""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from dalle_lightning.visualize import captioned_grid, plot_training_curves, read_csv_log


def write_csv_log(root, name: str, steps: int = 30, val_every: int = 10):
    """A real CSVLogger file: train/loss every step, the validation metrics every `val_every` steps."""
    logger = CSVLogger(root, name=name, version=0)
    for step in range(steps):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "epoch": step // val_every}, step=step)
        if step % val_every == val_every - 1:
            logger.log_metrics({"val/loss": 0.5 / (step + 1), "val/r1": step / steps, "val/baseline": 0.3}, step=step)
    logger.save()
    return root / name / "version_0" / "metrics.csv"


def test_csv_log_reads_each_metric_with_its_steps(tmp_path):
    series = read_csv_log(write_csv_log(tmp_path, "clip"))
    assert len(series["train/loss"]) == 30 and series["train/loss"][0] == (0, 1.0)
    assert [step for step, _ in series["val/r1"]] == [9, 19, 29]
    assert "epoch" not in series and "step" not in series


def test_training_curves_draw_one_column_per_run(tmp_path):
    runs = {"clip": write_csv_log(tmp_path, "clip"), "prior": write_csv_log(tmp_path, "prior", steps=20)}
    out = tmp_path / "curves.png"
    # A metric the run never logged is drawn as an empty, labelled series, not an error.
    plot_training_curves(runs, {"clip": ["val/r1", "val/baseline"], "prior": ["val/missing"]}, out)
    plot_training_curves({"clip": runs["clip"]}, {}, tmp_path / "one.png")
    with Image.open(out) as image, Image.open(tmp_path / "one.png") as one:
        assert image.size == (2 * one.size[0], one.size[1])  # a column per run
        pixels = torch.tensor(list(image.convert("L").getdata()), dtype=torch.float32)
    assert pixels.std() > 10  # something was drawn on the white figure


def test_captioned_grid_lays_rows_of_images_beside_captions():
    images = [torch.full((3, 8, 8), v) for v in (-1.0, 1.0)]
    grid = captioned_grid([("a red circle", images), ("two blue squares", images[:1])], cell=16, caption_width=50)
    assert grid.size == (50 + 2 * 20, 2 * 20)
    assert grid.getpixel((50, 0)) == (0, 0, 0) and grid.getpixel((70, 0)) == (255, 255, 255)
