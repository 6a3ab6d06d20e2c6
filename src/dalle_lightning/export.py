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
    try:
        info = json.loads(manifest.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{option}='{path}': {MANIFEST} is not valid JSON ({err}): export the stage again") from err
    if not isinstance(info, dict):
        raise UserError(f"{option}='{path}': {MANIFEST} is not a JSON object: export the stage again")
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


# Hydra's flags in the training config a manifest records: inert here, nothing is instantiated.
_HYDRA_FLAGS = ("_recursive_", "_convert_", "_partial_")
# Read by training only (the optimizer and its schedule): never used to rebuild a stage, so not read.
_TRAINING_ONLY = ("optim", "scheduler")


def _stage_classes() -> dict[str, tuple[type, ...]]:
    """The classes an export may be rebuilt with, by stage name (the first is the default): ours only, chosen by
    the name a manifest records, never imported from it."""
    from dalle_lightning.stages.decoder import DecoderModule, KarloDecoderModule
    from dalle_lightning.stages.prior import PriorModule
    from dalle_lightning.stages.upsampler import KarloUpsamplerModule, UpsamplerModule

    return {
        "prior": (PriorModule,),
        "decoder": (DecoderModule, KarloDecoderModule),
        "upsampler": (UpsamplerModule, KarloUpsamplerModule),
    }


def _check_plain(value: Any, where: str, refuse: Callable[[str], UserError]) -> None:
    """`value` (read from JSON) holds no Hydra keys (`_target_`, `_args_`, ...) at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key.startswith("_") and key.endswith("_"):
                raise refuse(f"{where}.{key}: a manifest holds plain values, not objects to build")
            _check_plain(item, f"{where}.{key}", refuse)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", refuse)


def _stage_arguments(
    info: Mapping[str, Any], stage: str, refuse: Callable[[str], UserError]
) -> tuple[type, dict[str, Any]]:
    """The class and the keyword arguments that rebuild a stage's module from its manifest, read as data: the
    values of `config.stage.module` that the class takes (model, clip_export, embeddings, metrics), each checked to
    be plain JSON with no Hydra keys. A `_target_` there may only name one of the stage's own classes; anything
    else (another callable, nested objects, keys the class does not take) is refused with `refuse(problem)`."""
    import inspect

    config = info.get("config")
    stage_config = config.get("stage") if isinstance(config, dict) else None
    module_config = stage_config.get("module") if isinstance(stage_config, dict) else None
    if not isinstance(module_config, dict) or not module_config:
        raise refuse("it holds no training config (config.stage.module)")
    classes = {cls.__name__: cls for cls in _stage_classes()[stage]}
    target = module_config.get("_target_", _stage_classes()[stage][0].__name__)
    # Manifests record the class the stage was trained with: its name is looked up among ours, never imported.
    cls = classes.get(target.rsplit(".", 1)[-1]) if isinstance(target, str) else None
    if cls is None:
        raise refuse(
            f"config.stage.module._target_ names {target!r}: a {stage} export is built with {' or '.join(classes)} only"
        )
    takes = set(inspect.signature(cls).parameters) - {"tokenizer", *_TRAINING_ONLY}
    arguments: dict[str, Any] = {}
    for key, value in module_config.items():
        where = f"config.stage.module.{key}"
        if key == "_target_" or key in _HYDRA_FLAGS:
            continue
        elif key in _TRAINING_ONLY:
            if value is not None and not isinstance(value, dict):
                raise refuse(f"{where} is not a mapping")
            # Its own `_target_` (the optimizer's name) is an inert string, never read; nothing below it may build.
            _check_plain({k: v for k, v in (value or {}).items() if k not in ("_target_", "_partial_")}, where, refuse)
        elif key in takes:
            _check_plain(value, where, refuse)
            arguments[key] = value
        else:
            raise refuse(f"{where} is not an argument of {cls.__name__}")
    if not isinstance(arguments.get("model"), dict):
        raise refuse("config.stage.module.model is missing or not a mapping")
    return cls, arguments


def load_stage_export(path: str | Path, stage: str, clip_export: str | Path | None = None, option: str | None = None):
    """A trained stage module (prior, decoder, upsampler) rebuilt from its export, in eval mode.

    The module is our own class for `stage`, built with the values its manifest's training config recorded
    (`stage.module`: the model preset, the CLIP export, ...) read as plain data (`_stage_arguments`), so sampling
    uses exactly the settings it was trained with; nothing named in the file is imported or called. Then the
    exported weights are loaded from safetensors (`module.export_weights`: submodule → file). `clip_export`
    replaces the CLIP export the stage was trained against (e.g. when exports were moved).
    """
    from safetensors.torch import load_model

    option = option or f"{stage} export"
    info = read_manifest(path, stage, option)

    def refuse(problem: str) -> UserError:
        return UserError(f"{option}='{path}' cannot be loaded: {problem}; export it again with train.py stage={stage}")

    cls, arguments = _stage_arguments(info, stage, refuse)
    if clip_export is not None:
        arguments["clip_export"] = str(clip_export)
    if arguments["model"].get("pretrained"):
        # A stage that started from published weights is built from its own export, which holds their layout (and
        # so their architecture): the folder it started from need not be there any more.
        arguments["model"] = {**arguments["model"], "pretrained": str(path)}
    try:
        # The optimizer is never built for sampling: an empty config stands in for it.
        module = cls(optim={}, tokenizer=None, **arguments)
    except (TypeError, ValueError, KeyError) as err:  # a preset this code cannot build (a value of the wrong kind)
        message = " ".join(str(err).split())[:200]
        raise refuse(f"its model config does not build ({type(err).__name__}: {message})") from err
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
