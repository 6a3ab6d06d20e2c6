"""Shared fixtures: a small Shapes build, Hydra composition of the real configs, and train.py runs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import dalle_lightning.resolvers  # noqa: F401
from dalle_lightning.shapes import dataset as shapes

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Small enough to build in seconds, big enough for a few training batches and a val set.
SMALL_SHAPES = dict(num_train=1200, num_val=256, size=64, seed=0, samples_per_shard=400)

# Under pytest-xdist (`make test` runs 2 workers on 2 cores) each worker, and every train.py it starts, uses one
# intra-op thread: two workers of two OpenMP threads each on two cores spin-wait on each other (the suite took
# 920 s that way against 905 s serial).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    shapes.build(root, **SMALL_SHAPES)
    return root


def compose_config(overrides: list[str], tmp_path: Path, config_name: str = "train") -> DictConfig:
    """A script's config (train.py's by default) as the script would see it, with all paths under tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a job: the hydra node is available through HydraConfig only
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


# The Fréchet distance of L2-normalised features (FD in CLIP space) is at most 4 from the means plus 2 from the
# covariances' traces; two different image sets are never at exactly 0.
FD_CLIP_RANGE = (1e-6, 6.0)


def fd_clip_in_range(value: float) -> bool:
    """Whether an FD-CLIP figure is finite, positive and within the bound of unit-norm features."""
    value = float(value)
    return math.isfinite(value) and FD_CLIP_RANGE[0] < value <= FD_CLIP_RANGE[1]


def lines_starting(text: str, prefix: str = "error: ") -> list[str]:
    """The lines of a script's output that start with `prefix` (our one-line errors start with "error: ")."""
    return [line for line in text.splitlines() if line.startswith(prefix)]


