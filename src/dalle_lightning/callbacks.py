"""Lightning callbacks of the project (Lightning's own cover checkpoints, LR monitor, EMA, progress): the
export at the end of fitting, and sample grids during validation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from dalle_lightning.export import write_export
from dalle_lightning.visualize import captioned_grid

log = logging.getLogger(__name__)


def evaluation_epoch(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Whether this validation epoch is one for the costly evaluations (sampling images): every `every_n_epochs`
    epochs and the last one, never the sanity check. The same answer on every rank."""
    if trainer.sanity_checking or every_n_epochs <= 0:
        return False
    epoch = trainer.current_epoch + 1
    return epoch % every_n_epochs == 0 or epoch == trainer.max_epochs


class ExportCallback(L.Callback):
    """At the end of fitting, rank zero writes the stage's export (`pl_module.export(dir)`) to `dirpath`.

    Runs after the other callbacks' `on_fit_end`, when weight averaging (EMA) has already swapped the
    averaged weights in, so the export holds the weights validation used.
    """

    def __init__(self, dirpath: str, stage: str, config: Any = None):
        self.dirpath = Path(dirpath)
        self.stage = stage
        self.config = config

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.interrupted and not trainer.sanity_checking:
            write_export(self.dirpath, self.stage, pl_module.export, self.config)
            log.info("exported %s to %s", self.stage, self.dirpath)


class SampleGridCallback(L.Callback):
    """Every `every_n_epochs` validation epochs, a captioned grid of samples for the first validation batch
    (`pl_module.preview_rows(batch, num_rows)`: e.g. the real image beside reconstructions), made with the
    weights validation uses (EMA, when on), saved as `<dirpath>/epoch<NNN>.png` and logged to wandb."""

    def __init__(self, dirpath: str, every_n_epochs: int = 1, num_rows: int = 8):
        self.dirpath = Path(dirpath)
        self.every_n_epochs = every_n_epochs
        self.num_rows = num_rows

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or not evaluation_epoch(trainer, self.every_n_epochs):
            return
        # Every rank samples (sharded weights need all of them); rank zero saves and logs.
        rows = pl_module.preview_rows(batch, self.num_rows)
        if not trainer.is_global_zero:
            return
        grid = captioned_grid(rows)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"epoch{trainer.current_epoch:03d}.png"
        grid.save(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "samples", [grid], step=trainer.global_step, caption=[f"epoch {trainer.current_epoch}"]
                )
        log.info("sample grid: %s", path)
