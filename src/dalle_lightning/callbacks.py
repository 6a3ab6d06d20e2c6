"""Lightning callbacks of the project (Lightning's own cover checkpoints, LR monitor, EMA, progress): the
export at the end of fitting, sample grids during validation, a checkpoint on preemption, and the guard
against non-finite losses."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dalle_lightning.errors import UserError
from dalle_lightning.export import check_export_target, write_export
from dalle_lightning.stages.base import evaluation_epoch
from dalle_lightning.visualize import captioned_grid

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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail before training, not after it; on every rank, so that none is left waiting for rank zero.
        if stage == "fit":
            check_export_target(self.dirpath, self.stage)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or trainer.sanity_checking:
            return
        with self._full_weights(trainer):
            if trainer.is_global_zero:
                write_export(self.dirpath, self.stage, pl_module.export, self.config, pl_module.manifest_info())
                log.info("exported %s to %s", self.stage, self.dirpath)

    @staticmethod
    def _full_weights(trainer: L.Trainer) -> contextlib.AbstractContextManager:
        """Under FSDP each rank holds a shard of every weight: every rank takes part in gathering them, and
        rank zero (on the CPU, to spare GPU memory) holds the whole model while it writes the export."""
        if not isinstance(trainer.strategy, FSDPStrategy):
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(
            trainer.strategy.model, writeback=False, rank0_only=True, offload_to_cpu=True
        )


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


class Preempted(Exception):
    """Training stopped on a preemption signal after saving a checkpoint (`train` turns it into an exit)."""

    def __init__(self, signum: int | None, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.then = "resume with ckpt_path=last"  # or what `train` did about it (a requeue)
        super().__init__(self.message())

    def message(self) -> str:
        name = signal.Signals(self.signum).name if self.signum else "a signal to another rank"
        return f"preempted by {name} at step {self.step}: saved {self.checkpoint}; {self.then}"

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process that the signal ended."""
        return 128 + (self.signum or signal.SIGTERM)


class PreemptionCheckpoint(L.Callback):
    """On a preemption signal (SLURM sends SIGTERM, or `--signal=USR1@120` before the time limit; submitit
    sends SIGUSR2), save `<dirpath>/last.ckpt` at the end of the training batch in progress and stop with
    `Preempted`, which `train` turns into a clean exit (and a requeue under SLURM).

    The handler only sets a flag: saving happens between batches, where the state is consistent, through
    the strategy (every rank takes part, as sharded checkpoints need). A signal that reaches only some ranks
    (Lightning's launcher forwards SIGTERM to its children, not SIGUSR1) is shared with all of them first.
    """

    def __init__(
        self, dirpath: str, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2"), requeue: bool = True
    ):
        self.dirpath = Path(dirpath)
        self.requeue = requeue  # under SLURM, `train` requeues the job after the checkpoint is saved
        self.signals = [signal.Signals[name] for name in signals]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed before Lightning registers its own handlers (it runs after `setup`): Lightning then keeps
        # ours for SIGTERM next to its own, and leaves SIGUSR1 to us instead of saving inside the handler.
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        received = self.received is not None
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        raise Preempted(self.received, trainer.global_step, path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning ends the run at once on a SIGTERM that arrives outside a training batch (in validation).
        if isinstance(exception, SIGTERMException) and trainer.is_global_zero:
            newest = self.dirpath / "last.ckpt"
            log.warning("SIGTERM outside a training batch: nothing saved now; newest checkpoint: %s", newest)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class NonFiniteLossGuard(L.Callback):
    """Skips an optimizer step whose gradients are not finite (a NaN/inf loss, an overflow) and counts it as
    `train/nonfinite_steps`; `max_in_a_row` such steps in a row stop the run with the step and the newest
    checkpoint in the message. The weights never take a non-finite update, so every checkpoint is good.

    Gradients, not the loss, decide: after DDP's all-reduce they are the same on every rank, so all ranks
    skip the same steps. Under 16-bit mixed precision the gradient scaler already does this and the guard
    stands aside.
    """

    def __init__(self, max_in_a_row: int = 5, checkpoint_dir: str | None = None):
        self.max_in_a_row = max_in_a_row
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.in_a_row = 0
        self.skipped = 0

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if str(trainer.precision).startswith("16"):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack([g.norm() for g in grads])).all()):
            self.in_a_row = 0
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None  # the optimizer leaves parameters without a gradient untouched
        self.in_a_row += 1
        self.skipped += 1
        log.warning("step %d: non-finite gradients, step skipped (%d in a row)", trainer.global_step, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise UserError(
                f"the loss was not finite for {self.in_a_row} steps in a row (up to step {trainer.global_step}); "
                f"last good checkpoint: {self._newest_checkpoint()}. Resume from it with a lower optim.lr or "
                "a smaller trainer.gradient_clip_val, or check the data"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("train/nonfinite_steps", float(self.skipped), reduce_fx="max")

    def _newest_checkpoint(self) -> str:
        found = (
            sorted(self.checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if self.checkpoint_dir else []
        )
        return str(found[-1]) if found else "none yet"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
