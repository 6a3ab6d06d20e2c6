"""The notebooks run top to bottom (on an export and data the test makes)."""

from __future__ import annotations

import copy
import json
import os

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
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


def test_quickstart_notebook_runs(tmp_path, tiny_exports, monkeypatch):
    export_dir = tmp_path / "export"  # the demo's layout: export/<stage>
    export_dir.mkdir()
    for stage, path in tiny_exports.items():
        (export_dir / stage).symlink_to(path, target_is_directory=True)
    monkeypatch.setenv("DL_EXPORT_DIR", str(export_dir))
    monkeypatch.setenv("DL_REPORT", str(tmp_path / "no_report.json"))  # so the benchmark runs in the notebook
    monkeypatch.setenv("DL_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: one thread is faster on a busy machine
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.get("outputs") for cell in code)  # committed without outputs
    benchmark = copy.deepcopy(code[-1])
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
        outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
        text = "".join(o.get("text", "") for o in outputs)
        assert "64 px images on cpu" in text
        assert "held-out  a red circle" in text and "seen      a yellow triangle" in text
        assert "computed on 6 prompts" in text and "held-out single objects, colour and shape right:" in text
        # The generated grid, the variations, the interpolation strip and the benchmark plot.
        assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4

        # With the demo's report.json, the benchmark cell plots its chain.compositional instead (same kernel).
        scores = {"colour": 0.95, "shape": 0.9, "count": 0.6, "relation": 0.4, "all": 0.35}
        chain = {  # the layout demo.evaluate_chain writes
            "single_heldout_colour_shape": 0.85,
            "compositional": {"seen": scores | {"prompts": 80}, "heldout": scores | {"relation": None, "prompts": 80}},
        }
        report = tmp_path / "report.json"
        report.write_text(json.dumps({"chain": chain}))
        again = [nbformat.v4.new_code_cell(f"REPORT = Path({str(report)!r})"), benchmark]
        notebook.cells += again
        for index, cell in enumerate(again, start=len(notebook.cells) - 2):
            client.execute_cell(cell, index)
    text = "".join(o.get("text", "") for o in benchmark.outputs)
    assert f"figures from {report}" in text
    assert "held-out single objects, colour and shape right: 85%" in text
    assert any("image/png" in o.get("data", {}) for o in benchmark.outputs)


def test_quickstart_notebook_says_to_run_the_demo(tmp_path, monkeypatch):
    """Without exports the first code cell stops with what to do, before anything slow."""
    monkeypatch.setenv("DL_EXPORT_DIR", str(tmp_path / "nothing_here"))
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    first = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code")
    notebook.cells = notebook.cells[: first + 1]
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    with pytest.raises(CellExecutionError, match="run `make demo` first"):
        client.execute()
