"""Train one stage as the composed Hydra config says (the logic behind the root `train.py`)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from dalle_lightning.callbacks import ExportCallback
from dalle_lightning.errors import UserError

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: Path) -> Path | None:
    """`null` → fresh run; `last` → the newest last.ckpt of this stage's runs; otherwise a file that exists."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        candidates = sorted(runs_dir.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise UserError(f"ckpt_path=last: no last.ckpt under {runs_dir}; train once without ckpt_path first")
        return candidates[-1]
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path='{ckpt_path}' does not exist: give a .ckpt file, 'last', or null")
    return path


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the stage; write the export and `metrics.json`; return the final metrics."""
    stage = cfg.stage.name
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / stage)
    ckpt_dir = output_dir / "checkpoints"
    if ckpt_path is not None and (ckpt_path.parent / "tokenizer").is_dir() and not (ckpt_dir / "tokenizer").exists():
        shutil.copytree(ckpt_path.parent / "tokenizer", ckpt_dir / "tokenizer")

    datamodule = instantiate(cfg.data)
    # A stage's tokenizer factory takes the datamodule (a CLIP trained from scratch learns its BPE from it).
    tokenizer = instantiate(cfg.stage.tokenizer)(datamodule) if cfg.stage.get("tokenizer") else None
    datamodule.tokenizer = tokenizer
    module = instantiate(cfg.stage.module, tokenizer=tokenizer, _convert_="all")

    callbacks = _instantiate_all(cfg.get("callbacks"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for callback in callbacks:
        if isinstance(callback, ExportCallback):
            callback.config = resolved
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(resolved)

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    for logger in loggers:
        if isinstance(logger, WandbLogger):  # so the next job of a multirun starts its own wandb run
            logger.experiment.finish()
    return metrics
