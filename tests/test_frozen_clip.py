"""The frozen CLIP: any transformers CLIP in either layout, preprocessed as its image processor says, safetensors only,
one-line errors, and never in a checkpoint, the optimizer or EMA's copy of a stage."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel

from conftest import compose_config, shapes_overrides
from dalle_lightning.errors import UserError
from dalle_lightning.export import locate_clip, tokenizer_of_clip
from dalle_lightning.models.clip import load_frozen_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def a_photo(width: int = 70, height: int = 50) -> Image.Image:
    """A smooth non-square RGB image (resizing and cropping both matter)."""
    rng = np.random.default_rng(0)
    small = (rng.random((5, 7, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


def single_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_both_layouts_are_the_same_clip_and_text_only_serves_text(pretrained_clips):
    whole = load_frozen_clip(pretrained_clips["clip_model"])
    towers = load_frozen_clip(pretrained_clips["towers"])
    text_only = load_frozen_clip(pretrained_clips["text_only"], image=None)
    ids, mask = whole.tokenize(["a red circle", "two blue squares to the left of a star"])
    images = torch.rand(2, 3, 48, 40) * 2 - 1
    assert whole.projection_dim == towers.projection_dim == 32 and whole.context_length == 24 == ids.shape[1]
    for clip in (towers, text_only):
        assert torch.allclose(clip.encode_texts(ids, mask), whole.encode_texts(ids, mask), atol=1e-6)
        assert torch.allclose(clip.text_token_encodings(ids)[0], whole.text_token_encodings(ids)[0], atol=1e-6)
    assert torch.allclose(towers.encode_images(images), whole.encode_images(images), atol=1e-6)
    assert torch.allclose(whole.encode_texts(ids, mask).norm(dim=-1), torch.ones(2))
    raw = whole.encode_texts(ids, mask, normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), whole.encode_texts(ids, mask), atol=1e-6)
    assert type(whole.text_encoder).__name__ == "CLIPTextModelWithProjection"
    assert type(towers.image_encoder).__name__ == "CLIPVisionModelWithProjection"

    assert text_only.image_encoder is None and text_only.image_size is None
    with pytest.raises(UserError) as err:
        text_only.encode_images(images)
    assert "has no image tower" in single_line(err)
    with pytest.raises(UserError) as err:
        load_frozen_clip(pretrained_clips["text_only"], "exports.clip", image=True)
    assert single_line(err).startswith("exports.clip=") and "text-only" in str(err.value)
    # A prior on embeddings needs the CLIP's sizes only: no weights are read.
    sizes = load_frozen_clip(pretrained_clips["towers"], text=False, image=False)
    assert sizes.networks() == [] and sizes.projection_dim == 32 and sizes.text_width == 32


@pytest.mark.parametrize("layout", ["clip_model", "towers"])
def test_image_embeddings_match_transformers_own_image_processor(pretrained_clips, tmp_path, layout):
    """Resize of the shortest side, centre crop, the processor's mean and std: an image embedded here is the image
    embedded by transformers' CLIPImageProcessor and CLIPModel.get_image_features."""
    folder = shutil.copytree(pretrained_clips[layout], tmp_path / layout)
    processor_dir = folder if layout == "clip_model" else folder / "image_processor"
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 40},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2] * 3,
    )
    processor.save_pretrained(processor_dir)  # not OpenAI's statistics, and a crop that cuts
    clip = load_frozen_clip(folder)
    model = CLIPModel.from_pretrained(pretrained_clips["clip_model"]).eval()
    for image in (a_photo(70, 50), a_photo(45, 90)):
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            theirs = model.get_image_features(pixel_values=pixels)
        theirs = theirs if torch.is_tensor(theirs) else theirs.pooler_output
        ours = clip.encode_images(as_tensor(image), normalize=False)
        assert clip.pixel_values(as_tensor(image)).shape == pixels.shape == (1, 3, 32, 32)
        # Pillow resizes in uint8 (rounding), torch in float: the same filter, a rounding apart.
        assert (ours - theirs).abs().max() < 0.01 * theirs.abs().max()
        assert torch.cosine_similarity(ours, theirs).item() > 0.9999
    # Without the processor's statistics (another mean) the embedding is measurably off: the test can fail.
    other = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    off = other(images=a_photo(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        wrong = model.get_image_features(pixel_values=off)
    wrong = wrong if torch.is_tensor(wrong) else wrong.pooler_output
    assert (clip.encode_images(as_tensor(a_photo()), normalize=False) - wrong).abs().max() > 0.05


def test_hub_names_are_read_from_the_local_cache_only(pretrained_clips, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-clip" / "snapshots" / "0123abc"
    shutil.copytree(pretrained_clips["clip_model"], snapshot)
    (tmp_path / "hub" / "models--tiny-org--tiny-clip" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-clip" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # what HF_HUB_CACHE=... sets

    clip = load_frozen_clip("tiny-org/tiny-clip")
    ids, mask = clip.tokenize(["a red circle"])
    assert torch.allclose(clip.encode_texts(ids, mask), load_frozen_clip(snapshot).encode_texts(ids, mask))
    assert clip.source == "tiny-org/tiny-clip"
    with pytest.raises(UserError) as err:
        load_frozen_clip("openai/clip-vit-large-patch14", "stage.clip")
    message = single_line(err)
    assert "not a folder, nor a model in the local Hugging Face cache" in message
    assert "nothing is downloaded here" in message and "point stage.clip at a folder" in message


def test_bad_clip_folders_are_one_line_errors(pretrained_clips, tiny_exports, tmp_path):
    # Pickled weights are never loaded, even beside a valid config and tokenizer.
    pickled = shutil.copytree(pretrained_clips["clip_model"], tmp_path / "pickled")
    state = CLIPModel.from_pretrained(pickled).state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(UserError) as err:
        load_frozen_clip(pickled)
    assert "holds no safetensors weights" in single_line(err) and "never loaded" in str(err.value)

    not_clip = tmp_path / "bert"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    no_tokenizer = shutil.copytree(pretrained_clips["towers"], tmp_path / "no_tokenizer")
    shutil.rmtree(no_tokenizer / "tokenizer")
    cases = {
        str(not_clip): "is not a CLIP folder (a bert config)",
        str(no_tokenizer): "has no tokenizer",
        str(tiny_exports["prior"]): "is a prior export, not a clip export",
        "/nowhere/no-clip": "does not exist: train the CLIP stage first",
    }
    for source, expected in cases.items():
        with pytest.raises(UserError) as err:
            locate_clip(source, "stage.clip")
        assert expected in single_line(err) and str(err.value).startswith(f"stage.clip='{source}'")
    # The tokenizer the later stages caption with stops where the text tower's positions do.
    assert tokenizer_of_clip(None, pretrained_clips["towers"]).model_max_length == 24


def test_the_frozen_clip_is_in_no_checkpoint_optimizer_or_ema_copy(pretrained_clips, shapes_root, tmp_path):
    """A decoder on a transformers CLIP trains two steps with the stage's EMA callback and checkpointing: the EMA
    copy of the module, the checkpoint and the optimizer hold the decoder's own weights only."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_config(
        [
            "stage=decoder",
            f"stage.clip={pretrained_clips['towers']}",
            *shapes_overrides(shapes_root),
            "data.batch_size=4",
            "data.samples_per_epoch=8",
            "data.num_workers=0",
            "scheduler=constant",
        ],
        tmp_path,
    )
    plain = OmegaConf.to_container(cfg, resolve=True)
    datamodule = instantiate(plain["data"])
    datamodule.tokenizer = instantiate(plain["stage"]["tokenizer"])(datamodule)
    module = instantiate(plain["stage"]["module"], tokenizer=datamodule.tokenizer, _convert_="all")
    ema = instantiate(plain["callbacks"]["ema"])
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=0,
        callbacks=[ema],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    clip_tensors = {id(t) for n in module.clip.networks() for t in (*n.parameters(), *n.buffers())}
    clip_count = sum(p.numel() for n in module.clip.networks() for p in n.parameters())
    averaged = list(ema._average_model.module.parameters())
    assert sum(p.numel() for p in averaged) == sum(p.numel() for p in module.parameters())
    assert not clip_tensors & {id(p) for p in averaged} and clip_count > 0
    assert ema._average_model.module.clip is module.clip  # shared, not copied
    optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in module.parameters() if p.requires_grad}
    assert not clip_tensors & {id(p) for p in optimized}
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state"):
        assert checkpoint[key] and all(k.startswith(("unet.", "context.")) for k in checkpoint[key]), key
    # Resumable without the CLIP in the checkpoint: strict loading fills nothing in.
    module.load_state_dict(checkpoint["state_dict"])


@pytest.mark.slow
def test_published_clip_layouts_drive_the_whole_stack_with_no_clip_stage(pretrained_clips, shapes_root, tmp_path):
    """The real scripts on a transformers CLIP, its two layouts taking turns (the same weights): embed.py writes a
    clip-retrieval folder, the prior trains on it reading the captions' tokens, the decoder and the upsampler train
    on Shapes, sample.py draws from the four; no CLIP is trained."""
    from conftest import run_script, run_train

    whole, towers = pretrained_clips["clip_model"], pretrained_clips["towers"]
    manifest = json.loads((shapes_root / "manifest.json").read_text())
    embed = run_script(
        "embed.py",
        [
            f"clip={towers}",
            "format=clip_retrieval",
            f"shards='{manifest['shards']['train']}'",
            f"output_dir={tmp_path}/emb",
        ],
        tmp_path,
    )
    assert embed.returncode == 0, embed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "emb" / "img_emb").iterdir()) == [
        f"img_emb_train-{i:06d}.npy" for i in range(3)
    ]
    assert not list((tmp_path / "emb").glob("**/*.tar"))  # embeddings and captions only, no image bytes

    small = [
        "trainer=cpu",
        "trainer.max_steps=3",
        "trainer.max_epochs=-1",
        "data.batch_size=8",
        "data.samples_per_epoch=24",
        "data.val_samples=8",
        "data.num_workers=0",
        "scheduler.warmup_steps=1",
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.export_dir={tmp_path}/export",
        "logger=none",
    ]
    runs = {
        "prior": [f"stage.clip={whole}", "data=clip_retrieval", f"data.path={tmp_path}/emb"],
        "decoder": [f"stage.clip={towers}", "stage.metrics.num_samples=4", "model.decoder.sample_steps=2"],
        "upsampler": [f"stage.clip={whole}", "stage.metrics.num_samples=4", "model.upsampler.sample_steps=2"],
    }
    runs["prior"] += ["model.prior.text_tokens=true", "model.prior.stats_batches=1", "model.prior.sample_steps=2"]
    for stage, args in runs.items():
        data = [] if stage == "prior" else shapes_overrides(shapes_root)
        result = run_train([f"stage={stage}", *args, *data, *small], tmp_path)
        assert result.returncode == 0, (stage, result.stderr[-3000:])
        config = json.loads((tmp_path / "export" / stage / "dalle_lightning.json").read_text())["config"]
        assert config["stage"]["clip"] == args[0].split("=", 1)[1]

    out = tmp_path / "sample"
    exports = [f"exports.{stage}={tmp_path / 'export' / stage}" for stage in runs]
    steps = ["prior.steps=2", "prior.candidates=1", "decoder.steps=2", "upsampler.steps=2"]
    result = run_script(
        "sample.py",
        ["prompts=[a red circle]", "num_images=2", f"exports.clip={towers}", *exports, *steps, f"hydra.run.dir={out}"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    images = [np.asarray(Image.open(out / f"{i:04d}.png")) for i in range(2)]
    assert all(image.shape == (64, 64, 3) and image.std() > 1 for image in images)
