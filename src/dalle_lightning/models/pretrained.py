"""Published diffusers folders read as data: the component folder a stage loads, weights from safetensors only, the
component's class checked by name before anything is built. A class named in a folder (`model_index.json`,
`_class_name`) is never instantiated: the caller maps each component it expects to its own fixed class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from dalle_lightning.errors import UserError

# Weights that unpickle on loading: refused, whatever the folder's config says.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")

Loadable = TypeVar("Loadable")


def component_folder(path: str | Path, component: str, class_name: str, option: str, layout: str) -> Path:
    """The folder of `component` (`path/<component>/`, as a pipeline folder holds it; for `prior`, `path` itself may
    be a `PriorTransformer` folder) with a `config.json` naming `class_name` and safetensors weights. Anything else
    is a one-line error naming `option` and the expected `layout`."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{option}='{path}' is not a folder: expected {layout}")
    candidates = [root / component, root] if component == "prior" else [root / component]
    folder = next((c for c in candidates if (c / "config.json").is_file()), None)
    if folder is None:
        raise UserError(f"{option}='{path}' has no {component}/config.json: expected {layout}")
    found = read_config(folder, option).get("_class_name")
    if found != class_name:
        raise UserError(f"{option}='{path}': {folder.name}/ holds a {found}, not a {class_name}: expected {layout}")
    check_safetensors(folder, option)
    return folder


def read_config(folder: Path, option: str) -> dict[str, Any]:
    """A component's `config.json` as plain data."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{option}: {folder / 'config.json'} is not readable JSON ({err})") from err
    if not isinstance(config, dict):
        raise UserError(f"{option}: {folder / 'config.json'} is not a JSON object")
    return config


def check_safetensors(folder: Path, option: str) -> None:
    """Refuse a folder whose weights exist only in a format that unpickles (and so can run code) when loaded."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{option}: {folder} holds its weights only as {pickles[0]}, a pickle that can run code when loaded: "
            "convert it to safetensors where you trust it (from_pretrained, then save_pretrained(..., "
            "safe_serialization=True)) and point here again"
        )
    raise UserError(f"{option}: {folder} holds no weights (no *.safetensors file)")


def load_component(cls: type[Loadable], folder: Path, option: str) -> Loadable:
    """`cls.from_pretrained(folder)` from safetensors only, its failures as one line."""
    try:
        return cls.from_pretrained(str(folder), use_safetensors=True)  # type: ignore[attr-defined]
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        raise UserError(f"{option}: cannot load {folder} ({str(err).splitlines()[0]})") from err
