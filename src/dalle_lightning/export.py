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
from dataclasses import dataclass
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


def write_export(
    path: str | Path,
    stage: str,
    save: Callable[[Path], None],
    config: Any = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Call `save(tmp_dir)`, add the manifest (with `info`, what the stage says of itself, e.g. its embedding
    convention), then atomically replace `path` with the result (an earlier export, or nothing: see
    `check_export_target`)."""
    path = Path(path)
    check_export_target(path, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Folders of this process's own: two runs exporting the same stage at once must not delete each other's.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    old = tmp.with_suffix(".old")
    tmp.mkdir()
    try:
        save(tmp)
        manifest = {"stage": stage, "version": __version__, **(info or {}), "config": config}
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
        if path is None:
            continue
        if stage == "clip":  # any CLIP, not only our export
            locate_clip(path, f"{option_prefix}clip")
        else:
            read_manifest(path, stage, f"{option_prefix}{stage}")


# --- Where a frozen CLIP lives ---------------------------------------------------------------------------------

# A transformers tokenizer folder holds one of these.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_CLIP_TYPES = {"clip": "CLIPModel", "clip_text_model": "CLIPTextModel", "clip_vision_model": "CLIPVisionModel"}


@dataclass(frozen=True)
class ClipLocation:
    """Where the parts of a CLIP are on disk (what `locate_clip` found). `weights` is the folder of a whole
    `CLIPModel` checkpoint (our CLIP export, or `CLIPModel.save_pretrained`); otherwise the towers are separate
    `CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection` folders (`text_dir`, `image_dir`: the layout
    Karlo and Kandinsky 2.2 ship). `image_dir` is None for a text-only CLIP, `processor_dir` when no image
    processor config was saved (the defaults of OpenAI's CLIP apply)."""

    source: str  # as given: a folder or a hub name
    folder: Path
    weights: Path | None
    text_dir: Path | None
    image_dir: Path | None
    tokenizer_dir: Path
    processor_dir: Path | None
    option: str

    @property
    def has_image_tower(self) -> bool:
        return self.weights is not None or self.image_dir is not None


def _config_type(folder: Path) -> str | None:
    try:
        value = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return value.get("model_type") if isinstance(value, dict) else None


def _hub_snapshot(name: str, option: str) -> Path:
    """The local cache's copy of hub model `name`; nothing is downloaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError) as err:
        raise UserError(
            f"{option}='{name}' is not a folder, nor a model in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and nothing is downloaded here: download it where there is network "
            f"(huggingface-cli download {name}), or point {option} at a folder saved with save_pretrained"
        ) from err


def locate_clip(source: str | Path, option: str = "stage.clip") -> ClipLocation:
    """Find the CLIP `source` names, reading only small JSON files (so the scripts check it before importing torch):
    one of our CLIP exports, a folder saved with `CLIPModel.save_pretrained` (tokenizer beside the weights or in
    `tokenizer/`), a folder with `text_encoder/` (+ optional `image_encoder/`) and `tokenizer/` subfolders, or a hub
    name already in the local Hugging Face cache. Anything else is a one-line error naming `option`."""
    text = str(source)
    folder = Path(text).expanduser()
    if not folder.exists():
        looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)
        if looks_like_path or not text:
            raise UserError(
                f"{option}='{text}' does not exist: train the CLIP stage first (train.py stage=clip), or point "
                f"{option} at a transformers CLIP folder or a hub name in the local Hugging Face cache"
            )
        folder = _hub_snapshot(text, option)
    if not folder.is_dir():
        raise UserError(f"{option}='{text}' is a file, not a CLIP folder")
    if (folder / MANIFEST).is_file():
        read_manifest(folder, "clip", option)  # a CLIP export, or a one-line error naming the stage it is
    candidates = (folder, folder / "image_processor", folder / "feature_extractor")
    processor = next((d for d in candidates if (d / "preprocessor_config.json").is_file()), None)
    kind = _config_type(folder)
    if kind == "clip":
        tokenizer = folder if any((folder / f).is_file() for f in _TOKENIZER_FILES) else folder / "tokenizer"
        location = ClipLocation(text, folder, folder, None, None, tokenizer, processor, option)
    elif (folder / "text_encoder").is_dir():
        image = folder / "image_encoder"
        for part in (folder / "text_encoder", image):
            if part.is_dir() and _config_type(part) not in ("clip_text_model", "clip_vision_model"):
                raise UserError(
                    f"{option}='{text}': {part.name}/ does not hold a CLIP tower (its config.json's model_type is "
                    f"{_config_type(part)!r}): give CLIPTextModelWithProjection / CLIPVisionModelWithProjection folders"
                )
        towers = (folder / "text_encoder", image if image.is_dir() else None)
        location = ClipLocation(text, folder, None, *towers, folder / "tokenizer", processor, option)
    else:
        found = f"a {_CLIP_TYPES.get(kind, kind)} config" if kind else "no config.json and no text_encoder/"
        raise UserError(
            f"{option}='{text}' is not a CLIP folder ({found}): give a folder saved with CLIPModel.save_pretrained, "
            "or one with text_encoder/ (+ image_encoder/) and tokenizer/ subfolders"
        )
    if not any((location.tokenizer_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(
            f"{option}='{text}' has no tokenizer (none beside the weights, no tokenizer/): save the CLIP's tokenizer "
            "there with save_pretrained"
        )
    return location


def tokenizer_of_clip(datamodule: object, clip: str | Path, option: str = "stage.clip"):
    """The tokenizer of the frozen CLIP, its length limited to the text tower's positions: the stages after CLIP
    caption with it. (A stage's tokenizer factory is called with the datamodule; this one needs nothing from it.)"""
    from dalle_lightning.models.tokenizer import load_tokenizer

    location = locate_clip(clip, option)
    tokenizer = load_tokenizer(location.tokenizer_dir)
    config = json.loads(((location.weights or location.text_dir) / "config.json").read_text())
    positions = (config.get("text_config") or {}) if location.weights else config
    tokenizer.model_max_length = min(tokenizer.model_max_length, int(positions.get("max_position_embeddings", 77)))
    return tokenizer
