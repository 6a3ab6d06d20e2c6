"""The prior stage: loss on a fixed batch, sampling with each scheduler, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, first_batch
from dalle_lightning.errors import UserError
from dalle_lightning.models.clip import load_frozen_clip
from dalle_lightning.stages.prior import PriorModule


@pytest.fixture(scope="module")
def embedding_batch(shapes_root, tiny_clip_export):
    """Real Shapes samples embedded by the CLIP export, as the embedding shards would hold them."""
    clip = load_frozen_clip(tiny_clip_export)
    batch = first_batch(shapes_root, image_size=32, batch_size=32, tokenizer=clip.tokenizer)
    image = clip.encode_images(batch["image"])
    text = clip.encode_texts(batch["input_ids"], batch["attention_mask"])
    return {
        "img_emb": image,
        "txt_emb": text,
        "txt_ids": batch["input_ids"],
        "group_id": batch["group_id"],
        "heldout": batch["heldout"],
    }


def make_prior(tmp_path, export, overrides=()):
    cfg = compose_config(["stage=prior", "scheduler=constant", "optim.lr=1e-3", *overrides], tmp_path)
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    torch.manual_seed(0)
    module = PriorModule(plain["model"]["prior"], str(export), plain["optim"], None)
    return module


def set_statistics(module, batch):
    module.prior.clip_mean.data.copy_(batch["img_emb"].mean(0, keepdim=True))
    module.prior.clip_std.data.copy_(batch["img_emb"].std(0, keepdim=True))


@pytest.mark.parametrize("text_tokens", [True, False])
def test_prior_loss_falls_on_a_fixed_batch(tmp_path, tiny_clip_export, embedding_batch, text_tokens):
    module = make_prior(
        tmp_path, tiny_clip_export, [f"model.prior.text_tokens={text_tokens}", "model.prior.cond_drop_prob=0"]
    )
    set_statistics(module, embedding_batch)
    optimizer = module.configure_optimizers()["optimizer"]
    torch.manual_seed(1)
    losses = []
    for _ in range(60):
        loss = module.training_step(embedding_batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses[::10]


@pytest.mark.parametrize("sampler", ["dpmsolver++", "ddim", "ddpm"])
def test_sampling_returns_unit_embeddings_deterministically(tmp_path, tiny_clip_export, embedding_batch, sampler):
    module = make_prior(tmp_path, tiny_clip_export).eval()
    set_statistics(module, embedding_batch)
    batch = {k: v[:4] for k, v in embedding_batch.items()}
    kwargs = dict(steps=5, sampler=sampler, candidates=3, guidance_scale=3.0)
    first = module.sample(batch, generator=torch.Generator().manual_seed(0), **kwargs)
    again = module.sample(batch, generator=torch.Generator().manual_seed(0), **kwargs)
    other = module.sample(batch, generator=torch.Generator().manual_seed(1), **kwargs)
    assert first.shape == (4, module.embedding_dim) and first.dtype == torch.float32
    assert torch.allclose(first.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_missing_clip_export_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError) as info:
        make_prior(tmp_path, tmp_path / "no-export")
    assert "stage.clip=" in str(info.value) and "\n" not in str(info.value)


def test_the_frozen_text_tower_is_no_part_of_the_module(tmp_path, tiny_clip_export):
    module = make_prior(tmp_path, tiny_clip_export, ["model.prior.text_tokens=true"])
    assert module.clip.text_encoder is not None
    assert all(k.startswith(("prior.", "val_metrics.")) for k in module.state_dict())  # checkpoints and exports
    assert {id(p) for p in module.parameters()} == {id(p) for p in module.prior.parameters()}
    optimized = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.clip.text_encoder.parameters()}


def test_text_mask_ends_at_the_first_end_of_text(tmp_path, tiny_clip_export, embedding_batch):
    module = make_prior(tmp_path, tiny_clip_export, ["model.prior.text_tokens=true"])
    eos = module.clip.tokenizer.eos_token_id
    ids = torch.tensor([[0, 5, 6, eos, eos, eos]])  # padded with end-of-text, as OpenAI's tokenizer does
    _, encodings, mask = module.text_condition({"txt_emb": torch.zeros(1, module.embedding_dim), "txt_ids": ids})
    assert mask.tolist() == [[True, True, True, True, False, False]]
    assert encodings.shape == (1, 6, module.embedding_dim)
