"""What a Hydra sweeper optimises: the value `train.py` returns at the end of a run."""

from __future__ import annotations

import math


class ObjectiveError(RuntimeError):
    """A sweep's trial ended without a finite value of the metric the sweeper optimises."""


def objective(metrics: dict[str, float], name: str | None) -> float | None:
    """`metrics[optimized_metric]`: the value a Hydra sweeper (Optuna) minimises or maximises.

    Optuna's sweeper takes a missing (None) or NaN value as a failed trial, logs one warning and samples on,
    so a misspelt optimized_metric or a diverging search would quietly burn every trial (and +-inf would even
    count as a result). Under a sweeper that optimises the value this raises instead: the sweeper records the
    trial as FAIL and, past hydra.sweeper.max_failure_rate (0 by default), stops the sweep with this message.
    Plain runs and grid multiruns ignore the value, so there it is returned as it is.
    """
    if not name:
        return None
    value = metrics.get(name)
    if value is not None and math.isfinite(value):
        return value
    from hydra.core.hydra_config import HydraConfig

    sweeper = str(HydraConfig.get().sweeper.get("_target_", "")) if HydraConfig.initialized() else ""
    if sweeper and not sweeper.endswith("BasicSweeper"):
        found = "missing" if value is None else f"{value}"
        raise ObjectiveError(
            f"optimized_metric={name!r} is {found} at the end of this trial (metrics logged: {sorted(metrics)}):"
            " the sweeper has nothing to optimise"
        )
    return value
