"""What the generating scripts (`sample.py`, `evaluate.py`) share: the pipeline built from a script config
(`exports`, per-stage sampling options, filters), prompts read from the config, and an offline wandb run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dalle_lightning.errors import UserError
from dalle_lightning.filters import ConceptFilter, PromptBlocklist
from dalle_lightning.pipeline import UnCLIPPipeline


def read_prompts(prompts: Sequence[str], prompt_file: str | None) -> list[str]:
    """The prompts given inline, then those of the file (one per line; blank and # lines skipped)."""
    result = [str(p) for p in prompts or []]
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise UserError(f"prompt_file='{prompt_file}' does not exist: give a text file with one prompt per line")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        result += [line for line in lines if line and not line.startswith("#")]
    return result


def build_pipeline(cfg: DictConfig) -> UnCLIPPipeline:
    """The pipeline for the config's exports, sampling settings and filters."""
    options = {f"{stage}_options": OmegaConf.to_container(cfg[stage]) for stage in ("prior", "decoder", "upsampler")}
    exports = cfg.exports
    if cfg.get("karlo"):  # sample.py karlo=<folder>: a diffusers UnCLIPPipeline folder's networks
        presets = {stage: OmegaConf.to_container(preset) for stage, preset in cfg.karlo_presets.items()}
        # Its own text_encoder/ + tokenizer/ are the CLIP its networks were trained with.
        pipe = UnCLIPPipeline.from_pretrained(
            cfg.karlo, presets, upsampler=exports.get("upsampler") is not None, device=cfg.get("device"), **options
        )
    else:
        pipe = UnCLIPPipeline.from_exports(
            clip=exports.clip,
            prior=exports.prior,
            decoder=exports.decoder,
            upsampler=exports.get("upsampler"),
            device=cfg.get("device"),
            option_prefix="exports.",
            **options,
        )
    filters = cfg.get("filters") or {}
    if filters.get("prompt_blocklist"):
        pipe.prompt_filter = PromptBlocklist(filters.prompt_blocklist)
    if filters.get("image_concepts"):
        pipe.image_filter = ConceptFilter(pipe.clip, list(filters.image_concepts), filters.get("image_threshold", 0.3))
    return pipe


def wandb_run(output_dir: Path, job_type: str, config: DictConfig):
    """An offline wandb run in the run folder (sync later with `wandb sync`)."""
    import wandb

    return wandb.init(
        project="dalle-lightning",
        job_type=job_type,
        dir=str(output_dir),
        mode="offline",
        config=OmegaConf.to_container(config, resolve=True),
    )
