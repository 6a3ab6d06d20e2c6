"""Optuna sweeps (`hparams_search=<stage>_optuna`): what each config resolves to, the objective train.py hands
the sweeper, and a real two-trial sweep of the tiny CLIP that is then resumed."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from conftest import FAST_CLIP, compose_config, run_train, shapes_overrides, write_stage_export
from dalle_lightning.sweeps import ObjectiveError, objective

STAGES = ["clip", "prior", "decoder", "upsampler"]


def _sweeper() -> dict:
    return OmegaConf.to_container(HydraConfig.get().sweeper, resolve=True)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_search_resolves_to_a_resumable_study_of_its_own_metric(stage, tmp_path):
    cfg = compose_config([f"hparams_search={stage}_optuna"], tmp_path)
    sweeper = _sweeper()
    assert cfg.stage.name == stage and cfg.optimized_metric == cfg.stage.monitor
    assert sweeper["_target_"].endswith("OptunaSweeper") and HydraConfig.get().mode.name == "MULTIRUN"
    # The direction is the checkpoint callback's: ModelCheckpoint(mode=min|max) and the study agree.
    assert sweeper["direction"] == {"min": "minimize", "max": "maximize"}[cfg.stage.monitor_mode]
    assert cfg.callbacks.model_checkpoint.mode == cfg.stage.monitor_mode
    assert sweeper["study_name"] == f"{stage}_optuna"
    assert sweeper["storage"]["url"] == f"sqlite:///{tmp_path}/outputs/{stage}/optuna/{stage}_optuna.db"
    assert (tmp_path / "outputs" / stage / "optuna").is_dir()  # SQLite needs the folder
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler" and sweeper["sampler"]["seed"] == 42
    assert HydraConfig.get().sweep.dir.startswith(f"{tmp_path}/outputs/{stage}/optuna/{stage}_optuna/")
    # Every searched key exists in the stage's config (a misspelt key would only fail at the first trial).
    params = sweeper["params"]
    assert {"optim.lr", "optim.weight_decay", "data.batch_size"} <= set(params)
    for key in params:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key


def _widest(params: dict[str, str]) -> list[str]:
    """The last (widest) value of every choice(...) of a search space, as overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    overrides = [parser.parse_override(f"{key}={space}") for key, space in params.items()]
    return [f"{o.key_or_group}={list(o.sweep_string_iterator())[-1]}" for o in overrides if o.is_choice_sweep()]


@pytest.mark.parametrize("stage", STAGES)
def test_widest_point_of_each_search_space_builds_the_stage(stage, tmp_path, tiny_clip_export):
    """The model keys a search sets are ones the stage's module accepts (heads divide widths, norm groups
    divide channels): the stage module is built at the widest choice of every categorical parameter."""
    compose_config([f"hparams_search={stage}_optuna"], tmp_path)
    widest = _widest(_sweeper()["params"])
    assert any(key.startswith("model.") for key in widest)
    if stage == "clip":
        import hydra

        cfg = compose_config([f"hparams_search={stage}_optuna", *widest], tmp_path)
        module = hydra.utils.instantiate(cfg.stage.module, _convert_="all")
        assert module.model.config.vision_config.hidden_size == cfg.model.clip.vision.hidden_size == 256
    else:
        export = write_stage_export(stage, tiny_clip_export, tmp_path, [f"hparams_search={stage}_optuna", *widest])
        assert (export / "dalle_lightning.json").is_file()


def test_objective_fails_a_trial_without_a_finite_value_only_under_optuna(tmp_path):
    metrics = {"val/t2i_r1": 0.25, "val/loss": float("nan"), "val/inf": float("inf")}
    compose_config(["hparams_search=clip_optuna"], tmp_path)
    assert objective(metrics, "val/t2i_r1") == 0.25
    for name, found in [("val/t2i_r5", "missing"), ("val/loss", "nan"), ("val/inf", "inf")]:
        with pytest.raises(ObjectiveError, match=f"optimized_metric='{name}' is {found}"):
            objective(metrics, name)
    # A plain run or a grid multirun ignores the value: nothing to fail.
    compose_config([], tmp_path)
    assert objective(metrics, "val/t2i_r5") is None and math.isnan(objective(metrics, "val/loss"))


