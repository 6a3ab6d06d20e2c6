"""Exports are data: a manifest that names callables (Hydra `_target_` nodes, blocklisted by Hydra or not) or a
pickle to load is refused with one line by every reader (sample.py, evaluate.py, UnCLIPPipeline.from_exports),
and nothing it names runs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from conftest import Detonator, lines_starting, run_script
from dalle_lightning.errors import UserError
from dalle_lightning.export import MANIFEST
from dalle_lightning.loading import load_stage_export
from dalle_lightning.pipeline import UnCLIPPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_load(folder: Path) -> dict:
    """A node that, instantiated, unpickles the payload in the export folder: numpy.load is not on Hydra's
    blocklist."""
    return {"_target_": "numpy.load", "file": str(folder / "payload.pkl"), "allow_pickle": True}


def os_system(marker: Path) -> dict:
    """A node naming a callable on Hydra's blocklist."""
    return {"_target_": "os.system", "_args_": [f"touch {marker}"]}


# How a manifest's training config (config.stage.module) is tampered with: each would run code under
# hydra.utils.instantiate (the nested ones once `_recursive_` is switched on).
TAMPERINGS = {
    "nested numpy.load in the model": lambda m, folder, marker: m.update(
        _recursive_=True, model={**m["model"], "unet": numpy_load(folder)}
    ),
    "numpy.load as the stage's class": lambda m, folder, marker: m.update(numpy_load(folder)),
    "nested os.system in the optimizer": lambda m, folder, marker: m.update(
        _recursive_=True, optim={**m["optim"], "lr": os_system(marker)}
    ),
    "an argument of os.system's": lambda m, folder, marker: m.update(_recursive_=True, hook=os_system(marker)),
    "pickled Inception weights": lambda m, folder, marker: m.update(
        metrics={**m["metrics"], "inception_weights": str(folder / "payload.pkl")}
    ),
}


def hostile_copy(export: Path, tmp_path: Path, tampering: str) -> tuple[Path, Path]:
    """A copy of a decoder export whose manifest is tampered with, with a pickle payload beside it; returns
    (folder, the marker file the payload or command would write)."""
    folder = tmp_path / "hostile_decoder"
    shutil.copytree(export, folder)
    marker = tmp_path / "pwned"
    (folder / "payload.pkl").write_bytes(pickle.dumps(Detonator(str(marker))))
    info = json.loads((folder / MANIFEST).read_text())
    TAMPERINGS[tampering](info["config"]["stage"]["module"], folder, marker)
    (folder / MANIFEST).write_text(json.dumps(info))
    return folder, marker


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_from_exports_refuses_a_manifest_that_names_code(tiny_exports, tmp_path, tampering):
    folder, marker = hostile_copy(tiny_exports["decoder"], tmp_path, tampering)
    try:
        UnCLIPPipeline.from_exports(**dict(tiny_exports, decoder=folder), device="cpu")
        error = None
    except Exception as err:  # anything but our one-line refusal fails below, after the marker is checked
        error = err
    assert not marker.exists()
    assert isinstance(error, UserError), repr(error)
    message = str(error)
    print(f"{tampering}: error: {message}")
    assert "\n" not in message and str(folder) in message


@pytest.mark.parametrize("tampering", ["nested numpy.load in the model", "nested os.system in the optimizer"])
@pytest.mark.parametrize("script", ["sample.py", "evaluate.py"])
def test_scripts_refuse_a_manifest_that_names_code(tiny_exports, tmp_path, script, tampering):
    folder, marker = hostile_copy(tiny_exports["decoder"], tmp_path, tampering)
    exports = [f"exports.{stage}={path}" for stage, path in dict(tiny_exports, decoder=folder).items()]
    args = ["prompts=[a red circle]"] if script == "sample.py" else ["num_samples=2"]
    result = run_script(script, [*args, *exports, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert not marker.exists()
    assert result.returncode == 2, result.stderr[-3000:]
    errors = lines_starting(result.stderr)
    print(errors)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith(f"error: exports.decoder='{folder}' cannot be loaded: config.stage.module."), errors


def test_exports_of_todays_manifests_still_load(tiny_exports):
    """The manifest train.py writes (the whole resolved config, with the class and the optimizer named as
    Hydra targets) rebuilds each stage as data."""
    for stage in ("prior", "decoder", "upsampler"):
        info = json.loads((tiny_exports[stage] / MANIFEST).read_text())
        assert info["config"]["stage"]["module"]["_target_"].endswith("Module")
        module = load_stage_export(tiny_exports[stage], stage, clip=tiny_exports["clip"])
        assert type(module).__name__ == info["config"]["stage"]["module"]["_target_"].rsplit(".", 1)[-1]
        assert not module.training


def test_inception_weights_are_loaded_as_tensors_only(tiny_clip_export, tmp_path):
    """A pickle under the name of torch-fidelity's weights is refused with one line before any Inception is
    built (torch-fidelity itself would unpickle it); a file of tensors passes."""
    import torch

    from dalle_lightning.metrics.image import frechet_distance, inception_state_dict
    from dalle_lightning.models.clip import load_frozen_clip

    marker = tmp_path / "pwned"
    hostile = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "hook": Detonator(str(marker))}, hostile)
    clip = load_frozen_clip(tiny_clip_export)
    with pytest.raises(UserError) as err:
        frechet_distance(clip, hostile)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"inception_weights='{hostile}' holds pickled objects"), message

    tensors = tmp_path / "tensors.pth"
    torch.save({"fc.weight": torch.ones(2, 2)}, tensors)
    assert torch.equal(inception_state_dict(tensors)["fc.weight"], torch.ones(2, 2))
