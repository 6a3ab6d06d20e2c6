"""Editing: the training holes, the editing decoder (GLIDE's extra input channels) and its start from a decoder
export, outpainting in the pipeline, and both editing modes through sample.py with either kind of decoder."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_config, lines_starting, run_script, run_train, shapes_overrides, write_stage_export
from dalle_lightning.diffusion.masks import MASK_KINDS, check_mask_weights, next_window, random_masks
from dalle_lightning.errors import UserError
from dalle_lightning.loading import load_stage_export
from dalle_lightning.models.decoder import build_decoder_unet
from dalle_lightning.pipeline import UnCLIPPipeline, extension_pixels
from dalle_lightning.sample import sample
from test_decoder import fit_fixed_batch, make_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(prior_options={"steps": 2}, decoder_options={"steps": 2}, upsampler_options={"steps": 2})
EDITING = ["model.decoder.inpainting=true"]


@pytest.fixture(scope="module")
def editing_export(tiny_clip_export, tmp_path_factory):
    """An editing decoder export (random weights, tiny preset)."""
    return write_stage_export("decoder", tiny_clip_export, tmp_path_factory.mktemp("editing"), EDITING)


@pytest.fixture(scope="module")
def pipe(tiny_exports) -> UnCLIPPipeline:
    return UnCLIPPipeline.from_exports(**tiny_exports, device="cpu", **FAST)


@pytest.fixture(scope="module")
def editing_pipe(tiny_exports, editing_export) -> UnCLIPPipeline:
    return UnCLIPPipeline.from_exports(**{**tiny_exports, "decoder": editing_export}, device="cpu", **FAST)


def noise_image(size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- masks -------------------------------------------------------------------------------------------------------


def test_each_mask_kind_and_the_draws_are_seeded():
    for kind in MASK_KINDS:
        masks = random_masks(24, 32, {kind: 1.0}, torch.Generator().manual_seed(0))
        assert masks.shape == (24, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
        covered = masks.flatten(1).mean(1)
        if kind == "all":
            assert (covered == 1).all()
        else:  # a hole, and something known around it
            assert (covered > 0).all() and (covered < 1).all(), (kind, covered)
    box = random_masks(16, 32, {"box": 1.0}, torch.Generator().manual_seed(1))[:, 0]
    rows, cols = box.amax(2), box.amax(1)  # a box: its pixels are the product of its rows and columns
    assert torch.equal(box, rows[:, :, None] * cols[:, None, :])
    border = random_masks(16, 32, {"border": 1.0}, torch.Generator().manual_seed(2))[:, 0]
    edges = torch.stack([border[:, :, 0], border[:, 0, :], border[:, :, -1], border[:, -1, :]], 1)
    assert (edges.amax(2) == 1).any(1).all()  # every band touches a side
    weights = {"box": 0.3, "strokes": 0.2, "border": 0.3, "all": 0.2}
    first, again = (random_masks(8, 32, weights, torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, random_masks(8, 32, weights, torch.Generator().manual_seed(6)))
    with pytest.raises(UserError, match=r"unknown mask kinds \['circle'\]"):
        check_mask_weights({"circle": 1.0})
    with pytest.raises(UserError, match="at least one above 0"):
        check_mask_weights({"box": 0.0})


def test_outpainting_windows_grow_the_image_outwards_at_most_half_new():
    hole = torch.ones(64, 128)
    hole[16:48, 48:80] = 0  # a 32 px image extended by 48 px left and right, 16 px up and down
    steps = 0
    while hole.any():
        top, left = next_window(hole, 32, (16, 48))
        window = hole[top : top + 32, left : left + 32]
        assert 0 < window.mean() <= 0.5
        hole[top : top + 32, left : left + 32] = 0
        steps += 1
    assert steps <= 16  # 7168 new pixels, at most 512 a window: 14 at the very least


# --- the editing decoder -----------------------------------------------------------------------------------------


def test_editing_decoder_loss_falls_on_a_fixed_batch_with_masks(tmp_path, tiny_clip_export, batch32):
    module = make_decoder(tmp_path, tiny_clip_export, EDITING)
    assert module.unet.conv_in.in_channels == 7
    x0, condition = module.diffusion_inputs(batch32, train=False, generator=torch.Generator().manual_seed(0))
    edit = condition["edit"]
    known = edit[:, 3:]
    assert torch.equal(edit[:, :3], x0 * known)  # the known image, zero in the holes
    assert ((known == 0).flatten(1).any(1)).all()  # every sample has a hole (some are the whole image)
    losses = fit_fixed_batch(module, batch32)
    assert losses[-1] < 0.6 * losses[0], losses[::8]


def test_editing_decoder_from_an_export_starts_as_that_decoder(tmp_path, tiny_clip_export, tiny_exports, batch32):
    """`stage.init_from` copies the export's weights at fit; the editing channels start at zero, so on empty
    masks (nothing known) and any other the UNet computes what the export's did, and sampling gives the same."""
    plain = load_stage_export(tiny_exports["decoder"], "decoder")
    module = make_decoder(tmp_path, tiny_clip_export, EDITING, init_from=str(tiny_exports["decoder"]))
    module.setup("fit")
    module.eval()
    assert module.unet.conv_in.weight[:, 3:].abs().sum() == 0
    embeds = plain.image_embedding(batch32)
    x = torch.randn(batch32["image"].shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((x.shape[0],), 500)
    with torch.no_grad():
        before = plain.denoise(x, t, plain.condition(embeds))
        after = module.denoise(x, t, module.condition(embeds))  # no edit: nothing known
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    one = torch.Generator().manual_seed(3)
    reference = plain.generate(embeds, steps=2, generator=one)
    one.manual_seed(3)
    torch.testing.assert_close(module.generate(embeds, steps=2, generator=one), reference, atol=1e-4, rtol=0)
    other = make_decoder(tmp_path, tiny_clip_export, ["model.decoder.unet.block_out_channels=[32,32,64,128]"])
    other.init_from = str(tiny_exports["decoder"])
    with pytest.raises(UserError, match=r"stage.init_from='.*' does not fit model.decoder"):
        other.setup("fit")
    with pytest.raises(UserError, match="is a prior export, not a decoder export"):
        module.start_from_export(tiny_exports["prior"])


def test_train_py_fine_tunes_a_decoder_export_into_an_editing_decoder(tiny_exports, shapes_root, tmp_path):
    export = tmp_path / "export" / "decoder_edit"
    args = [
        "stage=decoder",
        f"stage.clip={tiny_exports['clip']}",
        f"stage.init_from={tiny_exports['decoder']}",
        "model.decoder.inpainting=true",
        f"callbacks.export.dirpath={export}",
        *shapes_overrides(shapes_root),
        "trainer=cpu",
        "trainer.max_steps=3",
        "trainer.max_epochs=-1",
        "+trainer.num_sanity_val_steps=0",
        "data.batch_size=8",
        "data.samples_per_epoch=24",
        "data.val_samples=8",
        "data.num_workers=0",
        "stage.metrics.every_n_epochs=0",
        "callbacks.sample_grid=null",
        "scheduler.warmup_steps=1",
        f"paths.log_dir={tmp_path}/outputs",
        "logger=none",
    ]
    result = run_train(args, tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    tuned, plain = load_stage_export(export, "decoder"), load_stage_export(tiny_exports["decoder"], "decoder")
    assert tuned.inpainting and tuned.unet.conv_in.in_channels == 7
    assert tuned.unet.conv_in.weight[:, 3:].abs().max() > 0  # the editing channels trained
    torch.manual_seed(1)
    fresh = build_decoder_unet(tuned.config, tuned.embedding_dim)
    start = dict(plain.unet.named_parameters())

    def distance(unet) -> float:  # from the export's weights, relative to their norm, over the channels both have
        pairs = [(p[:, :3] if n == "conv_in.weight" else p, start[n]) for n, p in unet.named_parameters()]
        return float(sum((a - b).norm() ** 2 for a, b in pairs) ** 0.5 / sum(b.norm() ** 2 for _, b in pairs) ** 0.5)

    assert 0 < distance(tuned.unet) < 0.1 * distance(fresh)  # three steps from the export, not from a fresh init
    missing = run_train([*args[:2], "stage.init_from=/nonexistent/decoder", *args[3:]], tmp_path)
    assert missing.returncode == 2
    assert lines_starting(missing.stderr)[-1].startswith("error: stage.init_from='/nonexistent/decoder' is not")


def test_the_demo_editing_recipe_starts_from_the_demo_decoder_and_exports_beside_it(tmp_path):
    cfg = compose_config(["experiment=demo/decoder_edit"], tmp_path)
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert (
        plain["model"]["decoder"]["inpainting"]
        and plain["stage"]["module"]["init_from"] == f"{tmp_path}/export/decoder"
    )
    assert plain["callbacks"]["export"]["dirpath"] == f"{tmp_path}/export/decoder_edit"
    assert plain["data"]["samples_per_epoch"] == 3300  # the demo decoder's recipe underneath


@pytest.fixture(scope="module")
def batch32(shapes_root, tiny_clip_export):
    from conftest import first_batch
    from dalle_lightning.models.clip import load_frozen_clip

    return first_batch(shapes_root, 32, 8, load_frozen_clip(tiny_clip_export, text=False, image=False).tokenizer)


def test_editing_decoder_sees_the_known_pixels_and_replacement_only_when_asked(editing_pipe, batch32):
    """The editing decoder is conditioned on what is known instead of having it pinned: a trained-to-edit
    input (here a random one) changes the sample; `replacement=true` pins the known pixels as well."""
    decoder = editing_pipe.decoder
    image = batch32["image"][:2]
    embeds = editing_pipe.image_embeddings(image)
    holes = torch.zeros(2, 1, 32, 32)
    holes[..., 8:24, 8:24] = 1
    generator = torch.Generator()

    def run(**options):
        generator.manual_seed(0)
        return decoder.generate(embeds, steps=2, generator=generator, **options)

    free, edited, pinned = run(), run(known=(image, holes)), run(known=(image, holes), replacement=True)
    assert not torch.allclose(free, edited)
    keep = holes.expand(-1, 3, -1, -1) == 0
    assert not torch.allclose(edited[keep], image[keep])
    torch.testing.assert_close(pinned[keep], image[keep], atol=1e-6, rtol=0)


# --- outpainting -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("editing", [False, True])
def test_outpaint_keeps_every_original_pixel_and_returns_the_extended_size(pipe, editing_pipe, editing):
    chosen = editing_pipe if editing else pipe
    image = noise_image()
    out = chosen.outpaint(image, [16, 0, 0.5, 8], seed=0)  # pixels and a fraction of the side
    assert out.images.shape == (1, 3, 64 + 0 + 8, 64 + 16 + 32)
    torch.testing.assert_close(out.images[0][:, 0:64, 16:80], image[0], atol=0, rtol=0)
    new = torch.ones(72, 112, dtype=torch.bool)
    new[0:64, 16:80] = False
    assert (out.images[0][:, new] != 0).float().mean() > 0.9  # the canvas is filled everywhere
    assert out.captions == ["outpainted"]
    prompted = chosen.outpaint(image, 0.75, prompts=["a red circle"], seed=1)  # 48 px on every side: steps
    assert prompted.images.shape == (1, 3, 160, 160)
    assert torch.equal(prompted.images[0][:, 48:112, 48:112], image[0])
    assert prompted.captions == ["outpainted: a red circle"]
    assert prompted.grid().size[0] > prompted.grid().size[1]  # the grid keeps the image's aspect


def test_editing_errors_are_one_line(pipe):
    image = noise_image()
    for extend, message in [
        ([0, 0, 0, 0], "adds no pixel"),
        ([0.001, 0, 0, 0], "adds no pixel"),
        ([-8, 0, 0, 0], "cannot be negative"),
        ([8, 8], r"give \[left, top, right, bottom\]"),
    ]:
        with pytest.raises(UserError, match=message):
            pipe.outpaint(image, extend)
    assert extension_pixels([0.25, 3, 0, 0.5], 64) == (16, 3, 0, 32)
    with pytest.raises(UserError, match="square images at the pipeline's output size, 64 px, got 48x64 px"):
        pipe.outpaint(torch.zeros(1, 3, 64, 48), [8, 0, 0, 0])
    with pytest.raises(UserError, match=re.escape("an image tensor of shape (4, 64, 64)")):
        pipe.inpaint(torch.zeros(1, 4, 64, 64), torch.ones(1, 64, 64))
    nothing, everything = torch.zeros(1, 64, 64), torch.ones(1, 64, 64)
    with pytest.raises(UserError, match="selects no pixel: nothing to inpaint"):
        pipe.inpaint(image, nothing)
    with pytest.raises(UserError, match="covers the whole image: nothing is kept"):
        pipe.inpaint(image, everything)


# --- sample.py ---------------------------------------------------------------------------------------------------

FEW_STEPS = ["prior.steps=2", "prior.candidates=1", "decoder.steps=2", "upsampler.steps=2"]


def stack(exports) -> list[str]:
    return [f"exports.{stage}={path}" for stage, path in exports.items()] + FEW_STEPS


@pytest.mark.parametrize("editing", [False, True])
def test_both_editing_modes_through_sample_py(tiny_exports, editing_export, tmp_path, editing):
    exports = {**tiny_exports, "decoder": editing_export} if editing else tiny_exports
    source = tmp_path / "in.png"
    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)  # twice the output size
    Image.fromarray(pixels).save(source)
    before = np.asarray(Image.open(source).resize((64, 64), Image.BICUBIC)).astype(int)
    cfg = compose_config(
        ["mode=outpaint", f"images=[{source}]", "extend=[32,0,0.25,0]", "prompts=[a red circle]", *stack(exports)],
        tmp_path / "out",
        "sample",
    )
    sample(cfg)
    after = np.asarray(Image.open(tmp_path / "out" / "run" / "0000.png")).astype(int)
    assert after.shape == (64, 64 + 16 + 16, 3)  # 32 px of the 128 px source is 16 at 64 px
    assert np.abs(after[:, 16:80] - before).max() <= 1  # the kept pixels, up to rounding in [-1, 1]
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 24)).save(mask)
    cfg = compose_config(["mode=inpaint", f"images=[{source}]", f"mask={mask}", *stack(exports)], tmp_path, "sample")
    sample(cfg)
    after = np.asarray(Image.open(tmp_path / "run" / "0000.png")).astype(int)
    outside = np.ones((64, 64), bool)
    outside[24:40, 24:40] = False
    assert np.abs(after[outside] - before[outside]).max() <= 1
    assert np.abs(after[~outside] - before[~outside]).mean() > 5


