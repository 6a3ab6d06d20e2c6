"""A trained stage (prior, decoder, upsampler) loaded back from its export, as data: our own class for the stage's
name, built with the plain values its manifest recorded, weights from safetensors. What the pipeline, the diffusers
export and the research probes rebuild stages with; it sits above the stages, which only write exports."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_model

from dalle_lightning.errors import UserError
from dalle_lightning.export import read_manifest
from dalle_lightning.stages.decoder import DecoderModule, KarloDecoderModule
from dalle_lightning.stages.prior import PriorModule
from dalle_lightning.stages.upsampler import KarloUpsamplerModule, UpsamplerModule

# Hydra's flags in the training config a manifest records: inert here, nothing is instantiated.
_HYDRA_FLAGS = ("_recursive_", "_convert_", "_partial_")
# Read by training only (the optimizer and its schedule): never used to rebuild a stage, so not read.
_TRAINING_ONLY = ("optim", "scheduler")


# The classes an export may be rebuilt with, by stage name (the first is the default): ours only, chosen by the
# name a manifest records, never imported from it.
STAGE_CLASSES: dict[str, tuple[type, ...]] = {
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
    values of `config.stage.module` that the class takes (model, clip, embeddings, metrics), each checked to
    be plain JSON with no Hydra keys. A `_target_` there may only name one of the stage's own classes; anything
    else (another callable, nested objects, keys the class does not take) is refused with `refuse(problem)`."""
    config = info.get("config")
    stage_config = config.get("stage") if isinstance(config, dict) else None
    module_config = stage_config.get("module") if isinstance(stage_config, dict) else None
    if not isinstance(module_config, dict) or not module_config:
        raise refuse("it holds no training config (config.stage.module)")
    classes = {cls.__name__: cls for cls in STAGE_CLASSES[stage]}
    target = module_config.get("_target_", STAGE_CLASSES[stage][0].__name__)
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
        if key == "clip_export":  # exports written before the CLIP could be any transformers CLIP
            key = "clip"
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


def load_stage_export(path: str | Path, stage: str, clip: Any = None, option: str | None = None):
    """A trained stage module (prior, decoder, upsampler) rebuilt from its export, in eval mode.

    The module is our own class for `stage`, built with the values its manifest's training config recorded
    (`stage.module`: the model preset, the frozen CLIP, ...) read as plain data (`_stage_arguments`), so sampling
    uses exactly the settings it was trained with; nothing named in the file is imported or called. Then the
    exported weights are loaded from safetensors (`module.export_weights`: submodule → file). `clip` replaces the
    frozen CLIP the stage was trained on (e.g. when the folders were moved; see `locate_clip` for what it may be),
    or is a `FrozenClip` already loaded.
    """
    option = option or f"{stage} export"
    info = read_manifest(path, stage, option)

    def refuse(problem: str) -> UserError:
        return UserError(f"{option}='{path}' cannot be loaded: {problem}; export it again with train.py stage={stage}")

    cls, arguments = _stage_arguments(info, stage, refuse)
    if clip is not None:
        arguments["clip"] = clip if not isinstance(clip, str | Path) else str(clip)
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
