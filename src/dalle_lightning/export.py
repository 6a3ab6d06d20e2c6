"""Stage exports: the portable artifact a later stage or the pipeline loads (never a pickle).

`export/<stage>/` holds safetensors weights with their library's config (so transformers or diffusers load
them with `from_pretrained`), tokenizer files where the stage has one, and `dalle_lightning.json` naming
the stage and the resolved config that trained it. Written to a temporary folder and swapped in, so an
interrupted export never leaves a half-written one in place.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dalle_lightning import __version__
from dalle_lightning.errors import UserError

MANIFEST = "dalle_lightning.json"


def check_export_target(path: str | Path, stage: str) -> None:
    """Refuse a target that holds something other than an export: replacing it would delete that (say
    paths.export_dir pointed at the runs' folder, whose `<stage>/` holds the checkpoints)."""
    path = Path(path)
    if path.exists() and not (path / MANIFEST).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(
            f"the {stage} export would replace '{path}', which is not an export (no {MANIFEST}): "
            "set paths.export_dir to a folder of its own"
        )


def write_export(path: str | Path, stage: str, save: Callable[[Path], None], config: Any = None) -> Path:
    """Call `save(tmp_dir)`, add the manifest, then atomically replace `path` with the result (an earlier
    export, or nothing: see `check_export_target`)."""
    path = Path(path)
    check_export_target(path, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Folders of this process's own: two runs exporting the same stage at once must not delete each other's.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    old = tmp.with_suffix(".old")
    tmp.mkdir()
    try:
        save(tmp)
        manifest = {"stage": stage, "version": __version__, "config": config}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if path.exists():
            path.rename(old)
        try:
            tmp.rename(path)
        except OSError:
            if old.exists() and not path.exists():
                old.rename(path)  # the earlier export stays
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def _article(word: object) -> str:
    return "an" if str(word)[:1] in "aeiou" else "a"


def read_manifest(path: str | Path, stage: str, option: str) -> dict[str, Any]:
    """The manifest of an export, checked to be of `stage`; `option` is the config key that named it."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise UserError(
            f"{option}='{path}' is not {_article(stage)} {stage} export (no {MANIFEST}): "
            f"train with stage={stage} first, or point {option} at its export folder"
        )
    info = json.loads(manifest.read_text())
    if info.get("stage") != stage:
        found = info.get("stage")
        raise UserError(f"{option}='{path}' is {_article(found)} {found} export, not {_article(stage)} {stage} export")
    return info


def check_exports(exports: Mapping[str, str | Path | None], option_prefix: str = "") -> None:
    """Each export given (stage name → folder, None: not used) is one of its stage: found before anything is
    loaded (and, from sample.py and evaluate.py, before the ~10 s of imports); errors name `<option_prefix><stage>`."""
    for stage, path in exports.items():
        if path is not None:
            read_manifest(path, stage, f"{option_prefix}{stage}")


def load_stage_export(path: str | Path, stage: str, clip_export: str | Path | None = None, option: str | None = None):
    """A trained stage module (prior, decoder, upsampler) rebuilt from its export, in eval mode.

    The module is built as its manifest's training config says (`stage.module`), so sampling uses exactly
    the code and defaults it was trained with; then the exported weights are loaded from safetensors
    (`module.export_weights`: submodule → file). `clip_export` replaces the CLIP export the stage was
    trained against (e.g. when exports were moved).
    """
    from hydra.utils import instantiate
    from safetensors.torch import load_model

    option = option or f"{stage} export"
    info = read_manifest(path, stage, option)
    module_config = ((info.get("config") or {}).get("stage") or {}).get("module")
    if not module_config:
        raise UserError(f"{option}='{path}' holds no training config: export it again with train.py stage={stage}")
    overrides = {"clip_export": str(clip_export)} if clip_export is not None else {}
    model = module_config.get("model") or {}
    if model.get("pretrained"):
        # A stage that started from published weights is built from its own export, which holds their layout (and
        # so their architecture): the folder it started from need not be there any more.
        overrides["model"] = {**model, "pretrained": str(path)}
    module = instantiate(module_config, tokenizer=None, **overrides, _convert_="all")
    for name, file in module.export_weights.items():
        weights = Path(path) / file
        if not weights.is_file():
            raise UserError(f"{option}='{path}' lacks {file}: the export is incomplete, export the stage again")
        load_model(getattr(module, name), str(weights))
    return module.eval().requires_grad_(False)


def load_clip_export(path: str | Path, option: str = "stage.clip_export"):
    """(CLIPModel, tokenizer) from a CLIP export, in eval mode."""
    from transformers import CLIPModel

    from dalle_lightning.models.tokenizer import load_tokenizer

    read_manifest(path, "clip", option)
    model = CLIPModel.from_pretrained(str(path)).eval()
    return model, load_tokenizer(path)


def tokenizer_from_export(datamodule: object, clip_export: str | Path):
    """The tokenizer a CLIP export was trained with: the stages after CLIP caption with it. (A stage's tokenizer
    factory is called with the datamodule; this one needs nothing from it.)"""
    from dalle_lightning.models.tokenizer import load_tokenizer

    read_manifest(clip_export, "clip", "stage.clip_export")
    return load_tokenizer(clip_export)
