"""The CLIP stage: contrastive loss, retrieval metrics, tokenizer, model loading and the export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import compose_config, first_batch, small_shapes
from dalle_lightning.errors import UserError
from dalle_lightning.export import write_export
from dalle_lightning.metrics.retrieval import RetrievalMetrics
from dalle_lightning.models.clip import build_clip, encode_texts, load_frozen_clip
from dalle_lightning.models.tokenizer import load_tokenizer, train_bpe
from dalle_lightning.stages.clip import ClipModule, ContrastiveLoss, SigmoidLoss


@pytest.fixture(scope="module")
def tokenizer(shapes_root):
    dm = small_shapes(shapes_root, image_size=32)
    return train_bpe(dm.captions(1200), vocab_size=512, context_length=24)


@pytest.fixture(scope="module")
def fixed_batch(shapes_root, tokenizer):
    return first_batch(shapes_root, image_size=32, batch_size=32, tokenizer=tokenizer)


def make_module(tmp_path, tokenizer, overrides=()):
    cfg = compose_config(["scheduler=constant", *overrides], tmp_path)
    plain = OmegaConf.to_container(cfg, resolve=True)
    return ClipModule(plain["model"]["clip"], plain["optim"], None, tokenizer, loss=plain["stage"]["loss"])


@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
def test_loss_falls_on_a_fixed_batch(tmp_path, tokenizer, fixed_batch, loss):
    torch.manual_seed(0)
    module = make_module(tmp_path, tokenizer, ["optim.lr=3e-4", f"stage.loss={loss}"])
    optimizer = module.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(40):
        loss, _, _ = module._loss(fixed_batch, gather=None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_contrastive_loss_is_clips_symmetric_cross_entropy():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    labels = torch.arange(6)
    expected = (F.cross_entropy(scale * image @ text.T, labels) + F.cross_entropy(scale * text @ image.T, labels)) / 2
    ours = ContrastiveLoss()(image, text, scale)
    assert torch.allclose(ours, expected, atol=1e-6)


def test_sigmoid_loss_is_siglips_pairwise_binary_cross_entropy():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    loss = SigmoidLoss(bias_init=-3.0)
    logits = scale * image @ text.T - 3.0
    expected = F.binary_cross_entropy_with_logits(logits, torch.eye(6), reduction="sum") / 6
    assert torch.allclose(loss(image, text, scale), expected, atol=1e-5)
    # Matching pairs pull the loss down, swapped ones push it up; the bias is learnt.
    assert loss(image, image, scale) < loss(image, image.roll(1, 0), scale)
    loss(image, text, scale).backward()
    assert loss.bias.grad is not None and loss.bias.grad != 0


def test_unknown_loss_is_a_one_line_error(tmp_path, tokenizer):
    with pytest.raises(UserError, match=r"stage.loss='softmax' is unknown: use infonce or sigmoid"):
        make_module(tmp_path, tokenizer, ["stage.loss=softmax"])


def test_retrieval_metrics_on_known_features():
    groups = torch.tensor([0, 0, 1, 2, 3, 4])
    basis = torch.eye(8)
    text = basis[groups]
    metric = RetrievalMetrics()
    metric.update(text.clone(), text, groups, groups + 10, torch.tensor([False, False, False, True, True, True]))
    scores = metric.compute()
    # Every text finds an image of its group, even where two images share it.
    assert scores["t2i_r1"] == 1 and scores["i2t_r1"] == 1 and scores["zeroshot_acc"] == 1
    assert {"t2i_r1_heldout", "t2i_r1_seen", "t2i_r5"} <= set(scores)
    metric.reset()
    metric.update(basis[torch.tensor([1, 2, 3, 4, 5, 0])], text, groups, groups + 10, torch.zeros(6, dtype=torch.bool))
    assert metric.compute()["t2i_r1"] == 0


def test_bpe_tokenizer_pools_at_eos_and_takes_any_text(tokenizer, tmp_path):
    assert tokenizer.eos_token_id != 2  # transformers' CLIP treats eos id 2 as the legacy (argmax) layout
    ids = tokenizer(
        ["a red circle", "\u2603\u00e9\U0001f600 x" * 30],
        padding="max_length",
        truncation=True,
        max_length=24,
        return_tensors="pt",
    )["input_ids"]
    assert ids.shape == (2, 24)
    assert ids[1, -1] == tokenizer.eos_token_id  # truncated, still ends in EOS
    assert ids[0, 0] == tokenizer.bos_token_id
    tokenizer.save_pretrained(str(tmp_path))
    assert load_tokenizer(tmp_path)("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]


def test_text_features_do_not_depend_on_trailing_padding(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = make_module(tmp_path, tokenizer).model.eval()
    captions = ["a red circle", "a blue square to the left of a yellow star"]
    short = tokenizer(captions, padding="longest", return_tensors="pt")
    long = tokenizer(captions, padding="max_length", max_length=24, return_tensors="pt")
    assert short["input_ids"].shape[1] < 24
    with torch.no_grad():
        trimmed = encode_texts(model, long["input_ids"], long["attention_mask"])
        reference = encode_texts(model, short["input_ids"], short["attention_mask"])
        untrimmed = model.get_text_features(**long)
        untrimmed = F.normalize(untrimmed if torch.is_tensor(untrimmed) else untrimmed.pooler_output, dim=-1)
    assert torch.allclose(trimmed, reference, atol=1e-5) and torch.allclose(trimmed, untrimmed, atol=1e-5)


def test_export_round_trip_and_one_line_errors(tmp_path, tokenizer, fixed_batch):
    torch.manual_seed(0)
    module = make_module(tmp_path, tokenizer).eval()
    export = write_export(tmp_path / "export" / "clip", "clip", module.export, config={"stage": "clip"})
    assert {"model.safetensors", "config.json", "tokenizer.json", "dalle_lightning.json"} <= {
        p.name for p in export.iterdir()
    }
    clip = load_frozen_clip(export)
    with torch.no_grad():
        ours = module(fixed_batch["image"], fixed_batch["input_ids"], fixed_batch["attention_mask"])
    theirs = (
        clip.encode_images(fixed_batch["image"]),
        clip.encode_texts(fixed_batch["input_ids"], fixed_batch["attention_mask"]),
    )
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))
    assert clip.tokenizer("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]

    with pytest.raises(UserError) as missing:
        load_frozen_clip(tmp_path / "nowhere")
    assert "stage.clip=" in str(missing.value) and "\n" not in str(missing.value)
    (export / "dalle_lightning.json").write_text(json.dumps({"stage": "prior"}))
    with pytest.raises(UserError, match="is a prior export, not a clip export"):
        load_frozen_clip(export)


def test_pretrained_clip_loads_with_from_pretrained(tmp_path, tokenizer):
    torch.manual_seed(0)
    source = make_module(tmp_path, tokenizer).model
    source.save_pretrained(str(tmp_path / "pretrained"))
    tokenizer.save_pretrained(str(tmp_path / "pretrained"))
    loaded = build_clip({"pretrained": str(tmp_path / "pretrained")})
    assert torch.equal(loaded.visual_projection.weight, source.visual_projection.weight)
    with pytest.raises(UserError, match=r"model\.clip\.pretrained"):
        build_clip({"pretrained": str(tmp_path / "missing")})


def test_export_replaces_atomically(tmp_path):
    target = tmp_path / "clip"
    write_export(target, "clip", lambda p: (p / "a.txt").write_text("old"))

    def crash(path):
        (path / "a.txt").write_text("half")
        raise RuntimeError("killed while exporting")

    with pytest.raises(RuntimeError):
        write_export(target, "clip", crash)
    assert (target / "a.txt").read_text() == "old"  # the previous export is untouched
