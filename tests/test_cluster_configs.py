"""Cluster configs: the SLURM launcher's values, the sbatch script submitit writes from them, Lightning's view
of a (faked) SLURM allocation under trainer=slurm, and the FSDP strategy's wrapping of every stage's blocks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config

LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2"]
LAUNCHER += ["hydra.launcher.gpus_per_node=4"]


@pytest.fixture
def outside_slurm(monkeypatch):
    """No SLURM variables: the test machine might be a SLURM node itself."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)


def _launcher() -> dict:
    return OmegaConf.to_container(HydraConfig.get().launcher, resolve=True)


def test_slurm_launcher_values_and_the_trainer_that_follows_them(tmp_path, outside_slurm):
    cfg = compose_config([*LAUNCHER, "trainer=slurm"], tmp_path)
    launcher = _launcher()
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["nodes"] == 2 and launcher["gpus_per_node"] == 4
    assert launcher["tasks_per_node"] == 4  # one task per GPU, as Lightning wants
    assert launcher["timeout_min"] == 1440 and launcher["max_num_timeout"] == 10
    assert launcher["signal_delay_s"] == 120 and launcher["additional_parameters"] == {"requeue": True}
    assert launcher["submitit_folder"].startswith(f"{tmp_path}/outputs/clip/multiruns/")
    # The numbers were given once, to the launcher; the trainer reads them from there.
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert trainer["devices"] == 4 and trainer["num_nodes"] == 2 and trainer["accelerator"] == "gpu"
    assert trainer["strategy"]["_target_"] == "lightning.pytorch.strategies.DDPStrategy"


def test_sbatch_script_submitit_writes_from_the_launcher(tmp_path, outside_slurm, monkeypatch):
    """The #SBATCH lines of the job, built by submitit from the resolved launcher values exactly as
    hydra_submitit_launcher's launch() hands them over (submitit only needs an `srun` on PATH to start)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    compose_config([*LAUNCHER, "trainer=slurm"], tmp_path)
    params = {k: v for k, v in _launcher().items() if k != "_target_"}
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    sbatch = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    expected = ["nodes=2", "ntasks-per-node=4", "gpus-per-node=4", "partition=gpu", "time=1440"]
    expected += ["cpus-per-task=8", "mem=200GB", "signal=USR2@120"]
    assert {f"#SBATCH --{flag}" for flag in expected} <= sbatch
    assert "#SBATCH --requeue" in sbatch
    assert "\nsrun " in script  # every task is started by srun: what Lightning's SLURMEnvironment detects


def _fake_allocation(monkeypatch, nodes: int, tasks_per_node: int, procid: int) -> None:
    """The variables srun sets in each task of an sbatch allocation."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % tasks_per_node),
        "SLURM_NODEID": str(procid // tasks_per_node),
        "SLURM_NODELIST": "gpu-[001-002]",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # SLURMEnvironment writes MASTER_ADDR/MASTER_PORT from the fake allocation into os.environ: have monkeypatch
    # restore them, or a later DDP test in this process would dial the fake node `gpu-001` and hang.
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    # A Trainer built here sets the process-wide rank_zero_only.rank to the fake task's rank (3): restore it, or
    # every later logger call in this pytest worker is dropped as not rank zero.
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)


