"""Published unCLIP weights in: our prior, Karlo decoder and Karlo upsampler loaded from a Karlo-layout folder (tiny
random networks built and saved with diffusers' and transformers' own classes) give the model outputs diffusers'
modules give as `UnCLIPPipeline` calls them, the prior's loss before any step is the loss diffusers' module gives,
and folders of the wrong layout, width or weight format are refused in one line."""

from __future__ import annotations

import pickle
import shutil

import hydra
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PriorTransformer, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from omegaconf import OmegaConf
from transformers import CLIPTextModelWithProjection

from conftest import Detonator, compose_config, first_batch
from dalle_lightning.errors import UserError
from dalle_lightning.models.clip import load_frozen_clip
from dalle_lightning.models.tokenizer import load_tokenizer
from test_decoder import fit_fixed_batch

pytestmark = pytest.mark.usefixtures("one_thread")

# fp32 on the same weights and inputs: what "the same outputs" means here
TOLERANCE = 1e-5
PROMPTS = ["a red circle", "two blue squares to the left of a green triangle", "a yellow star", ""]


def karlo_stage(tmp_path, stage, clip_export, overrides=()):
    """A stage module of the `karlo` preset, built from the composed training config as train.py builds it."""
    preset = [f"stage={stage}", f"model/{stage}=karlo", f"stage.clip={clip_export}"]
    cfg = compose_config([*preset, "scheduler=constant", *overrides], tmp_path)
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    torch.manual_seed(0)
    return hydra.utils.instantiate(plain["stage"]["module"], tokenizer=None, _convert_="all").eval()


def load_prior(tmp_path, clip_export, folder, overrides=()):
    overrides = [f"model.prior.pretrained={folder}", "model.prior.embedding_dim=128", *overrides]
    return karlo_stage(tmp_path, "prior", clip_export, overrides)


def load_decoder(tmp_path, clip_export, folder):
    overrides = [f"model.decoder.pretrained={folder}", "model.decoder.image_size=32"]
    return karlo_stage(tmp_path, "decoder", clip_export, overrides)


@pytest.fixture(scope="module")
def reference(karlo_folder):
    """What UnCLIPPipeline._encode_prompt gives for PROMPTS and for the empty caption, with the folder's own text
    encoder and tokenizer."""
    text_encoder = CLIPTextModelWithProjection.from_pretrained(karlo_folder / "text_encoder", use_safetensors=True)
    tokenizer = load_tokenizer(karlo_folder / "tokenizer")

    def encode(prompts):
        tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        with torch.no_grad():
            output = text_encoder(ids)
        return ids, mask.bool(), output.text_embeds, output.last_hidden_state

    return {"text": encode(PROMPTS), "empty": encode([""] * len(PROMPTS))}


@pytest.fixture(scope="module")
def images(shapes_root):
    return first_batch(shapes_root, 64, len(PROMPTS))["image"]


def report(name, difference):
    print(f"max |ours - diffusers| {name}: {difference:.3g}")
    assert difference <= TOLERANCE, (name, difference)