def test_a_resumed_study_gets_a_new_sampler_seed(tmp_path):
    """A TPE sampler seeded alike on resume would replay the first run's random start-up points."""
    import optuna
    from hydra.utils import instantiate

    compose_config(["hparams_search=prior_optuna"], tmp_path)
    study = optuna.create_study(study_name="prior_optuna", storage=instantiate(HydraConfig.get().sweeper.storage))
    for x in (0.1, 0.2, 0.3):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        study.tell(trial, x)
    assert _sweeper()["sampler"]["seed"] == 42 + 3
    compose_config(["hparams_search=prior_optuna", "hydra.sweeper.study_name=other"], tmp_path)
    assert _sweeper()["sampler"]["seed"] == 42


def _wandb_run_record(path: Path):
    """The run record (name, group) of an offline `run-*.wandb` file: a 7-byte file header, then LevelDB-log
    records (crc32, length, type; FULL=1 FIRST=2 MIDDLE=3 LAST=4) in 32 KiB blocks, each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {path}")


def _study(db: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


# Trials of seconds: two optimizer steps, one validation batch, one core.
SWEEP = [
    *FAST_CLIP,
    "trainer.max_steps=2",
    "data.samples_per_epoch=64",
    "data.val_samples=32",
    "hydra.sweeper.n_trials=2",
]


@pytest.mark.slow
def test_two_trial_optuna_sweep_records_its_study_and_resumes(tmp_path, shapes_root):
    args = ["-m", "hparams_search=clip_optuna", *SWEEP, *shapes_overrides(shapes_root), "logger=wandb"]
    args += [f"paths.log_dir={tmp_path}/outputs", f"paths.export_dir={tmp_path}/export"]
    first = run_train(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]

    optuna_dir = tmp_path / "outputs" / "clip" / "optuna"
    study = _study(optuna_dir / "clip_optuna.db", "clip_optuna")
    assert study.direction.name == "MAXIMIZE"
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(math.isfinite(t.value) and 0 <= t.value <= 1 for t in trials)
    swept = {"optim.lr", "optim.weight_decay", "model.clip.vision.hidden_size", "model.clip.text.hidden_size"}
    assert all(set(t.params) == swept for t in trials)  # data.batch_size is fixed on the command line
    assert trials[0].params["optim.lr"] != trials[1].params["optim.lr"]

    # One sweep folder holding both trials and Optuna's summary.
    (sweep,) = (optuna_dir / "clip_optuna").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == max(t.value for t in trials)
    for job, trial in zip(("0", "1"), trials):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["val/t2i_r1"] == trial.value  # what Optuna was told is the job's metric
        assert (sweep / job / "export" / "clip" / "model.safetensors").is_file()  # each trial's own export
        (run_file,) = (sweep / job / "wandb").glob("offline-run-*/run-*.wandb")
        run = _wandb_run_record(run_file)
        assert run.run_group == "clip_optuna"
        assert run.display_name.startswith(f"clip-{sweep.name}-{job}-")
        lr = trial.params["optim.lr"]
        assert f"optim.lr={lr:.3g}" in run.display_name
        assert f"model.clip.text.hidden_size={trial.params['model.clip.text.hidden_size']}" in run.display_name

    # The same command again: the study goes on (two more trials, not a new study), at new points.
    second = run_train(args, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = _study(optuna_dir / "clip_optuna.db", "clip_optuna").trials
    assert [t.number for t in resumed] == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in resumed)
    assert {t.params["optim.lr"] for t in resumed[2:]}.isdisjoint(t.params["optim.lr"] for t in resumed[:2])
    sweeps = sorted((optuna_dir / "clip_optuna").iterdir())
    assert len(sweeps) == 2 and sorted(p.name for p in sweeps[1].iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "export" / "clip").exists()


@pytest.mark.slow
def test_trial_without_its_metric_stops_the_sweep_with_the_reason(tmp_path, shapes_root):
    """optimized_metric names no logged metric: the trial is recorded as FAIL and the sweep stops, naming it,
    instead of Optuna's default of a warning per trial and sampling on."""
    args = ["-m", "hparams_search=clip_optuna", *SWEEP, *shapes_overrides(shapes_root), "logger=none"]
    args += [f"paths.log_dir={tmp_path}/outputs", "optimized_metric=val/t2i_r99", "trainer.max_steps=1"]
    result = run_train(args, tmp_path)
    assert result.returncode != 0
    assert "optimized_metric='val/t2i_r99' is missing" in result.stderr + result.stdout
    trials = _study(tmp_path / "outputs" / "clip" / "optuna" / "clip_optuna.db", "clip_optuna").trials
    assert [t.state.name for t in trials] == ["FAIL"]  # stopped after the first trial, not after both
