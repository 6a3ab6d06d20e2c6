"""Published weights in, diffusers out, end to end on CPU: train.py fine-tunes the prior, decoder and super-resolution
UNet of a Karlo-layout folder (`model/<stage>=karlo`, `pretrained=<folder>`) a few steps on Shapes, export.py writes
the exports as a diffusers `UnCLIPPipeline` folder, diffusers loads it with a plain `from_pretrained` and generates a
2-step image; the prior alone becomes a `KandinskyV22PriorPipeline` folder diffusers runs; our pipeline runs both
diffusers folders directly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, lines_starting, run_script, run_train, shapes_overrides
from dalle_lightning.embed import embed_shards
from dalle_lightning.export_diffusers import export_diffusers
from dalle_lightning.generation import build_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_fine_tune_karlo_then_run_the_export_in_diffusers(tmp_path, shapes_root, tiny_clip_export, karlo_folder):
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPPipeline

    manifest = json.loads((shapes_root / "manifest.json").read_text())
    for split in ("train", "val"):  # the prior's data: embeddings as CLIP projects them, as Karlo's prior takes them
        shards = manifest["shards"][split]
        embed_shards(
            shards, tmp_path / "emb" / split, str(tiny_clip_export), num_workers=0, progress=False, normalize=False
        )
    common = [
        f"stage.clip={tiny_clip_export}",
        "trainer=cpu",
        "trainer.max_steps=3",
        "trainer.max_epochs=-1",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.samples_per_epoch=24",
        "data.val_samples=16",
        "scheduler.warmup_steps=1",
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.export_dir={tmp_path}/export",
        "logger=csv",
    ]
    prior = [
        "stage=prior",
        "model/prior=karlo",
        "model.prior.embedding_dim=128",
        "model.prior.sample_steps=2",
        f"data.train_shards='{tmp_path}/emb/train/*.tar'",
        f"data.val_shards='{tmp_path}/emb/val/*.tar'",
    ]
    no_metrics = ["stage.metrics.num_samples=0", "stage.metrics.every_n_epochs=0", *shapes_overrides(shapes_root)]
    decoder = ["stage=decoder", "model/decoder=karlo", "model.decoder.image_size=32", *no_metrics]
    upsampler = ["stage=upsampler", "model/upsampler=karlo", "model.upsampler.image_size=64", *no_metrics]
    upsampler += ["model.upsampler.low_res_size=32", "model.upsampler.train_crop=32"]

    # weights that would unpickle are refused before anything runs
    pickled = tmp_path / "pickled"
    shutil.copytree(karlo_folder / "prior", pickled / "prior")
    (pickled / "prior" / "diffusion_pytorch_model.safetensors").rename(
        pickled / "prior" / "diffusion_pytorch_model.bin"
    )
    result = run_train([*common, *prior, f"model.prior.pretrained={pickled}", "run_name=pickled"], tmp_path)
    lines = lines_starting(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "a pickle" in lines[0], result.stderr[-2000:]

    for stage, args in (("prior", prior), ("decoder", decoder), ("upsampler", upsampler)):
        run = [*common, *args, f"model.{stage}.pretrained={karlo_folder}", f"run_name={stage}"]
        result = run_train(run, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    exports = {stage: tmp_path / "export" / stage for stage in ("prior", "decoder", "upsampler")}
    assert (exports["decoder"] / "text_proj" / "diffusion_pytorch_model.safetensors").is_file()

    out = tmp_path / "karlo-finetuned"
    stages = [f"exports.{stage}={path}" for stage, path in exports.items()]
    result = run_script(
        "export.py", ["format=diffusers", f"exports.clip={tiny_clip_export}", *stages, f"out={out}"], tmp_path
    )
    assert result.returncode == 0 and "UnCLIPPipeline" in result.stdout, result.stderr[-3000:]

    # diffusers, the way its users load a folder
    pipe = UnCLIPPipeline.from_pretrained(out)
    steps = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **steps).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and 0 <= image.min() <= image.max() <= 1
    published = PriorTransformer.from_pretrained(karlo_folder / "prior")
    assert torch.equal(pipe.prior.clip_mean, published.clip_mean)  # frozen, out of the optimizer and the EMA
    assert torch.equal(pipe.prior.clip_std, published.clip_std)
    assert not torch.equal(pipe.prior.proj_in.weight, published.proj_in.weight)  # trained

    prior_only = tmp_path / "prior-finetuned"
    assert export_diffusers(prior_only, tiny_clip_export, exports["prior"]) == "KandinskyV22PriorPipeline"
    kandinsky = KandinskyV22PriorPipeline.from_pretrained(prior_only)
    embeds = kandinsky("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).image_embeds
    assert embeds.shape == (1, 128) and torch.isfinite(embeds).all()

    # ours, on the published layout and on the export, through sample.py's config (karlo=<folder>)
    for folder in (karlo_folder, out):
        cfg = compose_config([f"karlo={folder}", f"exports.clip={tiny_clip_export}", "device=cpu"], tmp_path, "sample")
        ours = build_pipeline(cfg)
        images = ours(["a red circle", "two blue squares"], seed=0, progress=False).images
        assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
        assert not ours.decoder.normalize_embeddings and not ours.prior.normalize_embeddings
    assert OmegaConf.select(cfg, "karlo_presets.decoder.stage_module").endswith("KarloDecoderModule")
