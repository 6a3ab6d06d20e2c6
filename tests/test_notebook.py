"""The notebooks run top to bottom (on an export and data the test makes)."""

from __future__ import annotations

import os

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from omegaconf import OmegaConf

from conftest import ROOT, compose_config, small_shapes
from dalle_lightning.export import write_export
from dalle_lightning.models.tokenizer import train_bpe
from dalle_lightning.stages.clip import ClipModule

pytestmark = pytest.mark.slow


def test_clip_retrieval_notebook_runs(tmp_path, shapes_root, monkeypatch):
    cfg = OmegaConf.to_container(compose_config(["scheduler=constant"], tmp_path), resolve=True)
    dm = small_shapes(shapes_root, image_size=32)
    tokenizer = train_bpe(dm.captions(1200), vocab_size=400, context_length=24)
    torch.manual_seed(0)
    module = ClipModule(cfg["model"]["clip"], cfg["optim"], None, tokenizer)
    export = write_export(tmp_path / "clip", "clip", module.export)
    monkeypatch.setenv("DL_CLIP_EXPORT", str(export))
    monkeypatch.setenv("DL_SHAPES", str(shapes_root))
    notebook = nbformat.read(ROOT / "notebooks" / "clip_retrieval.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("validation images" in o.get("text", "") for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the retrieval figure was drawn
    assert os.environ["DL_CLIP_EXPORT"] == str(export)