def test_trainer_slurm_matches_the_allocation_it_runs_in(tmp_path, outside_slurm, monkeypatch):
    """Under a 2 nodes x 2 tasks allocation (task 3: second node, second GPU) trainer=slurm gives Lightning the
    allocation's shape: SLURMEnvironment is picked, ranks come from SLURM, and Lightning's own check of
    devices/num_nodes against the allocation (run at fit) passes. The launcher's values (8 GPUs on 1 node here)
    do not count inside a job step: the allocation does."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    _fake_allocation(monkeypatch, nodes=2, tasks_per_node=2, procid=3)
    cfg = compose_config(["hydra/launcher=slurm", "trainer=slurm", "trainer.accelerator=cpu", "logger=none"], tmp_path)
    trainer = instantiate(cfg.trainer)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and isinstance(trainer.strategy, DDPStrategy)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 2, 4)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (3, 1, 1)
    assert environment.main_address == "gpu-001" and not trainer.is_global_zero
    environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)

    # The plain DDP trainer with its defaults (1 device, 1 node) is what Lightning refuses at fit.
    cfg = compose_config(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "logger=none"], tmp_path)
    trainer = instantiate(cfg.trainer)
    with pytest.raises(ValueError, match=r"devices=1.*--ntasks-per-node=2"):
        trainer.strategy.cluster_environment.validate_settings(trainer.num_devices, trainer.num_nodes)


def test_trainer_slurm_outside_an_allocation_falls_back_to_the_launcher_or_one(tmp_path, outside_slurm):
    cfg = compose_config(["trainer=slurm"], tmp_path)  # the basic launcher: no SLURM numbers anywhere
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (1, 1)
    cfg = compose_config(["trainer=fsdp"], tmp_path)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == ("auto", 1)
    cfg = compose_config([*LAUNCHER, "trainer=fsdp"], tmp_path)
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)


def test_fsdp_strategy_arguments(tmp_path, outside_slurm):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    cfg = compose_config(["stage=decoder", "trainer=fsdp"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    # One ordinary checkpoint file (what resume, export and the atomic checkpoint writer handle).
    assert strategy._state_dict_type == "full"
    assert str(strategy.sharding_strategy) == "ShardingStrategy.FULL_SHARD"
    assert strategy.kwargs["use_orig_params"] is True  # frozen CLIP and trainable UNet in one module
    assert strategy.kwargs["limit_all_gathers"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    blocks = {"ResnetBlock2D", "BasicTransformerBlock", "CLIPEncoderLayer"}
    embeddings = {"CLIPTextEmbeddings", "CLIPVisionEmbeddings"}
    assert {cls.__name__ for cls in policy._module_classes} == blocks | embeddings
    # Activations are recomputed per block (an embedding lookup has nothing worth recomputing).
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert {cls.__name__ for cls in checkpointing._module_classes} == blocks


@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler"])
def test_fsdp_wraps_most_of_each_stage_trainable_weights(stage, tmp_path, tiny_clip_export, outside_slurm):
    """The wrap policy's classes are real blocks of each stage's model: FSDP's own policy walk over the built
    module finds them, and they hold most trainable weights (else FULL_SHARD would still gather nearly the whole
    model at once in the root unit)."""
    overrides = [f"stage={stage}", "trainer=fsdp", f"stage.clip={tiny_clip_export}"]
    cfg = compose_config(overrides[:2] if stage == "clip" else overrides, tmp_path)
    module = instantiate(cfg.stage.module, tokenizer=None, _convert_="all")
    policy = instantiate(cfg.trainer.strategy.auto_wrap_policy)
    units = [m for m in policy._run_policy(module, set(), {}) if m is not module]
    assert units
    wrapped = {id(p) for unit in units for p in unit.parameters() if p.requires_grad}
    trainable = [p for p in module.parameters() if p.requires_grad]
    share = sum(p.numel() for p in trainable if id(p) in wrapped) / sum(p.numel() for p in trainable)
    assert share > 0.8, f"{stage}: {share:.3f} of trainable weights in {len(units)} FSDP units"


def test_fsdp_has_no_class_path_that_does_not_import(tmp_path, outside_slurm):
    """A misspelt class path would only fail when a GPU job starts."""
    cfg = compose_config(["trainer=fsdp"], tmp_path)
    strategy = cfg.trainer.strategy
    for node in [*strategy.auto_wrap_policy.module_classes, *strategy.activation_checkpointing_policy.module_classes]:
        cls = instantiate(node)
        assert isinstance(cls, type) and cls.__module__ == node.path.rsplit(".", 1)[0], node.path
    assert Path(cfg.paths.root_dir) == tmp_path
