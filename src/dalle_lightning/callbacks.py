"""Lightning callbacks of the project (Lightning's own cover checkpoints, LR monitor, EMA, progress)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from dalle_lightning.export import write_export

log = logging.getLogger(__name__)


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
