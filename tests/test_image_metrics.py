"""Metrics of generated images: Fréchet distance in CLIP space and CLIP score."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import small_shapes
from dalle_lightning.export import write_export
from dalle_lightning.metrics.image import ClipScore, frechet_distance
from dalle_lightning.models.clip import load_frozen_clip


@pytest.fixture(scope="module")
def val_batch(shapes_root, trained_clip_export):
    tokenizer = load_frozen_clip(trained_clip_export, text=False, image=False).tokenizer
    dm = small_shapes(shapes_root, image_size=32, batch_size=128, num_workers=0, val_samples=128, tokenizer=tokenizer)
    dm.setup("validate")
    return dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)


@pytest.fixture(scope="module")
def trained_clip_export(shapes_root, tmp_path_factory):
    """The tiny CLIP trained for 60 steps of 64 at lr 2e-3 on the small Shapes set (16 s): matching pairs score
    ~62 against ~23 shuffled, noise's distance ~50x that of two halves of the real set. (150 steps of 128 at
    1e-3 gave 77 / 35 and ~90x in 81 s; at 1e-3 the cosines are all still near 0 after 60 steps.)"""
    from omegaconf import OmegaConf

    from conftest import compose_config
    from dalle_lightning.models.tokenizer import train_bpe
    from dalle_lightning.stages.clip import ClipModule

    tmp = tmp_path_factory.mktemp("trained_clip")
    cfg = OmegaConf.to_container(compose_config(["optim.lr=2e-3", "scheduler.warmup_steps=10"], tmp), resolve=True)
    dm = small_shapes(shapes_root, image_size=32, batch_size=64, samples_per_epoch=64 * 60, num_workers=1)
    tokenizer = train_bpe(dm.captions(1200), vocab_size=400, context_length=24)
    dm.tokenizer = tokenizer
    L.seed_everything(0)
    module = ClipModule(cfg["model"]["clip"], cfg["optim"], cfg["scheduler"], tokenizer)
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0
    )
    trainer.fit(module, datamodule=dm)
    return write_export(tmp / "clip", "clip", module.export)


def test_frechet_distance_is_zero_on_itself_and_large_against_noise(trained_clip_export, val_batch):
    clip = load_frozen_clip(trained_clip_export)
    name, fd = frechet_distance(clip, inception_weights="/nowhere/inception.pth")
    assert name == "fd_clip"  # no Inception weights here: the CLIP image encoder is the feature extractor
    images = val_batch["image"]
    fd.update(images, real=True)
    fd.update(images, real=False)
    same = fd.compute().item()
    fd.reset()
    fd.update(images, real=True)
    fd.update(torch.rand_like(images) * 2 - 1, real=False)
    noise = fd.compute().item()
    fd.reset()
    # Two halves of the real set: a small distance, far below noise's.
    fd.update(images[:64], real=True)
    fd.update(images[64:], real=False)
    halves = fd.compute().item()
    assert abs(same) < 1e-3, same
    assert noise > 10 * halves and noise > 0.1, (noise, halves)


def test_clip_score_of_matching_pairs_beats_shuffled_pairs(trained_clip_export, val_batch):
    clip = load_frozen_clip(trained_clip_export)
    score = ClipScore(clip)
    score.update(val_batch["image"], val_batch["input_ids"], val_batch["attention_mask"])
    matched = score.compute().item()
    score.reset()
    shuffle = torch.roll(torch.arange(val_batch["image"].shape[0]), 1)
    score.update(val_batch["image"][shuffle], val_batch["input_ids"], val_batch["attention_mask"])
    shuffled = score.compute().item()
    assert 0 <= shuffled < matched <= 100, (matched, shuffled)
    assert matched - shuffled > 5, (matched, shuffled)
