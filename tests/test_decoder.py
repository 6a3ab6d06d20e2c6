"""The image diffusion stages: decoder and upsampler — loss on a fixed batch, sampling with each scheduler,
EMA and metrics in a real Trainer run, and one-line errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from diffusers.models.attention_processor import Attention
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config, fd_clip_in_range, first_batch, small_shapes
from dalle_lightning.diffusion.objectives import min_snr_weight, sample_timesteps, training_scheduler
from dalle_lightning.errors import UserError
from dalle_lightning.export import tokenizer_of_clip
from dalle_lightning.stages.decoder import DecoderModule
from dalle_lightning.stages.upsampler import UpsamplerModule, gaussian_blur

SAMPLERS = ["dpmsolver++", "ddim", "ddpm"]


def stage_config(tmp_path, stage, export, overrides=()):
    cfg = compose_config(
        [f"stage={stage}", "scheduler=constant", "optim.lr=2e-3", f"stage.clip={export}", *overrides], tmp_path
    )
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def make_decoder(tmp_path, export, overrides=(), **kwargs) -> DecoderModule:
    plain = stage_config(tmp_path, "decoder", export, overrides)
    torch.manual_seed(0)
    return DecoderModule(
        plain["model"]["decoder"], str(export), plain["optim"], None, plain["stage"]["metrics"], **kwargs
    )


def make_upsampler(tmp_path, export, overrides=()) -> UpsamplerModule:
    plain = stage_config(tmp_path, "upsampler", export, overrides)
    torch.manual_seed(0)
    return UpsamplerModule(plain["model"]["upsampler"], str(export), plain["optim"], None, plain["stage"]["metrics"])


@pytest.fixture(scope="module")
def batch32(shapes_root, tiny_clip_export):
    return first_batch(shapes_root, 32, 8, tokenizer_of_clip(None, tiny_clip_export))


@pytest.fixture(scope="module")
def batch64(shapes_root, tiny_clip_export):
    return first_batch(shapes_root, 64, 8, tokenizer_of_clip(None, tiny_clip_export))


def fit_fixed_batch(module, batch, steps=25):
    """Adam steps on one batch with the same timesteps and noise every step: the loss must fall."""
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(steps):
        generator = torch.Generator().manual_seed(0)
        x0, condition = module.diffusion_inputs(batch, train=False, generator=generator)
        loss = module.loss(x0, condition, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("text_tokens", [False, True])
def test_decoder_loss_falls_on_a_fixed_batch(tmp_path, tiny_clip_export, batch32, text_tokens):
    module = make_decoder(tmp_path, tiny_clip_export, [f"model.decoder.text_tokens={text_tokens}"])
    losses = fit_fixed_batch(module, batch32)
    assert losses[-1] < 0.6 * losses[0], losses[::8]


def test_upsampler_loss_falls_on_a_fixed_batch(tmp_path, tiny_clip_export, batch64):
    module = make_upsampler(tmp_path, tiny_clip_export)
    losses = fit_fixed_batch(module, batch64)
    assert losses[-1] < 0.6 * losses[0], losses[::8]


# The GPU presets' structure at CPU width: cross-attention at several levels over image and text tokens, the ε
# objective under min-SNR, the 64 -> 256 px upsampler (their real width and depth are a matter of memory and time).
NARROW_UNET = ["unet.block_out_channels=[16,16,32,32]", "unet.norm_num_groups=8", "unet.layers_per_block=1"]
NARROW = {
    "decoder": [*NARROW_UNET, "unet.cross_attention_dim=64", "unet.attention_head_dim=2"],
    "upsampler": NARROW_UNET,
}


@pytest.mark.parametrize("stage", ["decoder", "upsampler"])
def test_the_gpu_presets_at_cpu_width_learn_a_fixed_batch_and_sample(tmp_path, tiny_clip_export, batch64, stage):
    overrides = [f"model/{stage}=base", *(f"model.{stage}.{o}" for o in NARROW[stage])]
    if stage == "decoder":
        batch = {k: v[:2] for k, v in batch64.items() if torch.is_tensor(v)}
        module, size = make_decoder(tmp_path, tiny_clip_export, overrides), 64
    else:
        module, size = make_upsampler(tmp_path, tiny_clip_export, overrides), 256
        batch = {"image": torch.nn.functional.interpolate(batch64["image"][:2], size=256, mode="bilinear")}
    assert module.image_size == size
    losses = fit_fixed_batch(module, batch, steps=8)
    assert losses[-1] < 0.8 * losses[0], losses[::2]
    module.eval()
    if stage == "decoder":
        images = module.generate(module.image_embedding(batch), batch["input_ids"], steps=2)
    else:
        images = module.generate(module.downsample(batch["image"]), steps=2)
    assert images.shape == (2, 3, size, size) and torch.isfinite(images).all()


def test_attention_heads_are_as_wide_as_the_presets_mean_and_narrow_heads_fail_at_fit(tmp_path, tiny_clip_export):
    """diffusers reads `attention_head_dim` as the number of heads per block: the presets give heads of 32 (tiny)
    and 64 (base) channels; the name taken at its word (32 heads at 64 channels) is a one-line error at fit."""

    def head_widths(module):
        return {m.inner_dim // m.heads for m in module.unet.modules() if isinstance(m, Attention)}

    assert head_widths(make_decoder(tmp_path, tiny_clip_export)) == {32}
    assert head_widths(make_decoder(tmp_path, tiny_clip_export, ["model/decoder=base"])) == {64}
    narrow = make_decoder(tmp_path, tiny_clip_export, ["model.decoder.unet.attention_head_dim=32"])
    with pytest.raises(UserError, match=r"=32 gives 32 attention heads of 2 channels.*number of heads per block"):
        narrow.on_fit_start()


@pytest.mark.parametrize("rms", [None, 2.0])
def test_image_embedding_enters_the_timestep_embedding_at_the_configured_rms(tmp_path, tiny_clip_export, batch32, rms):
    """The L2-normalised embedding is scaled to `class_embedding_rms` per entry before the UNet projects it into
    the timestep embedding (unscaled: 1/sqrt(D)); the context tokens and a dropped embedding are unaffected."""
    setting = "null" if rms is None else rms
    module = make_decoder(tmp_path, tiny_clip_export, [f"model.decoder.class_embedding_rms={setting}"])
    embeds = module.image_embedding(batch32)
    drop = torch.zeros(embeds.shape[0], dtype=torch.bool)
    drop[0] = True
    condition = module.condition(embeds, drop_image=drop)
    per_entry = condition["class_labels"].pow(2).mean(-1).sqrt()
    expected = module.embedding_dim**-0.5 if rms is None else rms
    assert per_entry[0] == 0
    assert torch.allclose(per_entry[1:], torch.full_like(per_entry[1:], expected), rtol=1e-4)
    context, _ = module.context(embeds.masked_fill(drop[:, None], 0.0))  # from the embedding as it is
    assert torch.equal(condition["encoder_hidden_states"], context)


def test_a_text_reading_decoder_without_captions_is_conditioned_as_with_its_text_dropped(
    tmp_path, tiny_clip_export, batch32
):
    """Variations and interpolations have no caption: a decoder that reads text then gets its learned null text
    (the image tokens alone), and still samples; training without captions is a one-line error."""
    module = make_decoder(tmp_path, tiny_clip_export, ["model.decoder.text_tokens=true"]).eval()
    part = {k: v[:3] for k, v in batch32.items() if torch.is_tensor(v)}
    embeds, ids = module.image_embedding(part), part["input_ids"]
    x, t = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.full((3,), 500)
    with torch.no_grad():
        without = module.denoise(x, t, module.condition(embeds))
        dropped = module.denoise(x, t, module.condition(embeds, ids, drop_text=torch.ones(3, dtype=torch.bool)))
        with_text = module.denoise(x, t, module.condition(embeds, ids))
    assert torch.allclose(without, dropped, atol=1e-5)
    assert not torch.allclose(without, with_text, atol=1e-3)  # the text does reach the UNet
    assert module.generate(embeds, steps=2).shape == (3, 3, 32, 32)
    with pytest.raises(UserError, match="text_tokens=true needs captions"):
        module.diffusion_inputs({"image": part["image"]}, train=True)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_decoder_samples_have_the_right_shape_and_range(tmp_path, tiny_clip_export, batch32, sampler):
    module = make_decoder(tmp_path, tiny_clip_export, ["model.decoder.text_tokens=true"]).eval()
    part = {k: v[:3] for k, v in batch32.items() if torch.is_tensor(v)}
    embeds = module.image_embedding(part)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return module.generate(embeds, part["input_ids"], steps=3, sampler=sampler, generator=generator)

    images = draw(0)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, draw(0))  # a seed fixes the result, stochastic samplers included
    assert not torch.equal(images, draw(1))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_upsampler_samples_have_the_right_shape_and_range(tmp_path, tiny_clip_export, batch64, sampler):
    module = make_upsampler(tmp_path, tiny_clip_export).eval()
    low = module.downsample(batch64["image"][:2])
    assert low.shape == (2, 3, 32, 32)
    for noise_aug in (0.0, 0.1):
        images = module.generate(low, noise_aug=noise_aug, steps=3, sampler=sampler)
        assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
        assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1


def test_upsampler_training_inputs_are_crops_blurred_and_noised(tmp_path, tiny_clip_export, batch64):
    module = make_upsampler(tmp_path, tiny_clip_export)
    high, condition = module.diffusion_inputs(batch64, train=True)
    assert high.shape[-1] == module.train_crop == 32 and condition["low"].shape == high.shape
    assert condition["class_labels"].max() <= module.noise_level(module.noise_aug_max)
    # The blur keeps a constant image and the mean of any image, and smooths.
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5])), flat, atol=1e-6)
    noisy = torch.randn(2, 3, 16, 16)
    blurred = gaussian_blur(noisy, torch.tensor([0.6, 1.0]))
    assert blurred.std() < noisy.std()


def test_min_snr_weights_cap_easy_timesteps():
    t = torch.tensor([0, 500, 999])
    for kind in ("epsilon", "sample", "v_prediction"):
        weights = min_snr_weight(training_scheduler(prediction_type=kind), t, 5.0)
        assert weights.shape == (3,) and torch.isfinite(weights).all() and (weights >= 0).all()
    eps = min_snr_weight(training_scheduler(prediction_type="epsilon"), t, 5.0)
    assert eps[0] < 0.01 and eps[2] == pytest.approx(1.0)  # high SNR capped; noisy steps keep full weight


def test_logit_normal_timesteps_favour_the_middle_noise_levels_in_training_only(tmp_path, tiny_clip_export, batch32):
    uniform = sample_timesteps(20_000, 1000, generator=torch.Generator().manual_seed(0))
    middle = sample_timesteps(20_000, 1000, "logit_normal", 0.0, 1.0, generator=torch.Generator().manual_seed(0))
    later = sample_timesteps(20_000, 1000, "logit_normal", 0.5, 1.0, generator=torch.Generator().manual_seed(0))
    for t in (uniform, middle, later):
        assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999

    def share_in_middle(t):
        return ((t >= 250) & (t < 750)).float().mean().item()

    # P(|z| < logit(0.75)) = 0.73 for z ~ N(0, 1), against 0.5 for uniform timesteps
    assert share_in_middle(uniform) == pytest.approx(0.5, abs=0.02)
    assert share_in_middle(middle) == pytest.approx(0.73, abs=0.02)
    assert middle.float().median() == pytest.approx(500, abs=15)
    assert later.float().median() == pytest.approx(1000 * torch.sigmoid(torch.tensor(0.5)).item(), abs=15)

    # Validation draws uniform timesteps whatever training samples, so val/loss stays comparable across configs.
    logit = make_decoder(tmp_path, tiny_clip_export, ["++model.decoder.timestep_sampling=logit_normal"]).eval()
    plain = make_decoder(tmp_path, tiny_clip_export, ["++model.decoder.timestep_sampling=uniform"]).eval()

    def loss(module, train):
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            x0, condition = module.diffusion_inputs(batch32, train=False, generator=generator)
            return module.loss(x0, condition, generator, train=train)

    assert torch.equal(loss(logit, train=False), loss(plain, train=False))
    assert not torch.equal(loss(logit, train=True), loss(plain, train=True))
    with pytest.raises(UserError, match="timestep_sampling='cosine' is unknown: use one of uniform, logit_normal"):
        make_decoder(tmp_path, tiny_clip_export, ["++model.decoder.timestep_sampling=cosine"])


def test_decoder_errors_are_one_line(tmp_path, tiny_clip_export, batch32, batch64):
    module = make_decoder(tmp_path, tiny_clip_export)
    with pytest.raises(UserError, match=r"model\.decoder\.image_size=32"):
        module.diffusion_inputs(batch64, train=True)
    shards = make_decoder(tmp_path, tiny_clip_export, embeddings="shards")
    with pytest.raises(UserError, match="no img_emb"):
        shards.diffusion_inputs(batch32, train=True)
    with pytest.raises(UserError, match="7-wide image embeddings"):
        shards.diffusion_inputs({**batch32, "img_emb": torch.randn(8, 7)}, train=True)
    with pytest.raises(UserError, match=r"stage\.embeddings='disk' is unknown"):
        make_decoder(tmp_path, tiny_clip_export, embeddings="disk")
    with pytest.raises(UserError, match="not a multiple"):
        make_upsampler(tmp_path, tiny_clip_export, ["model.upsampler.low_res_size=24"])


class RawWeights(L.Callback):
    def on_train_end(self, trainer, pl_module):
        self.weights = {name: p.detach().clone() for name, p in pl_module.unet.named_parameters()}


@pytest.mark.parametrize("stage", ["decoder", "upsampler"])
def test_trainer_run_averages_weights_scores_samples_and_draws_a_grid(tmp_path, shapes_root, tiny_clip_export, stage):
    """Two real training epochs: EMA weights move away from the raw ones, validation logs the loss, the
    Fréchet distance in CLIP space (and CLIP score for the decoder) on sampled images, and a grid PNG."""
    plain = stage_config(
        tmp_path,
        stage,
        tiny_clip_export,
        [f"model.{stage}.sample_steps=2", "stage.metrics.num_samples=6", "callbacks.sample_grid.num_rows=2"],
    )
    tokenizer = tokenizer_of_clip(None, tiny_clip_export)
    size = plain["stage"]["image_size"]
    dm = small_shapes(
        shapes_root,
        image_size=size,
        batch_size=8,
        samples_per_epoch=24,
        val_samples=8,
        num_workers=0,
        tokenizer=tokenizer,
    )
    torch.manual_seed(0)
    module = instantiate(plain["stage"]["module"], tokenizer=tokenizer)
    ema = instantiate(plain["callbacks"]["ema"])
    grid = instantiate(plain["callbacks"]["sample_grid"], dirpath=str(tmp_path / "samples"))
    raw = RawWeights()  # before the EMA callback, which copies the average into the module at the end
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[raw, ema, grid]
    )
    trainer.fit(module, datamodule=dm)

    differs = [not torch.equal(p, raw.weights[name]) for name, p in module.unet.named_parameters()]
    assert sum(differs) > len(differs) // 2
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/loss"]) and fd_clip_in_range(metrics["val/fd_clip"])
    if stage == "decoder":
        assert 0 <= metrics["val/clip_score"] <= 100
    else:
        assert torch.isfinite(metrics["val/psnr"]) and metrics["val/psnr_bicubic"] > 15
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["epoch000.png", "epoch001.png"]