def test_prior_outputs_and_loss_equal_diffusers(tmp_path, tiny_clip_export, karlo_folder, reference, images):
    module = load_prior(tmp_path, tiny_clip_export, karlo_folder)
    diffusers_prior = PriorTransformer.from_pretrained(karlo_folder / "prior", use_safetensors=True).eval()
    clip = load_frozen_clip(tiny_clip_export)
    ids, mask, text_embeds, hidden_states = reference["text"]
    _, empty_mask, empty_embeds, empty_states = reference["empty"]
    with torch.no_grad():
        # what embed.py normalize=false writes into the shards
        batch = {
            "img_emb": clip.encode_images(F.interpolate(images, size=32, mode="area"), normalize=False),
            "txt_emb": clip.encode_texts(ids, mask.long(), normalize=False),
            "txt_ids": ids,
        }
        x = torch.randn(len(PROMPTS), 128, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([0, 250, 600, 999])
        ours = module.denoise(x, t, *module.text_condition(batch))
        theirs = diffusers_prior(
            x, t, proj_embedding=text_embeds, encoder_hidden_states=hidden_states, attention_mask=mask
        ).predicted_image_embedding
        report("prior, conditional", (ours - theirs).abs().max().item())
        # guidance's unconditional half: our null text is the pipeline's empty caption
        dropped = module.drop_text(torch.ones(len(PROMPTS), dtype=torch.bool), *module.text_condition(batch))
        ours = module.denoise(x, t, *dropped)
        theirs = diffusers_prior(
            x, t, proj_embedding=empty_embeds, encoder_hidden_states=empty_states, attention_mask=empty_mask
        ).predicted_image_embedding
        report("prior, empty caption", (ours - theirs).abs().max().item())

        # the loss before any step: x0 in the normalised space, as diffusers' Kandinsky 2.2 prior training computes it
        noise = torch.randn(batch["img_emb"].shape, generator=torch.Generator().manual_seed(1))
        loss = module.batch_loss(batch, t, noise, drop=torch.zeros(len(PROMPTS), dtype=torch.bool))
        scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
        x0 = (batch["img_emb"] - diffusers_prior.clip_mean) / diffusers_prior.clip_std
        prediction = diffusers_prior(
            scheduler.add_noise(x0, noise, t),
            timestep=t,
            proj_embedding=text_embeds,
            encoder_hidden_states=hidden_states,
            attention_mask=mask,
        ).predicted_image_embedding
        report("prior loss", abs(loss.item() - F.mse_loss(prediction, x0).item()))
    # the statistics stay as published: out of the optimizer
    optimized = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert id(module.prior.clip_mean) not in optimized and id(module.prior.clip_std) not in optimized
    assert torch.equal(module.prior.clip_std, diffusers_prior.clip_std)


def test_decoder_outputs_equal_diffusers_with_guidance(tmp_path, tiny_clip_export, karlo_folder, reference, images):
    module = load_decoder(tmp_path, tiny_clip_export, karlo_folder)
    unet = UNet2DConditionModel.from_pretrained(karlo_folder / "decoder", use_safetensors=True).eval()
    text_proj = UnCLIPTextProjModel.from_pretrained(karlo_folder / "text_proj", use_safetensors=True).eval()
    ids, mask, text_embeds, hidden_states = reference["text"]
    _, empty_mask, empty_embeds, empty_states = reference["empty"]
    n = len(PROMPTS)
    with torch.no_grad():
        image_embeds = module.image_embedding({"image": F.interpolate(images, size=32, mode="area")})
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        t = torch.tensor(700)
        # UnCLIPPipeline: [unconditional; conditional], the null image embedding prepended by text_proj
        context, time = text_proj(
            image_embeddings=image_embeds,
            prompt_embeds=torch.cat([empty_embeds, text_embeds]),
            text_encoder_hidden_states=torch.cat([empty_states, hidden_states]),
            do_classifier_free_guidance=True,
        )
        attention_mask = F.pad(torch.cat([empty_mask, mask]), (text_proj.clip_extra_context_tokens, 0), value=True)
        theirs = unet(
            sample=torch.cat([x, x]),
            timestep=t,
            encoder_hidden_states=context,
            class_labels=time,
            attention_mask=attention_mask,
        ).sample
        # ours, as DecoderModule.generate conditions a guided step: [conditional; dropped]
        drop = torch.arange(2 * n) >= n
        condition = module.condition(torch.cat([image_embeds, image_embeds]), torch.cat([ids, ids]), drop, drop)
        ours = module.denoise(torch.cat([x, x]), t, condition)
    assert ours.shape == (2 * n, 6, 32, 32)
    report("decoder, conditional", (ours[:n] - theirs[n:]).abs().max().item())
    report("decoder, unconditional", (ours[n:] - theirs[:n]).abs().max().item())


def test_upsampler_outputs_equal_diffusers(tmp_path, tiny_clip_export, karlo_folder, images):
    overrides = ["model.upsampler.image_size=64", "model.upsampler.low_res_size=32", "model.upsampler.train_crop=32"]
    module = karlo_stage(
        tmp_path, "upsampler", tiny_clip_export, [f"model.upsampler.pretrained={karlo_folder}", *overrides]
    )
    unet = UNet2DModel.from_pretrained(karlo_folder / "super_res_first", use_safetensors=True).eval()
    low = module.downsample(images)
    x = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(400)
    with torch.no_grad():
        upscaled = F.interpolate(low, size=[64, 64], mode="bicubic", align_corners=False, antialias=True)
        theirs = unet(sample=torch.cat([x, upscaled], dim=1), timestep=t).sample
        ours = module.denoise(x, t, module.condition(low, torch.zeros(len(low), dtype=torch.long)))
    report("upsampler", (ours - theirs).abs().max().item())


def test_hybrid_loss_learns_the_variance_and_falls(tmp_path, tiny_clip_export, karlo_folder, shapes_root):
    """The bound term trains the variance channels only (ε is stopped), and a few steps on a batch lower the loss."""
    module = load_decoder(tmp_path, tiny_clip_export, karlo_folder).train()
    tokenizer = load_tokenizer(tiny_clip_export)
    batch = first_batch(shapes_root, 32, 8, tokenizer)
    x0, _ = module.diffusion_inputs(batch, train=False, generator=torch.Generator().manual_seed(0))
    output = torch.randn(8, 6, 32, 32, requires_grad=True)
    noise, t = torch.randn_like(x0), torch.randint(0, 1000, (8,))
    module.objective(output, x0, noise, t, module.noise.add_noise(x0, noise, t)).backward()
    assert output.grad[:, 3:].abs().sum() > 0
    eps_only = torch.autograd.grad(F.mse_loss(output[:, :3], noise), output)[0]
    assert torch.allclose(output.grad[:, :3], eps_only[:, :3], atol=1e-7)  # ε gets the MSE's gradient alone

    losses = fit_fixed_batch(module, batch, steps=12)
    assert losses[-1] < 0.8 * losses[0], losses


def user_error(load, *args) -> str:
    """The one-line UserError that `load(*args)` raises (Hydra's instantiate wraps it, as train.py sees it)."""
    with pytest.raises(Exception) as info:
        load(*args)
    cause = info.value
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__
    assert cause is not None and "\n" not in str(cause), info.value
    return str(cause)


def test_wrong_layout_width_and_pickled_weights_are_one_line(tmp_path, tiny_clip_export, karlo_folder):
    def refused(*args) -> str:
        return user_error(load_prior, *args)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no prior/config.json: expected a diffusers PriorTransformer folder" in refused(
        tmp_path, tiny_clip_export, empty
    )
    assert "holds a UNet2DConditionModel, not a PriorTransformer" in refused(
        tmp_path, tiny_clip_export, karlo_folder / "decoder"
    )
    # the preset's CLIP width against the CLIP given
    message = refused(tmp_path, tiny_clip_export, karlo_folder, ["model.prior.embedding_dim=768"])
    assert "model.prior.embedding_dim=768" in message and "128-wide" in message

    # a .bin-only folder is refused, and never unpickled
    pickled = tmp_path / "pickled"
    shutil.copytree(karlo_folder / "prior", pickled / "prior")
    (pickled / "prior" / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "ran"
    (pickled / "prior" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Detonator(str(marker))))
    message = refused(tmp_path, tiny_clip_export, pickled)
    assert "diffusion_pytorch_model.bin, a pickle" in message and "safetensors" in message
    assert not marker.exists()

    # Karlo's decoder at another width than the CLIP's: a 768-wide text projection
    wide = tmp_path / "wide"
    shutil.copytree(karlo_folder / "decoder", wide / "decoder")
    UnCLIPTextProjModel(clip_embeddings_dim=768, time_embed_dim=128, cross_attention_dim=64).save_pretrained(
        wide / "text_proj"
    )
    message = user_error(load_decoder, tmp_path, tiny_clip_export, wide)
    assert "768-wide CLIP embeddings" in message and "128-wide" in message


