"""Hydra composition of every stage and trainer, strategy selection, and one-line errors for user mistakes."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import OmegaConf

from conftest import compose_config, lines_starting, run_train

STAGES = ["clip", "prior", "decoder", "upsampler"]
NO_DATA = "data.root=/nowhere/shapes"  # these errors must come before any data is touched


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp", "fsdp"])
def test_every_stage_composes_with_every_trainer(stage, trainer, tmp_path):
    cfg = compose_config([f"stage={stage}", f"trainer={trainer}", "trainer.devices=8"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # interpolations resolve
    assert resolved["stage"]["name"] == stage
    assert resolved["trainer"]["devices"] == 8
    assert resolved["callbacks"]["export"]["dirpath"].endswith(f"export/{stage}")
    assert resolved["trainer"]["precision"] in ("32-true", "bf16-mixed")


@pytest.mark.parametrize("stage", STAGES)
def test_each_demo_experiment_trains_its_own_stage(stage, tmp_path):
    cfg = compose_config([f"experiment=demo/{stage}"], tmp_path)
    assert cfg.stage.name == stage and f".stages.{stage}." in cfg.stage.module._target_


@pytest.mark.parametrize("logger", ["wandb", "csv", "tensorboard", "none"])
def test_logger_choices_compose(logger, tmp_path):
    cfg = compose_config([f"logger={logger}"], tmp_path)
    if logger == "none":
        assert not cfg.get("logger")
    else:
        assert list(cfg.logger) == [logger]
    if logger == "wandb":
        assert cfg.logger.wandb.mode == "offline"


def test_devices_alone_selects_ddp(tmp_path):
    cfg = compose_config(["trainer.devices=2", "trainer.accelerator=cpu", "logger=none"], tmp_path)
    assert isinstance(instantiate(cfg.trainer).strategy, DDPStrategy)
    cfg = compose_config(["logger=none"], tmp_path)
    assert isinstance(instantiate(cfg.trainer).strategy, SingleDeviceStrategy)


def test_cfg_job_prints_for_decoder_on_8_devices(tmp_path):
    result = run_train(["stage=decoder", "trainer.devices=8", "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "devices: 8" in result.stdout and "name: decoder" in result.stdout


def _one_error_line(result) -> str:
    lines = lines_starting(result.stderr)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["stage=decoder", "stage.clip=/nowhere/no-clip", NO_DATA], "stage.clip='/nowhere/no-clip' does not exist"),
        (
            ["stage=upsampler", "stage.clip=/nowhere/no-clip", NO_DATA],
            "stage.clip='/nowhere/no-clip' does not exist",
        ),
        (
            ["stage=prior", "data.train_shards=/nowhere.tar", "stage.clip=/nowhere/no-clip"],
            "stage.clip='/nowhere/no-clip' does not exist",
        ),
        (["data=webdataset"], "missing required config value 'data.train_shards'"),
        (["stage=prior", "data=clip_retrieval"], "missing required config value 'data.path'"),
        (["stage=prior", "data=clip_retrieval", "data.path=/nowhere/emb"], "data.path='/nowhere/emb' is not a folder"),
        (
            ["data=webdataset", "data.train_shards='/nowhere/shard-{0000..0009}.tar'"],
            "data.train_shards: '/nowhere/shard-{0000..0009}.tar' matches no file",
        ),
        (["ckpt_path=/nowhere/last.ckpt", NO_DATA], "ckpt_path='/nowhere/last.ckpt' does not exist"),
        (["ckpt_path=last", "paths.log_dir=/nowhere", NO_DATA], "ckpt_path=last: no last.ckpt under /nowhere/clip"),
        (["data.image_size=4", NO_DATA], "data.image_size=4 is too small"),
        (
            ["trainer=fsdp", "gradient_checkpointing=true", NO_DATA],
            "gradient_checkpointing=true and trainer.strategy.activation_checkpointing_policy would both recompute",
        ),
    ],
)
def test_user_mistakes_are_one_line_errors(overrides, expected, tmp_path):
    result = run_train([*overrides, "logger=none"], tmp_path)
    assert expected in _one_error_line(result)


def test_config_mistakes_are_found_before_torch_is_imported(tmp_path):
    """train() checks what the config alone shows before importing Lightning and torch (~10 s on 2 cores)."""
    import subprocess
    import sys

    from conftest import CONF

    script = f"""
import sys
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
import dalle_lightning.resolvers
from dalle_lightning.errors import UserError
from dalle_lightning.train import train
with initialize_config_dir(config_dir={str(CONF)!r}, version_base="1.3"):
    for overrides in (["stage=decoder", "stage.clip=/nowhere/no-clip"], ["data=webdataset"], ["ckpt_path=/x.ckpt"]):
        cfg = compose("train", overrides=[*overrides, "paths.output_dir={tmp_path}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            train(cfg)
        except UserError as err:
            print("error:", err)
print("imported:", sorted(name for name in ("lightning", "torch") if name in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    errors = lines_starting(result.stdout)
    assert len(errors) == 3 and "stage.clip='/nowhere/no-clip' does not exist" in errors[0], result.stdout
    assert "'data.train_shards'" in errors[1] and "ckpt_path='/x.ckpt' does not exist" in errors[2], result.stdout
    assert result.stdout.splitlines()[-1] == "imported: []", result.stdout


def test_unknown_stage_names_the_choices(tmp_path):
    result = run_train(["stage=clipp"], tmp_path)
    assert result.returncode != 0
    assert "Could not find 'stage/clipp'" in result.stderr and "clip" in result.stderr
    assert "Traceback" not in result.stderr
