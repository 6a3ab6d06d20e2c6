"""`compile=...`: torch.compile of each stage's networks, in place, so that checkpoints and exports keep their keys.

Inductor's code generation takes minutes on 2 CPU cores, so these tests compile with backends that trace the
networks the same way (TorchDynamo) and run the captured graphs eagerly.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST_CLIP, first_batch, run_train, shapes_overrides
from dalle_lightning.errors import UserError
from dalle_lightning.loading import load_stage_export
from dalle_lightning.models.tokenizer import load_tokenizer
from dalle_lightning.train import compile_options
from test_clip import make_module as make_clip
from test_decoder import make_upsampler


class GraphRecorder:
    """A torch.compile backend that records each graph TorchDynamo captures and runs it eagerly."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs):
        self.graphs.append(graph)
        return graph.forward


def clip_step(tmp_path, tiny_clip_export, shapes_root):
    tokenizer = load_tokenizer(tiny_clip_export)
    module = make_clip(tmp_path, tokenizer)
    batch = first_batch(shapes_root, image_size=32, batch_size=8, tokenizer=tokenizer)
    return module, lambda: module._loss(dict(batch), gather=None)[0]


def upsampler_step(tmp_path, tiny_clip_export, shapes_root):
    module = make_upsampler(tmp_path, tiny_clip_export)
    batch = first_batch(shapes_root, image_size=64, batch_size=4)
    return module, lambda: module.training_step(dict(batch), 0)


@pytest.mark.parametrize("build", [clip_step, upsampler_step], ids=["clip", "upsampler"])
def test_compiled_step_runs_the_traced_networks_and_keeps_loss_and_keys(build, tmp_path, tiny_clip_export, shapes_root):
    module, step = build(tmp_path, tiny_clip_export, shapes_root)
    keys = list(module.state_dict())
    torch.manual_seed(0)
    eager = step()

    recorder = GraphRecorder()
    module.compile_networks(backend=recorder)
    torch.manual_seed(0)
    compiled = step()
    compiled.backward()

    # CLIP's two towers are called on their own (get_image_features / get_text_features), never through
    # CLIPModel.__call__: compiling the whole CLIPModel would trace nothing.
    assert len(recorder.graphs) >= len(module.compiled_networks) >= 1
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5), (compiled.item(), eager.item())
    assert list(module.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    assert all(p.grad is not None for p in module.get_submodule(module.compiled_networks[0]).parameters())


@pytest.mark.parametrize(
    "value,expected",
    [
        (False, None),
        (None, None),
        (True, {}),
        ("max-autotune", {"mode": "max-autotune"}),
        (OmegaConf.create({"mode": "default", "dynamic": False}), {"mode": "default", "dynamic": False}),
    ],
)
def test_compile_setting_becomes_torch_compile_arguments(value, expected):
    assert compile_options(value) == expected


def test_unknown_compile_value_is_a_one_line_error():
    with pytest.raises(UserError) as info:
        compile_options("fastest")
    assert "compile='fastest'" in str(info.value) and "max-autotune" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_train_py_with_compile_trains_checkpoints_and_exports_as_eager(tmp_path, shapes_root, tiny_clip_export):
    """The upsampler under `compile=...` (and `gradient_checkpointing=true`) through the real train.py: EMA
    weights (a deep copy of the compiled module), validation sampling, checkpoints and the export work, with the
    eager module's keys."""
    args = [
        "stage=upsampler",
        f"stage.clip={tiny_clip_export}",
        *FAST_CLIP,
        "trainer.max_steps=3",
        "data.batch_size=8",
        "data.samples_per_epoch=24",
        "data.val_samples=16",
        "stage.metrics.num_samples=8",
        "model.upsampler.sample_steps=2",
        *shapes_overrides(shapes_root),
        "logger=csv",
        "compile={backend:eager}",
        "gradient_checkpointing=true",
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.export_dir={tmp_path}/export",
        "run_name=run",
    ]
    result = run_train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.compile unet with {'backend': 'eager'}" in result.stdout + result.stderr
    assert "gradient checkpointing: unet" in result.stdout + result.stderr
    run = tmp_path / "outputs" / "upsampler" / "runs" / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["val/psnr"] < 100 and metrics["train/nonfinite_steps"] == 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("unet.") for k in checkpoint["state_dict"])
    assert not any("_orig_mod" in k for k in checkpoint["state_dict"])
    upsampler = load_stage_export(tmp_path / "export" / "upsampler", "upsampler", clip=tiny_clip_export)
    assert upsampler.generate(torch.zeros(1, 3, 32, 32), steps=2).shape == (1, 3, 64, 64)
