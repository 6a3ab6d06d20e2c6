"""Train one stage as the composed Hydra config says (the logic behind the root `train.py`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dalle_lightning.errors import UserError, missing_value_message
from dalle_lightning.export import check_export_target, locate_clip, read_manifest

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)


# Under SLURM each run dir records its job id, so that a requeued job (SLURM_RESTART_COUNT > 0) finds the
# checkpoint its previous attempt left, whatever run dir the new attempt gets.
SLURM_JOB_FILE = "slurm_job_id"


def slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def resolve_ckpt_path(ckpt_path: str | None, runs_dir: Path) -> Path | None:
    """`null` → fresh run (or, in a requeued SLURM job, the job's own last.ckpt); `last` → the newest
    last.ckpt of this stage's runs; otherwise a file that exists."""
    job = slurm_job_id()
    if not ckpt_path and job and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        mine = [
            marker.parent / "checkpoints" / "last.ckpt"
            for marker in runs_dir.glob(f"**/{SLURM_JOB_FILE}")
            if marker.read_text().strip() == job
        ]
        if mine := [path for path in mine if path.is_file()]:
            newest = max(mine, key=lambda path: path.stat().st_mtime)
            log.info("requeued SLURM job %s: resuming from %s", job, newest)
            return newest
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


def check_output_dir(path: Path, needed_bytes: int) -> None:
    """Fail before training, not at the first checkpoint, when `path` cannot be written or its disk is
    (nearly) full."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write to the output directory {path} ({err.strerror or err}): "
            "set paths.log_dir (or hydra.run.dir) to a writable directory"
        ) from err
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise UserError(
            f"only {free / 2**20:.0f} MiB free on the disk of {path}, a checkpoint needs about "
            f"{needed_bytes / 2**20:.0f} MiB: free some space or set paths.log_dir to another disk"
        )


def checkpoint_bytes(module: L.LightningModule) -> int:
    """About what saving a checkpoint takes on disk: weights and two AdamW moments, written next to the old
    file before it is replaced, plus room for logs."""
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    return 2 * 3 * weights + 64 * 2**20


def _requeue(job: str) -> None:
    """Put this SLURM job back in the queue (it is killed and started again; see resolve_ckpt_path)."""
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("requeued SLURM job %s", job)
    else:
        log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(value: Any) -> dict[str, Any] | None:
    """The `compile` setting as torch.compile's keyword arguments; None: run eagerly. `true`, a mode name, or
    the arguments themselves (`compile={mode:max-autotune,dynamic:false}`)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, str) and value in COMPILE_MODES:
        return {"mode": value}
    if isinstance(value, Mapping):
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else dict(value)
    raise UserError(
        f"compile={value!r}: use false, true, a torch.compile mode ({', '.join(COMPILE_MODES)}) "
        "or torch.compile's arguments ({mode:...,dynamic:...})"
    )


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def check_config(cfg: DictConfig) -> None:
    """The mistakes a config shows by itself: a required value left unset, a stage export or shard pattern that
    is not there, an export that would replace something else, options that contradict each other. `train`
    checks these before it imports Lightning and torch (~10 s on 2 cores), so that they are reported at once."""
    # Only where the configs leave values unset: walking the whole config would resolve every interpolation,
    # trainer.precision's `${dl.auto_precision:}` among them, which imports torch.
    missing = sorted(key for group in ("data", "stage") for key in OmegaConf.missing_keys(cfg[group]))
    if missing:
        raise UserError(missing_value_message(missing[0]))
    compile_options(cfg.get("compile"))
    if cfg.data.get("path") and not Path(cfg.data.path).expanduser().is_dir():  # data=clip_retrieval's folder
        raise UserError(
            f"data.path='{cfg.data.path}' is not a folder: point it at a clip-retrieval output (img_emb/ ...)"
        )
    if cfg.get("gradient_checkpointing") and OmegaConf.select(cfg, "trainer.strategy.activation_checkpointing_policy"):
        raise UserError(
            "gradient_checkpointing=true and trainer.strategy.activation_checkpointing_policy would both recompute "
            "activations: set trainer.strategy.activation_checkpointing_policy=null or gradient_checkpointing=false"
        )
    if cfg.stage.get("clip"):
        locate_clip(cfg.stage.clip, "stage.clip")
    if cfg.stage.get("init_from"):
        read_manifest(cfg.stage.init_from, cfg.stage.name, "stage.init_from")
    if export_to := OmegaConf.select(cfg, "callbacks.export.dirpath"):
        check_export_target(export_to, cfg.stage.name)  # ExportCallback checks again for runs built without train()
    shard_options = [key for key in ("train_shards", "val_shards") if cfg.data.get(key)]
    if shard_options:
        from dalle_lightning.data.shards import expand_shards  # torch and webdataset: ~3 s, a third of Lightning

        for key in shard_options:
            expand_shards(cfg.data[key], f"data.{key}")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the stage; write the export and `metrics.json`; return the final metrics."""
    stage = cfg.stage.name
    check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / stage)

    import lightning as L
    import torch
    from lightning.pytorch.loggers import WandbLogger

    from dalle_lightning.callbacks import ExportCallback, Preempted, PreemptionCheckpoint

    compile_with = compile_options(cfg.get("compile"))
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ckpt_dir = output_dir / "checkpoints"
    if ckpt_path is not None and (ckpt_path.parent / "tokenizer").is_dir() and not (ckpt_dir / "tokenizer").exists():
        shutil.copytree(ckpt_path.parent / "tokenizer", ckpt_dir / "tokenizer")

    datamodule = instantiate(cfg.data)
    # A stage's tokenizer factory takes the datamodule (a CLIP trained from scratch learns its BPE from it).
    tokenizer = instantiate(cfg.stage.tokenizer)(datamodule) if cfg.stage.get("tokenizer") else None
    datamodule.tokenizer = tokenizer
    module = instantiate(cfg.stage.module, tokenizer=tokenizer, _convert_="all")
    check_output_dir(output_dir, checkpoint_bytes(module))
    if cfg.get("gradient_checkpointing"):  # before compiling, so that the graphs recompute too
        module.enable_gradient_checkpointing()
        log.info("gradient checkpointing: %s", ", ".join(module.checkpointed_networks))
    if compile_with is not None:
        module.compile_networks(**compile_with)
        log.info("torch.compile %s with %s", ", ".join(module.compiled_networks), compile_with or "its defaults")

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

    job = slurm_job_id()
    if job and trainer.is_global_zero:
        (output_dir / SLURM_JOB_FILE).write_text(job)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Preempted as stop:
        requeue = job is not None and any(isinstance(c, PreemptionCheckpoint) and c.requeue for c in callbacks)
        if requeue and trainer.is_global_zero:
            _requeue(job)
        stop.then = f"requeued SLURM job {job}" if requeue else "resume with ckpt_path=last"
        # The state is saved: one line and the signal's exit status, not a traceback.
        print(f"stopped: {stop.message()}", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    for logger in loggers:
        if isinstance(logger, WandbLogger):  # so the next job of a multirun starts its own wandb run
            logger.experiment.finish()
    return metrics