def csv_losses(run_dir: Path) -> dict[int, float]:
    """step → train/loss from a run's CSV logger files (logger=csv)."""
    import csv

    rows = []
    for metrics in run_dir.glob("csv/version_*/metrics.csv"):
        with metrics.open() as f:
            rows += [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def shapes_overrides(root: Path) -> list[str]:
    """Point data=shapes at the session's small build (same parameters, so nothing is re-rendered)."""
    return [
        f"data.root={root}",
        f"data.num_train={SMALL_SHAPES['num_train']}",
        f"data.num_val={SMALL_SHAPES['num_val']}",
        f"data.samples_per_shard={SMALL_SHAPES['samples_per_shard']}",
    ]


def run_train(
    args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the real `python train.py ...` entry point in `cwd` (outputs land there)."""
    return run_script("train.py", args, cwd, timeout, env)


def run_script(
    script: str, args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run one of the root scripts (train.py, embed.py, sample.py, evaluate.py) in `cwd`; `env` adds variables. A
    PYTHONPATH given goes before the inherited one, which may name the source tree under test."""
    env = dict(env or {})
    if "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join((env["PYTHONPATH"], os.environ["PYTHONPATH"]))
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false", **env)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# A CLIP training run that takes seconds: a few steps, small batches, no loader workers.
FAST_CLIP = [
    "trainer=cpu",
    "trainer.max_steps=6",
    "trainer.max_epochs=-1",
    "trainer.log_every_n_steps=1",
    "data.batch_size=32",
    "data.samples_per_epoch=96",
    "data.val_samples=64",
    "data.num_workers=0",
    "scheduler.warmup_steps=2",
]


def small_shapes(root: Path, **kwargs):
    """A ShapesDataModule over the session's small build (same parameters, so nothing is re-rendered)."""
    from dalle_lightning.shapes.datamodule import ShapesDataModule

    return ShapesDataModule(
        str(root),
        num_train=SMALL_SHAPES["num_train"],
        num_val=SMALL_SHAPES["num_val"],
        samples_per_shard=SMALL_SHAPES["samples_per_shard"],
        **kwargs,
    )


def first_batch(root: Path, image_size: int, batch_size: int, tokenizer=None) -> dict:
    """The first training batch of the small Shapes build, as the model sees it (images in [-1, 1])."""
    dm = small_shapes(
        root,
        image_size=image_size,
        batch_size=batch_size,
        samples_per_epoch=batch_size,
        num_workers=0,
        tokenizer=tokenizer,
    )
    dm.setup("fit")
    return dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A tar shard with exactly these members (name → bytes)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class Detonator:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


@pytest.fixture(scope="session")
def tiny_clip_export(shapes_root, tmp_path_factory) -> Path:
    """A CLIP export of the tiny preset (random weights, BPE trained on the small Shapes captions)."""
    import torch
    from omegaconf import OmegaConf

    from dalle_lightning.export import write_export
    from dalle_lightning.models.tokenizer import train_bpe
    from dalle_lightning.stages.clip import ClipModule

    tmp = tmp_path_factory.mktemp("clip_export")
    cfg = OmegaConf.to_container(compose_config(["scheduler=constant"], tmp), resolve=True)
    dm = small_shapes(shapes_root, image_size=32)
    tokenizer = train_bpe(dm.captions(1200), vocab_size=400, context_length=24)
    torch.manual_seed(0)
    module = ClipModule(cfg["model"]["clip"], cfg["optim"], None, tokenizer)
    return write_export(tmp / "clip", "clip", module.export)


@pytest.fixture(scope="session")
def pretrained_clips(shapes_root, tmp_path_factory) -> dict[str, Path]:
    """One tiny CLIP (random weights, 32-wide, a BPE of the Shapes captions) saved as published CLIPs are, in the
    layouts the frozen CLIP takes: `clip_model` (CLIPModel.save_pretrained with its tokenizer and image processor,
    as openai/clip-vit-large-patch14), `towers` (text_encoder/, image_encoder/, tokenizer/, image_processor/: as
    Kandinsky 2.2's prior folder), `text_only` (text_encoder/ and tokenizer/: as Karlo's); the same weights in each.
    """
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    from dalle_lightning.models.tokenizer import train_bpe

    tmp = tmp_path_factory.mktemp("pretrained_clips")
    tokenizer = train_bpe(small_shapes(shapes_root, image_size=32).captions(1200), vocab_size=400, context_length=24)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    text = dict(layers, max_position_embeddings=24, vocab_size=len(tokenizer), **ids)
    config = CLIPConfig(text_config=text, vision_config=dict(layers, image_size=32, patch_size=8), projection_dim=32)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    whole = tmp / "clip_model"
    CLIPModel(config).save_pretrained(whole)
    tokenizer.save_pretrained(whole)
    processor.save_pretrained(whole)
    towers, text_only = tmp / "towers", tmp / "text_only"
    for folder in (towers, text_only):
        CLIPTextModelWithProjection.from_pretrained(whole).save_pretrained(folder / "text_encoder")
        tokenizer.save_pretrained(folder / "tokenizer")
    CLIPVisionModelWithProjection.from_pretrained(whole).save_pretrained(towers / "image_encoder")
    processor.save_pretrained(towers / "image_processor")
    return {"clip_model": whole, "towers": towers, "text_only": text_only}


def write_stage_export(stage: str, clip_export: Path, tmp: Path, overrides: list[str] | None = None) -> Path:
    """An export of a prior/decoder/upsampler with random weights, written with the resolved training config
    (what `load_stage_export` rebuilds the module from), as `train.py stage=<stage>` would leave it."""
    import hydra
    import torch
    from omegaconf import OmegaConf

    from dalle_lightning.export import write_export

    overrides = [f"stage={stage}", f"stage.clip={clip_export}", *(overrides or [])]
    cfg = OmegaConf.to_container(compose_config(overrides, tmp), resolve=True)
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg["stage"]["module"], tokenizer=None, _convert_="all")
    if stage == "prior":
        # A fresh PriorTransformer's embedding statistics are zeros (training measures them): with std 0 every
        # sample would be the zero vector, so use the identity statistics of unit-scale embeddings instead.
        module.prior.clip_mean.data.zero_()
        module.prior.clip_std.data.fill_(1.0)
    return write_export(tmp / stage, stage, module.export, cfg, module.manifest_info())


@pytest.fixture(scope="session")
def tiny_exports(tiny_clip_export, tmp_path_factory) -> dict[str, Path]:
    """Exports of all four stages at the tiny presets (random weights): clip, prior, decoder (32 px) and
    upsampler (32 → 64 px), as `UnCLIPPipeline.from_exports` takes them."""
    tmp = tmp_path_factory.mktemp("stage_exports")
    exports = {"clip": tiny_clip_export}
    for stage in ("prior", "decoder", "upsampler"):
        exports[stage] = write_stage_export(stage, tiny_clip_export, tmp)
    return exports


def write_karlo_folder(clip_export: Path, folder: Path, decoder_size: int = 32, upsampler_size: int = 64) -> Path:
    """A folder in Karlo's layout (`UnCLIPPipeline.save_pretrained`, as kakaobrain/karlo-v1-alpha ships) of tiny
    random networks built with diffusers' own classes around the CLIP export's text tower and tokenizer."""
    import torch
    from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    from dalle_lightning.models.clip import load_frozen_clip

    clip = load_frozen_clip(clip_export, text=True, image=False)
    text_encoder, tokenizer = clip.text_encoder, clip.tokenizer
    width, context = text_encoder.config.projection_dim, text_encoder.config.max_position_embeddings
    torch.manual_seed(0)
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=32, num_layers=1, embedding_dim=width, num_embeddings=context
    )
    prior.clip_mean.data.normal_(0, 0.1)
    prior.clip_std.data.uniform_(0.5, 1.5)
    decoder = UNet2DConditionModel(
        sample_size=decoder_size,
        in_channels=3,
        out_channels=6,
        class_embed_type="identity",
        block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=32,
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=8,
    )
    text_proj = UnCLIPTextProjModel(clip_embeddings_dim=width, time_embed_dim=128, cross_attention_dim=64)
    for parameter in text_proj.parameters():  # diffusers starts the null embedding at zero: make every part count
        parameter.data.normal_(0, 0.05)

    def super_res() -> UNet2DModel:
        return UNet2DModel(
            sample_size=upsampler_size,
            in_channels=6,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("ResnetDownsampleBlock2D",) * 2,
            up_block_types=("ResnetUpsampleBlock2D",) * 2,
            layers_per_block=1,
            add_attention=False,
            norm_num_groups=8,
        )

    pipe = UnCLIPPipeline(
        prior=prior,
        decoder=decoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_proj=text_proj,
        super_res_first=super_res(),
        super_res_last=super_res(),
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def karlo_folder(tiny_clip_export, tmp_path_factory) -> Path:
    """A tiny random Karlo-layout folder on the tiny CLIP export's text tower (decoder 32 px, upsampler 32 → 64 px)."""
    return write_karlo_folder(tiny_clip_export, tmp_path_factory.mktemp("karlo") / "karlo")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on small VMs a second thread mostly spin-waits (2-3x
    slower). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The modules that take longest (seconds of one worker, `--durations=0` on 2 cores), scheduled first: pytest-xdist
# hands whole modules (`--dist loadfile`) to the workers in collection order, and alphabetical order left
# test_train.py (~200 s) for the end, with the other worker idle behind it.
SLOW_MODULES = (
    "test_train.py",
    "test_preemption.py",
    "test_ranks.py",
    "test_configs.py",
    "test_resume.py",
    "test_sweeps.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_MODULES.index(name) if name in SLOW_MODULES else len(SLOW_MODULES)

    items.sort(key=rank)  # stable: the order within a module is kept
