"""What every stage shares: optimizer and LR schedule from config, and counting of skipped samples."""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate

from dalle_lightning.data.decode import SKIP_REASONS
from dalle_lightning.errors import UserError
from dalle_lightning.models.clip import FrozenClip

log = logging.getLogger(__name__)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base LR, then cosine decay to `min_lr_ratio` of it at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluation_epoch(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Whether this validation epoch is one for the costly evaluations (sampling images): every `every_n_epochs`
    epochs and the last one, never the sanity check. The same answer on every rank."""
    if trainer.sanity_checking or every_n_epochs <= 0:
        return False
    epoch = trainer.current_epoch + 1
    return epoch % every_n_epochs == 0 or epoch == trainer.max_epochs


def rng_states() -> dict[str, Any]:
    """The states of torch's (CPU and CUDA), numpy's and Python's global generators, as plain tensors, lists
    and tuples so that a checkpoint holding them loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch's (CPU and CUDA), numpy's and Python's global generators for global rank `rank`, with a 32-bit
    seed derived from (seed, rank)."""
    derived = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Put back what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class StageModule(L.LightningModule):
    """Base of the stage modules. `optim` and `scheduler` are config dicts (`_target_` + `_partial_`), kept
    as plain data so checkpoints load with `weights_only=True`."""

    # Submodules loaded from elsewhere and never trained (an Inception network for FID): kept out of checkpoints.
    # The frozen CLIP is not a submodule at all (`FrozenClip`): out of checkpoints, the optimizer and EMA's copy.
    frozen_prefixes: tuple[str, ...] = ()
    clip: FrozenClip | None = None
    # Whether the CLIP embeddings the stage takes or makes are L2-normalised; None: it takes none.
    normalize_embeddings: bool | None = None
    # The networks a step spends its time in (dotted submodule paths), for `compile_networks`.
    compiled_networks: tuple[str, ...] = ()
    # The transformers / diffusers models whose activations `gradient_checkpointing=true` recomputes.
    checkpointed_networks: tuple[str, ...] = ()

    def __init__(self, optim: Mapping[str, Any], scheduler: Mapping[str, Any] | None = None):
        super().__init__()
        self.optim_config = dict(optim)
        self.scheduler_config = dict(scheduler) if scheduler else None
        self.skipped: Counter = Counter()
        self._rng_to_restore: dict[str, Any] | None = None

    def _apply(self, fn: Any, recurse: bool = True) -> StageModule:
        # `.to()`, `.cuda()`, `.half()`, ... reach the frozen CLIP too, which is no submodule (see FrozenClip).
        super()._apply(fn, recurse)
        if self.clip is not None:
            self.clip._apply(fn)
        return self

    @property
    def embedding_convention(self) -> str | None:
        """The convention of `normalize_embeddings` (`models.clip.EMBEDDING_CONVENTIONS`): unit or raw."""
        if self.normalize_embeddings is None:
            return None
        return "unit" if self.normalize_embeddings else "raw"

    def manifest_info(self) -> dict[str, Any]:
        """What the stage's export manifest records besides its config: the frozen CLIP, and the convention of the
        embeddings the stage takes or makes (`embedding_convention`, see `models.clip.EMBEDDING_CONVENTIONS`)."""
        info: dict[str, Any] = {"clip": self.clip.source} if self.clip is not None else {}
        if self.embedding_convention is not None:
            info["embeddings"] = {"convention": self.embedding_convention, "dim": self.clip.projection_dim}
        return info

    def compile_networks(self, **options: Any) -> None:
        """`torch.compile` the stage's networks in place (`nn.Module.compile`), so that state-dict keys, and with
        them checkpoints, EMA weights and exports, stay those of the eager modules. `options` go to torch.compile."""
        for name in self.compiled_networks:
            self.get_submodule(name).compile(**options)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the networks' activations in the backward pass instead of keeping them (less memory, a
        slower step), with the libraries' own switches."""
        if not self.checkpointed_networks:
            raise UserError(
                f"gradient_checkpointing=true: {type(self).__name__}'s networks do not support it; set it to false"
            )
        for name in self.checkpointed_networks:
            network = self.get_submodule(name)
            enable = (
                getattr(network, "activation_checkpointing_enable", None)  # transformers 5
                or getattr(network, "gradient_checkpointing_enable", None)  # transformers 4
                or network.enable_gradient_checkpointing  # diffusers
            )
            enable()

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only, not on biases, norms, embeddings' scales or temperatures."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 and "embedding" not in name else no_decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        extra = {}
        if self.device.type == "cuda":
            # Lightning refuses gradient clipping with a fused optimizer under mixed precision; foreach is
            # the fastest path that allows it.
            extra = {"foreach": True} if self.trainer.gradient_clip_val else {"fused": True}
        elif self._trainer is None or str(self._trainer.precision) == "32-true":
            # torch's fused CPU AdamW: 15% faster prior steps on 2 cores than the default (benchmarks/README.md).
            extra = {"fused": True}
        optimizer = instantiate(self.optim_config)(self.parameter_groups(), **extra)
        if self.scheduler_config is None:
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = instantiate(self.scheduler_config)(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Every process built the module from the same seed, so the weights start equal on every rank; from here each
    # rank draws its own diffusion timesteps, noise and dropout masks, or N ranks would repeat one rank's draws.
    # Rank zero keeps the stream it has (that of a run of one process), every other rank gets one of its own.
    # Resumed runs too: the checkpoint then puts back each rank's saved state (on_load_checkpoint).
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.global_rank > 0:
            # The seed train.py gave seed_everything (Lightning's DDP resets every rank to it before `setup`).
            seed_rank(int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())), self.global_rank)

    # Batches carry the counts of samples their worker skipped; collect them, log totals per epoch.
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            # Restored here, not when the checkpoint loads: the sanity check and the loader start in between.
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self._take_skipped(batch)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._take_skipped(batch)

    def _take_skipped(self, batch: Any) -> None:
        if isinstance(batch, dict):
            skipped = batch.pop("skipped", {})
            # The sanity check reads the start of the validation set that the epoch's validation reads again:
            # counting both would log those skips twice.
            if self._trainer is None or not self.trainer.sanity_checking:
                self.skipped.update(skipped)

    def on_train_epoch_end(self) -> None:
        counts = {f"data/skipped/{reason}": float(self.skipped.get(reason, 0)) for reason in SKIP_REASONS}
        self.log_dict(counts, reduce_fx="sum", sync_dist=True)
        self.skipped.clear()

    # Frozen submodules are left out of checkpoints (both the weights and, with EMA, the raw weights Lightning's
    # WeightAveraging keeps in `current_model_state`) and filled back in from the loaded export on restore.
    _STATE_KEYS = ("state_dict", "current_model_state")

    # The random number generators (diffusion timesteps and noise, dropout) of every rank travel with the
    # checkpoint (a list by global rank), so that a resumed run draws the numbers the uninterrupted run would have
    # drawn. Every rank saves (Lightning's save_checkpoint runs this hook everywhere, rank zero writes the file).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = rng_states()
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states"] = gathered
        else:
            checkpoint["rng_states"] = [states]
        if not self.frozen_prefixes:
            return
        for key in self._STATE_KEYS:
            if key in checkpoint:
                checkpoint[key] = {k: v for k, v in checkpoint[key].items() if not k.startswith(self.frozen_prefixes)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = self._own_rng_states(checkpoint.get("rng_states"))
        if not self.frozen_prefixes:
            return
        frozen = {k: v for k, v in self.state_dict().items() if k.startswith(self.frozen_prefixes)}
        for key in self._STATE_KEYS:
            if key in checkpoint:
                checkpoint[key] = {**frozen, **checkpoint[key]}

    def _own_rng_states(self, saved: Any) -> dict[str, Any] | None:
        """This rank's states among those a checkpoint saved (one dict: a checkpoint of rank zero's alone)."""
        saved = [saved] if isinstance(saved, Mapping) else list(saved or [])
        rank = self.global_rank
        if rank < len(saved):
            return saved[rank]
        if rank == len(saved) > 0:  # warned once, by the first rank without a state
            log.warning(
                "the checkpoint holds the random states of %d rank(s), this run has %d: ranks from %d on draw "
                "fresh numbers (seeded by rank), so the resumed run is not an exact continuation",
                len(saved),
                self.trainer.world_size,
                len(saved),
            )
        return None
