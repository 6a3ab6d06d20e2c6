"""Two CPU processes (gloo) compute the same contrastive loss (CLIP's and SigLIP's) and gradients as one process
on the global batch."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from conftest import compose_config
from dalle_lightning.models.tokenizer import train_bpe
from dalle_lightning.stages.clip import ClipModule

CAPTIONS = [
    "a red circle",
    "two blue squares",
    "a green star above a red cross",
    "a red circle",
    "three yellow triangles",
    "a cyan cross",
    "a magenta square left of a blue star",
    "one red circle",
]


class Halves(Dataset):
    """Item r is the r-th half of the global batch (the distributed sampler hands item r to rank r)."""

    def __init__(self, batch):
        self.halves = [{k: v[i * 4 : (i + 1) * 4] for k, v in batch.items()} for i in range(2)]

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return self.halves[index]


class Record(L.Callback):
    def __init__(self, out: str):
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # After backward, so DDP has averaged the gradients across ranks.
        grads = {
            n: p.grad.flatten()[:64].tolist()
            for n, p in pl_module.named_parameters()
            if n.endswith(("visual_projection.weight", "text_projection.weight", "logit_scale", "loss.bias"))
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"loss": trainer.callback_metrics["train/loss"].item(), "grads": grads})
        )


def make(tmp_path, loss):
    cfg = OmegaConf.to_container(compose_config(["scheduler=constant", "optim.lr=0"], tmp_path), resolve=True)
    tokenizer = train_bpe(CAPTIONS * 4, vocab_size=300, context_length=24)
    torch.manual_seed(0)
    module = ClipModule(cfg["model"]["clip"], cfg["optim"], None, tokenizer, loss=loss)
    torch.manual_seed(1)
    tokens = tokenizer(CAPTIONS, padding="max_length", max_length=24, return_tensors="pt")
    batch = {
        "image": torch.rand(8, 3, 32, 32) * 2 - 1,
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
    }
    return module, batch


@pytest.mark.parametrize("loss_name", ["infonce", "sigmoid"])
def test_two_process_ddp_matches_one_process(tmp_path, loss_name):
    module, batch = make(tmp_path, loss_name)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record(str(tmp_path))],
        use_distributed_sampler=True,
    )
    loader = torch.utils.data.DataLoader(Halves(batch), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    single, _ = make(tmp_path, loss_name)
    loss, _, _ = single._loss(batch, gather=None)
    loss.backward()
    ddp_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2  # each rank: its rows against all columns
    assert abs(ddp_loss - loss.item()) < 1e-5, (ddp_loss, loss.item())
    assert ranks[0]["loss"] != ranks[1]["loss"]  # the ranks really held different halves
    assert len(ranks[0]["grads"]) == (4 if loss_name == "sigmoid" else 3)  # projections, logit scale (and bias)
    for name, param in single.named_parameters():
        if name in ranks[0]["grads"]:
            expected = param.grad.flatten()[:64]
            for rank in ranks:
                assert torch.allclose(torch.tensor(rank["grads"][name]), expected, atol=1e-6), name
