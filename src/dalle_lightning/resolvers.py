"""OmegaConf resolvers used by the configs (`${dl.NAME:}`); imported by the entry points before Hydra runs."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def auto_precision() -> str:
    """bf16 mixed precision where the GPU supports it, full fp32 elsewhere (CPUs here lack fast bf16)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def launch_dir() -> str:
    """The folder train.py was started in: Hydra's runtime.cwd inside a job, the current folder before one.

    The same folder (jobs never chdir here), but `${hydra:runtime.cwd}` fails before the first job of a multirun
    has set Hydra's config, which is when the sweep folder and the sweeper's storage are resolved.
    """
    hydra_cfg = _hydra_config()
    return str(hydra_cfg.runtime.cwd) if hydra_cfg is not None else os.getcwd()


# --- Clusters (conf/trainer/slurm.yaml, conf/trainer/fsdp.yaml) ----------------------------------------------

_SLURM_ENV = {"nodes": "SLURM_NNODES", "tasks_per_node": "SLURM_NTASKS_PER_NODE"}


def slurm(key: str, default: Any = 1) -> Any:
    """`nodes` or `tasks_per_node` of the SLURM allocation, for trainer.num_nodes / trainer.devices.

    Lightning (SLURMEnvironment) requires devices == SLURM_NTASKS_PER_NODE and num_nodes == SLURM_NNODES and
    fails at fit otherwise, so inside a SLURM job step the allocation's own values are taken (whether
    hydra/launcher=slurm or your own sbatch + srun started it); outside one (printing the config, a login node)
    the submitit launcher's values (hydra.launcher.<key>); with neither, `default`. Interactive allocations
    (job name bash/interactive) are left to `default` as Lightning ignores them too.
    """
    if key not in _SLURM_ENV:
        raise ValueError(f"dl.slurm:{key}: expected one of {sorted(_SLURM_ENV)}")
    if "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        value = os.environ.get(_SLURM_ENV[key])
        if value is None and key == "tasks_per_node":  # `--ntasks` without `--ntasks-per-node`
            value = str(int(os.environ["SLURM_NTASKS"]) // int(os.environ.get("SLURM_NNODES", "1")))
        if value is not None:
            return int(value.split("(")[0])  # "8(x2)" on some versions
    hydra_cfg = _hydra_config()
    launched = OmegaConf.select(hydra_cfg, f"launcher.{key}", default=None) if hydra_cfg is not None else None
    return launched if launched is not None else default


# --- Optuna sweeps (conf/hparams_search) -------------------------------------------------------------------

_DIRECTIONS = {"min": "minimize", "max": "maximize"}


def optuna_direction(monitor_mode: str) -> str:
    """A stage's `monitor_mode` (min/max, as ModelCheckpoint takes it) as Optuna's study direction, so a sweep
    optimises the stage's metric the same way its checkpoints are chosen."""
    if monitor_mode not in _DIRECTIONS:
        raise ValueError(f"stage.monitor_mode={monitor_mode!r}: expected 'min' or 'max'")
    return _DIRECTIONS[monitor_mode]


def sqlite_url(path: str) -> str:
    """`sqlite:///<absolute path>` for an Optuna study file, creating its folder (SQLite does not)."""
    db = Path(path).expanduser().absolute()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def study_seed(seed: int, url: str, study_name: str) -> int:
    """`seed` plus the number of trials the study already holds.

    A resumed study builds a new sampler: with the same seed its random start-up phase would draw exactly the
    parameters of the first run's trials again. Offsetting by the trials already recorded keeps a fresh study
    reproducible and gives a resumed one new points. Read with sqlite3 (Optuna's own tables), read-only.
    """
    db = Path(url.removeprefix("sqlite:///"))
    if not url.startswith("sqlite:///") or not db.is_file():
        return int(seed)
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM trials JOIN studies ON trials.study_id = studies.study_id"
                " WHERE studies.study_name = ?",
                (study_name,),
            ).fetchone()
    except sqlite3.Error:  # a file without Optuna's tables yet: Optuna creates them
        return int(seed)
    return int(seed) + int(count)


def _hydra_config() -> Any:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _is_sweep_job(hydra_cfg: Any) -> bool:
    # Hydra composes each job of a multirun in RUN mode; what marks a job of a sweep is its job number.
    return hydra_cfg is not None and OmegaConf.select(hydra_cfg, "job.num", default=None) is not None


def sweep_group(default: str) -> str:
    """The wandb group of a run: for a job of an Optuna sweep, its study (so the trials of a resumed study join
    the same group); for a job of any other multirun, `<default>-<sweep folder>`; for a single run, `default`."""
    hydra_cfg = _hydra_config()
    if not _is_sweep_job(hydra_cfg):
        return default
    study = OmegaConf.select(hydra_cfg, "sweeper.study_name", default=None)
    return str(study) if study else f"{default}-{Path(str(hydra_cfg.sweep.dir)).name}"


def unless_sweep_job(single: Any, in_sweep_job: Any) -> Any:
    """`single` for a single run, `in_sweep_job` for a job of a multirun (grid or Optuna)."""
    return in_sweep_job if _is_sweep_job(_hydra_config()) else single


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value and "e" not in value.lower() else f"{number:.3g}"


def swept_values() -> str:
    """`-<job number>-<key=value,...>` for a job of a sweep, '' for a single run.

    The values are those of the sweeper's search space (`hydra.sweeper.params`) as this job got them, floats
    to 3 significant digits: wandb run names of one sweep then differ and say what each trial tried.
    """
    hydra_cfg = _hydra_config()
    if not _is_sweep_job(hydra_cfg):
        return ""
    swept = set(OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {})
    values = []
    for override in hydra_cfg.overrides.task:
        key, _, value = str(override).partition("=")
        if key.lstrip("+~") in swept:
            values.append(f"{key.lstrip('+~')}={_short(value)}")
    suffix = f"-{hydra_cfg.job.num}"
    return f"{suffix}-{','.join(values)}" if values else suffix


OmegaConf.register_new_resolver("dl.auto_precision", auto_precision, replace=True)
OmegaConf.register_new_resolver("dl.launch_dir", launch_dir, replace=True)
OmegaConf.register_new_resolver("dl.slurm", slurm, replace=True)
OmegaConf.register_new_resolver("dl.optuna_direction", optuna_direction, replace=True)
OmegaConf.register_new_resolver("dl.sqlite_url", sqlite_url, replace=True)
OmegaConf.register_new_resolver("dl.study_seed", study_seed, replace=True)
OmegaConf.register_new_resolver("dl.sweep_group", sweep_group, replace=True)
OmegaConf.register_new_resolver("dl.swept_values", swept_values, replace=True)
OmegaConf.register_new_resolver("dl.unless_sweep_job", unless_sweep_job, replace=True)