def test_openai_legacy_text_config_ends_text_at_the_last_vocabulary_id():
    """OpenAI's CLIP configs (Karlo's text encoder) say eos_token_id=2, which transformers reads as "the end of text
    is the highest id": the mask and the empty caption follow the ids the tokenizer really writes."""
    from transformers import CLIPTextConfig

    from dalle_lightning.models.clip import empty_caption_ids, text_mask

    legacy = CLIPTextConfig(vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    ids = torch.tensor([[49406, 320, 2, 49407, 0, 0]])  # "a <"> ." padded with "!" (id 0), as Karlo's tokenizer pads
    assert text_mask(ids, legacy).tolist() == [[True, True, True, True, False, False]]
    assert empty_caption_ids(legacy, 4).tolist() == [[49406, 49407, 49407, 49407]]


def test_presets_build_karlo_structures_from_scratch(tmp_path, tiny_clip_export):
    """Without `pretrained`, the karlo presets (at tiny widths) build Karlo's structures, whose weights load into
    diffusers' own classes as they are."""
    prior = karlo_stage(
        tmp_path,
        "prior",
        tiny_clip_export,
        ["model.prior.embedding_dim=128", "model.prior.depth=1", "model.prior.heads=2", "model.prior.head_dim=32"],
    )
    assert prior.text_tokens and prior.prior.norm_in is None and prior.prior.config.num_embeddings == 24
    assert prior.null_text == "empty_caption" and not prior.normalize_embeddings

    unet = [
        "model.decoder.image_size=32",
        "model.decoder.unet.block_out_channels=[32,64]",
        "model.decoder.unet.down_block_types=[ResnetDownsampleBlock2D,SimpleCrossAttnDownBlock2D]",
        "model.decoder.unet.up_block_types=[SimpleCrossAttnUpBlock2D,ResnetUpsampleBlock2D]",
        "model.decoder.unet.layers_per_block=1",
        "model.decoder.unet.cross_attention_dim=64",
        "model.decoder.unet.attention_head_dim=32",
        "+model.decoder.unet.norm_num_groups=8",
    ]
    decoder = karlo_stage(tmp_path, "decoder", tiny_clip_export, unet)
    assert decoder.unet.config.out_channels == 6 and decoder.noise.config.variance_type == "learned_range"
    config = {k: v for k, v in decoder.text_proj.config.items() if not k.startswith("_")}
    UnCLIPTextProjModel(**config).load_state_dict(decoder.text_proj.state_dict())  # strict
    assert config == {
        "clip_extra_context_tokens": 4,
        "clip_embeddings_dim": 128,
        "time_embed_dim": 128,
        "cross_attention_dim": 64,
    }

    sizes = ["model.upsampler.image_size=64", "model.upsampler.low_res_size=32", "model.upsampler.train_crop=32"]
    widths = ["model.upsampler.unet.block_out_channels=[32,64]", "model.upsampler.unet.layers_per_block=1"]
    blocks = [
        "model.upsampler.unet.down_block_types=[ResnetDownsampleBlock2D,ResnetDownsampleBlock2D]",
        "model.upsampler.unet.up_block_types=[ResnetUpsampleBlock2D,ResnetUpsampleBlock2D]",
        "+model.upsampler.unet.norm_num_groups=8",
    ]
    upsampler = karlo_stage(tmp_path, "upsampler", tiny_clip_export, [*sizes, *widths, *blocks])
    assert upsampler.unet.config.in_channels == 6 and upsampler.unet.config.class_embed_type is None


def test_diffusers_export_of_default_stages(tmp_path, tiny_exports):
    """The default decoder is not Karlo's: the UnCLIPPipeline layout refuses it in one line; a prior trained on
    L2-normalised embeddings becomes a PriorTransformer folder alone, which diffusers loads."""
    from dalle_lightning.export_diffusers import export_diffusers

    exports = {stage: tiny_exports[stage] for stage in ("clip", "prior", "decoder", "upsampler")}
    with pytest.raises(UserError, match=r"exports\.decoder is not Karlo-structured"):
        export_diffusers(tmp_path / "unclip", **exports)
    assert not (tmp_path / "unclip").exists()
    out = tmp_path / "prior"
    assert export_diffusers(out, exports["clip"], exports["prior"]) == "PriorTransformer"
    prior = PriorTransformer.from_pretrained(out / "prior", use_safetensors=True)
    assert prior.config.embedding_dim == 128 and (out / "scheduler" / "scheduler_config.json").is_file()
    with pytest.raises(UserError, match="exists and is not empty"):
        export_diffusers(out, exports["clip"], exports["prior"])
