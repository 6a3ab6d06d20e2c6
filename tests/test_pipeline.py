"""UnCLIPPipeline on tiny random-weight exports of all four stages: every mode's shapes, ranges and seeding,
what inpainting keeps, the filters, and the errors a user gets for exports that do not fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_stage_export
from dalle_lightning.errors import UserError
from dalle_lightning.filters import ConceptFilter, PromptBlocklist
from dalle_lightning.pipeline import UnCLIPPipeline, images_to_tensor, slerp

# Two solver steps per stage keep the file fast; guidance stays on (the prior's and decoder's defaults).
FAST = dict(
    prior_options={"steps": 2},
    decoder_options={"steps": 2},
    upsampler_options={"steps": 2},
)
PROMPTS = ["a red circle", "two blue squares"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_exports) -> UnCLIPPipeline:
    return UnCLIPPipeline.from_exports(**tiny_exports, device="cpu", **FAST)


@pytest.fixture(scope="module")
def generated(pipe):
    """Two images for each of two prompts, seed 0: the reference run most tests compare against."""
    return pipe(PROMPTS, num_images_per_prompt=2, seed=0, progress=False)


def assert_images(images: torch.Tensor, n: int, size: int) -> None:
    assert images.shape == (n, 3, size, size)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1


def assert_unit(embeds: torch.Tensor) -> None:
    assert torch.isfinite(embeds).all()
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(embeds.shape[0]), atol=1e-5, rtol=0)


# --- slerp -------------------------------------------------------------------------------------------------------


def test_slerp_endpoints_unit_norm_and_orthogonal_midpoint():
    torch.manual_seed(0)
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    ua, ub = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    torch.testing.assert_close(slerp(a, b, 0.0), ua, atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp(a, b, 1.0), ub, atol=1e-5, rtol=0)
    ts = torch.linspace(0, 1, 7)[:, None]
    path = slerp(ua[:1], ub[:1], ts)
    assert path.shape == (7, 16)
    assert_unit(path)
    # Equal angular steps along the great circle: consecutive frames are equally far apart.
    steps = (path[1:] * path[:-1]).sum(-1)
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), atol=1e-5, rtol=0)

    x, y = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(slerp(x, y, 0.5), torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2), atol=1e-6, rtol=0)
    # Not a linear interpolation: a quarter of the way is 22.5 degrees from x.
    torch.testing.assert_close(
        slerp(x, y, 0.25), torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8), 0.0]), atol=1e-6, rtol=0
    )
    # Identical endpoints stay put (no 0/0).
    torch.testing.assert_close(slerp(ua, ua, 0.5), ua, atol=1e-5, rtol=0)


def test_images_to_tensor_sizes():
    assert images_to_tensor(torch.zeros(2, 3, 8, 8)).shape == (2, 3, 8, 8)
    assert images_to_tensor(torch.zeros(3, 8, 8), size=16).shape == (1, 3, 16, 16)
    with pytest.raises(UserError, match="different sizes"):
        images_to_tensor([torch.zeros(3, 8, 8), torch.zeros(3, 16, 16)])
    with pytest.raises(UserError, match="does not exist"):
        images_to_tensor(["/nonexistent/image.png"])


# --- text → image --------------------------------------------------------------------------------------------------


def test_text_to_image_shapes_range_and_embeddings(pipe, generated):
    assert pipe.image_size == 64
    assert_images(generated.images, 4, 64)
    assert generated.captions == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    assert generated.filtered == [None] * 4
    assert generated.image_embeds.shape == (4, pipe.clip.projection_dim)
    assert_unit(generated.image_embeds)  # the prior's samples are L2-normalised
    assert generated.images.std() > 0.05  # not a constant image
    pil = generated.pil()
    assert len(pil) == 4 and pil[0].size == (64, 64) and pil[0].mode == "RGB"
    grid = generated.grid(cell=32)
    assert grid.height == 2 * (32 + 4)  # one row per prompt


def test_text_to_image_is_seeded(pipe, generated):
    again = pipe(PROMPTS, num_images_per_prompt=2, seed=0, progress=False)
    torch.testing.assert_close(again.images, generated.images, atol=0, rtol=0)
    torch.testing.assert_close(again.image_embeds, generated.image_embeds, atol=0, rtol=0)
    other = pipe(PROMPTS, num_images_per_prompt=2, seed=1, progress=False)
    for i in range(4):
        assert not torch.equal(other.images[i], generated.images[i])
        assert not torch.equal(other.image_embeds[i], generated.image_embeds[i])
    # Two images of one prompt in one run differ too.
    assert not torch.equal(generated.images[0], generated.images[1])


def test_batch_size_keeps_number_and_order(pipe, capsys):
    prompts = ["a red circle", "a green star", "three cyan crosses"]
    batched = pipe(prompts, seed=3, batch_size=2)  # two batches, the last one partial; progress bar on
    assert_images(batched.images, 3, 64)
    assert batched.captions == prompts
    assert "text → image" in capsys.readouterr().err
    # The first batch is the run of its two prompts alone (same seed, same batch): outputs come in prompt order.
    first = pipe(prompts[:2], seed=3, batch_size=2, progress=False)
    torch.testing.assert_close(batched.images[:2], first.images, atol=0, rtol=0)
    assert not torch.equal(batched.images[2], batched.images[0])


def test_without_upsampler_images_come_at_decoder_size(tiny_exports):
    exports = {k: v for k, v in tiny_exports.items() if k != "upsampler"}
    pipe = UnCLIPPipeline.from_exports(**exports, device="cpu", **FAST)
    assert pipe.upsampler is None and pipe.image_size == 32
    out = pipe("a yellow triangle", seed=0, progress=False)  # a single prompt as a string
    assert_images(out.images, 1, 32)
    assert out.captions == ["a yellow triangle"]


# --- variations, interpolation, text diffs --------------------------------------------------------------------------


def test_variations(pipe, generated):
    images = generated.images[[0, 2]]
    out = pipe.variations(images, num_variations=2, seed=0)
    assert_images(out.images, 4, 64)
    assert out.captions == ["variation of image 0"] * 2 + ["variation of image 1"] * 2
    own = pipe.image_embeddings(images)
    torch.testing.assert_close(out.image_embeds, own.repeat_interleave(2, 0), atol=1e-6, rtol=0)
    assert not torch.equal(out.images[0], out.images[1])  # two variations of one image differ
    again = pipe.variations(images, num_variations=2, seed=0)
    torch.testing.assert_close(again.images, out.images, atol=0, rtol=0)


def test_interpolate_prompt_to_image_file(pipe, generated, tmp_path):
    path = tmp_path / "end.png"
    generated.pil()[2].save(path)
    out = pipe.interpolate("a red circle", str(path), steps=3, seed=5)
    assert_images(out.images, 3, 64)
    assert out.captions == ["a red circle → image"] * 3
    assert_unit(out.image_embeds)
    # The ends are the endpoints' own embeddings: the prior's for the prompt (same seed), CLIP's for the image.
    start = pipe.prior_embeddings(["a red circle"], pipe.generator(5))[0]
    torch.testing.assert_close(out.image_embeds[0], start, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_embeds[-1], pipe.image_embeddings([path])[0], atol=1e-5, rtol=0)
    cosines = out.image_embeds @ out.image_embeds.T
    assert cosines[0, 1] < 1 - 1e-4 and cosines[1, 2] < 1 - 1e-4
    for i, j in ((0, 1), (1, 2), (0, 2)):
        assert not torch.equal(out.images[i], out.images[j])


def test_interpolate_needs_two_steps_and_an_allowed_prompt(pipe, tmp_path):
    for steps in (1, 0):
        with pytest.raises(UserError, match="at least 2 steps"):
            pipe.interpolate("a red circle", "a blue square", steps=steps)
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("circle\n")
    blocked = UnCLIPPipeline(pipe.clip, pipe.prior, pipe.decoder, prompt_filter=PromptBlocklist(blocklist))
    with pytest.raises(UserError, match="blocked"):
        blocked.interpolate("a red circle", "a blue square", steps=2)


def test_interpolate_accepts_long_prompts(pipe):
    long_prompt = "a red circle to the left of a blue square " * 8  # longer than a file name may be
    out = pipe.interpolate(long_prompt, "a blue square", steps=2)
    assert out.images.shape[0] == 2


def test_text_diff(pipe, generated):
    image = generated.images[0]
    out = pipe.text_diff(image, "a red circle", "a blue circle", amounts=(0.0, 0.5, 1.0), seed=0)
    assert_images(out.images, 3, 64)
    assert out.captions == ["a red circle → a blue circle"] * 3
    assert_unit(out.image_embeds)
    torch.testing.assert_close(out.image_embeds[0], pipe.image_embeddings([image])[0], atol=1e-5, rtol=0)
    texts = pipe.text_embeddings(["a red circle", "a blue circle"])
    direction = F.normalize(texts[1] - texts[0], dim=-1)
    torch.testing.assert_close(out.image_embeds[2], direction, atol=1e-4, rtol=0)
    assert not torch.equal(out.images[0], out.images[1])


def test_every_mode_runs_with_a_prior_and_decoder_that_read_the_caption(tiny_clip_export, tmp_path_factory):
    """The base presets condition the prior and decoder on the caption's tokens as well: modes without a
    caption (variations, interpolation, text diffs) decode on the learned null text instead of failing."""
    tmp = tmp_path_factory.mktemp("text_exports")
    exports = {"clip": tiny_clip_export}
    for stage in ("prior", "decoder"):
        exports[stage] = write_stage_export(stage, tiny_clip_export, tmp, [f"model.{stage}.text_tokens=true"])
    pipe = UnCLIPPipeline.from_exports(**exports, device="cpu", **FAST)
    made = pipe(PROMPTS, seed=0, progress=False)
    assert_images(made.images, 2, 32)
    assert_images(pipe.variations(made.images[:1], num_variations=2).images, 2, 32)
    assert_images(pipe.interpolate("a red circle", made.images[1], steps=3).images, 3, 32)
    assert_images(pipe.text_diff(made.images[0], "a red circle", "a blue circle", amounts=(0.0, 1.0)).images, 2, 32)
    assert_images(pipe.inpaint(made.images[:1], centre_mask(32, 8, 24), prompts=["a red star"]).images, 1, 32)


# --- inpainting ----------------------------------------------------------------------------------------------------


def centre_mask(size: int = 64, lo: int = 20, hi: int = 44) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, lo:hi, lo:hi] = 1
    return mask


def test_inpaint_keeps_every_unmasked_pixel(pipe, generated):
    image, mask = generated.images[:1], centre_mask()
    out = pipe.inpaint(image, mask, seed=0)
    assert_images(out.images, 1, 64)
    assert out.captions == ["inpainted"]
    keep, hole = mask[0] == 0, mask[0] == 1
    assert torch.equal(out.images[0][:, keep], image[0][:, keep])
    assert (out.images[0][:, hole] != image[0][:, hole]).float().mean() > 0.5
    torch.testing.assert_close(out.image_embeds, pipe.image_embeddings(image), atol=1e-6, rtol=0)


def test_inpaint_pil_with_prompt_keeps_pixels_exactly(pipe, generated):
    picture = generated.pil()[3]
    mask = centre_mask(lo=8, hi=30)[0]  # (S, S) masks work too; edges off the decoder's 2 px grid
    out = pipe.inpaint([picture], mask[None], prompts=["a magenta star"], seed=1)
    assert out.captions == ["inpainted: a magenta star"]
    assert_unit(out.image_embeds)
    before, after = np.asarray(picture), np.asarray(out.pil()[0])
    keep = ~mask.bool().numpy()
    np.testing.assert_array_equal(after[keep], before[keep])
    assert (after[~keep] != before[~keep]).any(axis=-1).mean() > 0.5


def test_inpaint_rejects_wrong_sizes(pipe, generated):
    small = F.interpolate(generated.images[:1], size=(32, 32), mode="area")
    with pytest.raises(UserError, match="64 px") as err:
        pipe.inpaint(small, centre_mask(32))
    assert "32 px" in str(err.value)
    with pytest.raises(UserError, match="do not match"):
        pipe.inpaint(generated.images[:1], centre_mask(32))
    with pytest.raises(UserError, match="do not match"):
        pipe.inpaint(generated.images[:1], centre_mask().repeat(2, 1, 1))


# --- filters -------------------------------------------------------------------------------------------------------


def test_prompt_blocklist_and_image_filter(pipe, tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# shapes we do not draw\n\ncircle\nmagenta star\n")
    block = PromptBlocklist(blocklist)
    assert block("A RED CIRCLE") and block("a circle.") and block("one Magenta Star")
    assert not block("two red circles") and not block("a semicircle") and not block("a magenta cross")
    assert not block("a blue square")

    seen = []

    def flag_first(images, prompts):
        seen.append((images.shape, list(prompts)))
        return torch.arange(len(images)) == 0

    filtered = UnCLIPPipeline(
        pipe.clip,
        pipe.prior,
        pipe.decoder,
        pipe.upsampler,
        prompt_filter=block,
        image_filter=flag_first,
        **FAST,
    )
    prompts = ["a blue square", "A Red Circle", "two red circles"]
    out = filtered(prompts, seed=0, progress=False)
    assert_images(out.images, 3, 64)
    assert out.filtered == ["image", "prompt", None]
    assert seen == [((3, 3, 64, 64), prompts)]  # the image filter sees every image with its caption
    assert (out.images[0] == -1).all() and (out.images[1] == -1).all()  # withheld images are black
    assert (out.images[2] != -1).any()
    assert out.image_embeds[1].abs().sum() == 0 and out.image_embeds[2].abs().sum() > 0


def test_everything_blocked_gives_black_images(pipe, tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("square\n")
    blocked = UnCLIPPipeline(
        pipe.clip, pipe.prior, pipe.decoder, pipe.upsampler, prompt_filter=PromptBlocklist(blocklist)
    )
    out = blocked(["a blue square"], num_images_per_prompt=2, progress=False)
    assert (out.images == -1).all() and out.filtered == ["prompt", "prompt"]


def test_filter_errors_and_concept_filter(pipe, generated, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        PromptBlocklist(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert not PromptBlocklist(empty)("a red circle")
    with pytest.raises(UserError, match="at least one concept"):
        ConceptFilter(pipe.clip, [], threshold=0.5)
    everything = ConceptFilter(pipe.clip, ["a red circle"], threshold=-1.0)
    nothing = ConceptFilter(pipe.clip, ["a red circle"], threshold=1.01)
    assert everything(generated.images, generated.captions).tolist() == [True] * 4
    assert nothing(generated.images, generated.captions).tolist() == [False] * 4


# --- loading -------------------------------------------------------------------------------------------------------


def test_from_exports_names_the_wrong_export(tiny_exports, tmp_path):
    wrong = dict(tiny_exports, prior=tiny_exports["decoder"])
    with pytest.raises(UserError, match="is a decoder export, not a prior export") as err:
        UnCLIPPipeline.from_exports(**wrong, device="cpu")
    assert "\n" not in str(err.value) and "prior=" in str(err.value)
    empty = tmp_path / "not_an_export"
    empty.mkdir()
    with pytest.raises(UserError, match=r"no dalle_lightning\.json\): train with stage=upsampler") as err:
        UnCLIPPipeline.from_exports(**dict(tiny_exports, upsampler=empty), device="cpu")
    assert "\n" not in str(err.value) and str(empty) in str(err.value)
    with pytest.raises(UserError, match="is a prior export, not a clip export"):
        UnCLIPPipeline.from_exports(**dict(tiny_exports, clip=tiny_exports["prior"]), device="cpu")


def test_from_exports_rejects_an_upsampler_for_another_size(tiny_exports, tmp_path):
    sizes = ["model.upsampler.low_res_size=16", "model.upsampler.train_crop=16"]
    upsampler = write_stage_export("upsampler", tiny_exports["clip"], tmp_path, sizes)
    with pytest.raises(UserError, match="decoder makes 32 px images but the upsampler takes 16 px") as err:
        UnCLIPPipeline.from_exports(**dict(tiny_exports, upsampler=upsampler), device="cpu")
    assert "\n" not in str(err.value)