def test_sample_editing_input_errors(tiny_exports, tmp_path):
    square, wide, text = tmp_path / "in.png", tmp_path / "wide.png", tmp_path / "mask.txt"
    Image.new("RGB", (64, 64)).save(square)
    Image.new("RGB", (96, 64)).save(wide)
    text.write_text("not an image")
    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    result = run_script(
        "sample.py", ["mode=inpaint", f"images=[{square}]", f"mask={text}", run_dir, *stack(tiny_exports)], tmp_path
    )
    assert result.returncode == 2
    assert lines_starting(result.stderr)[-1].startswith(f"error: mask '{text}' is not an image Pillow can read")
    for overrides, message in [
        ([f"images=[{wide}]", "mode=outpaint", "extend=0.5"], "is 96x64: editing takes square images, crop it"),
        ([f"images=[{square}]", "mode=outpaint"], "mode=outpaint needs extend="),
        ([f"images=[{square}]", "mode=inpaint", "mask=[0,0,1,1]"], "covers the whole image: nothing is kept"),
        ([f"images=[{text}]", "mode=outpaint", "extend=0.5"], "is not an image Pillow can read"),
    ]:
        cfg = compose_config([*stack(tiny_exports), *overrides], tmp_path, "sample")
        with pytest.raises(UserError, match=re.escape(message)):
            sample(cfg)
