"""Stage exports → folders diffusers runs: a Karlo-structured stack in `UnCLIPPipeline`'s layout, any prior in
`KandinskyV22PriorPipeline`'s. A module of its own, beside `export.py` (which writes and reads our exports):
this one only reads them, builds diffusers' and transformers' own classes around their weights and saves those
with `save_pretrained`, so the folder is exactly what diffusers writes, plus the one fix below.

    python export.py format=diffusers exports.prior=export/prior exports.decoder=export/decoder \\
        exports.upsampler=export/upsampler out=karlo-finetuned
    UnCLIPPipeline.from_pretrained("karlo-finetuned")  # diffusers

diffusers ≥ 0.38 keeps UnCLIP under `pipelines/deprecated/unclip/`, and `UnCLIPPipeline.save_pretrained` records
`text_proj` as `["diffusers", "UnCLIPTextProjModel"]`, a class diffusers' top level lacks: `from_pretrained` of
such a folder fails ("diffusers has no class UnCLIPTextProjModel"), even with `text_proj=` passed. The entry is
written as diffusers loads it: `["unclip", ...]` where diffusers has that pipeline module, else the class's module
path, which diffusers resolves from the modules already imported (importing `UnCLIPPipeline` imports it).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dalle_lightning.errors import UserError
from dalle_lightning.export import check_exports
from dalle_lightning.loading import load_stage_export
from dalle_lightning.models.clip import FrozenClip, load_frozen_clip

log = logging.getLogger(__name__)

FORMATS = ("diffusers",)
# The prior schedulers' x0 clipping, in the normalised space, as the published folders set it.
KARLO_PRIOR_CLIP_RANGE = 5.0
KANDINSKY_PRIOR_CLIP_RANGE = 10.0


def unclip_scheduler(noise: Any, prediction_type: str, variance_type: str, clip_sample_range: float = 1.0):
    """An `UnCLIPScheduler` over a stage's training schedule (UnCLIP only knows squaredcos_cap_v2)."""
    from diffusers import UnCLIPScheduler

    if noise.config.beta_schedule != "squaredcos_cap_v2":
        raise UserError(
            f"a stage trained with beta_schedule={noise.config.beta_schedule}: diffusers' UnCLIPScheduler only "
            "runs squaredcos_cap_v2; train with that schedule to export to diffusers"
        )
    return UnCLIPScheduler(
        num_train_timesteps=noise.config.num_train_timesteps,
        prediction_type=prediction_type,
        variance_type=variance_type,
        clip_sample_range=clip_sample_range,
    )


def check_prior(prior: Any, option: str) -> str | None:
    """Why diffusers' prior pipelines cannot run this prior as it was trained (None: they can)."""
    if not prior.text_tokens:
        return f"{option} reads the text embedding alone; diffusers' prior pipelines also feed it the caption's tokens"
    if prior.normalize_embeddings:
        return (
            f"{option} was trained on L2-normalised embeddings; diffusers' prior pipelines feed CLIP's embeddings as "
            "it projects them (train with model.prior.normalize_embeddings=false, as model/prior=karlo)"
        )
    return None


def write_unclip(out: Path, clip: FrozenClip, prior: Any, decoder: Any, upsampler: Any) -> None:
    """`UnCLIPPipeline`'s layout from a prior, a Karlo-structured decoder and a Karlo-structured upsampler."""
    from diffusers import UnCLIPPipeline
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    from dalle_lightning.stages.decoder import KarloDecoderModule
    from dalle_lightning.stages.upsampler import KarloUpsamplerModule

    if not isinstance(decoder, KarloDecoderModule):
        raise UserError(
            "exports.decoder is not Karlo-structured: the UnCLIPPipeline layout runs Karlo's decoder (train it with "
            "model/decoder=karlo), or export the prior alone (exports.decoder=null) for KandinskyV22PriorPipeline"
        )
    if not isinstance(upsampler, KarloUpsamplerModule):
        raise UserError(
            "exports.upsampler is missing or not Karlo-structured: UnCLIPPipeline always runs Karlo's "
            "super-resolution UNet (train it with model/upsampler=karlo)"
        )
    if upsampler.low_res_size != decoder.image_size:
        raise UserError(
            f"exports.upsampler takes {upsampler.low_res_size} px inputs but exports.decoder makes "
            f"{decoder.image_size} px images: use an upsampler trained for the decoder's size"
        )
    if reason := check_prior(prior, "exports.prior"):
        raise UserError(f"{reason}: the UnCLIPPipeline layout cannot hold it")
    text_proj = UnCLIPTextProjModel(**{k: v for k, v in decoder.text_proj.config.items() if not k.startswith("_")})
    text_proj.load_state_dict(decoder.text_proj.state_dict())
    pipe = UnCLIPPipeline(
        prior=prior.prior,
        decoder=decoder.unet,
        text_encoder=clip.text_encoder,
        tokenizer=clip.tokenizer,
        text_proj=text_proj.eval(),
        super_res_first=upsampler.unet,
        super_res_last=upsampler.unet,
        prior_scheduler=unclip_scheduler(
            prior.noise, prior.noise.config.prediction_type, "fixed_small_log", KARLO_PRIOR_CLIP_RANGE
        ),
        decoder_scheduler=unclip_scheduler(decoder.noise, "epsilon", "learned_range"),
        super_res_scheduler=unclip_scheduler(upsampler.noise, "epsilon", "fixed_small_log"),
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["text_proj"] = [text_proj_library(), "UnCLIPTextProjModel"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def text_proj_library() -> str:
    """Where diffusers' `from_pretrained` finds `UnCLIPTextProjModel` (see the module's docstring)."""
    from diffusers import UnCLIPPipeline, pipelines

    if hasattr(pipelines, "unclip"):
        return "unclip"
    return sys.modules[UnCLIPPipeline.__module__].UnCLIPTextProjModel.__module__


def write_kandinsky_prior(out: Path, clip: FrozenClip, prior: Any) -> bool:
    """`KandinskyV22PriorPipeline`'s layout for a prior diffusers' pipelines can run as it was trained (True); for
    any other, the `PriorTransformer` and its scheduler alone, which `PriorTransformer.from_pretrained` loads."""
    from diffusers import KandinskyV22PriorPipeline
    from transformers import CLIPImageProcessor

    scheduler = unclip_scheduler(
        prior.noise, prior.noise.config.prediction_type, "fixed_small_log", KANDINSKY_PRIOR_CLIP_RANGE
    )
    if reason := check_prior(prior, "exports.prior"):
        log.warning("%s: writing the PriorTransformer alone (prior/, scheduler/)", reason)
        prior.prior.save_pretrained(str(out / "prior"), safe_serialization=True)
        scheduler.save_pretrained(str(out / "scheduler"))
        return False
    if clip.image_encoder is None:
        raise UserError(
            f"exports.clip='{clip.source}' has no image tower (no image_encoder/): KandinskyV22PriorPipeline's layout "
            "holds one; give the whole CLIP the prior was trained with"
        )
    size, preprocess = clip.image_size, clip.preprocess
    processor = CLIPImageProcessor(
        size={"shortest_edge": preprocess.shortest_edge or size},
        crop_size={"height": size, "width": size},
        image_mean=list(preprocess.mean),
        image_std=list(preprocess.std),
    )
    pipe = KandinskyV22PriorPipeline(
        prior=prior.prior,
        image_encoder=clip.image_encoder,
        text_encoder=clip.text_encoder,
        tokenizer=clip.tokenizer,
        scheduler=scheduler,
        image_processor=processor,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return True


def export_diffusers(
    out: str | Path,
    clip: str | Path,
    prior: str | Path,
    decoder: str | Path | None = None,
    upsampler: str | Path | None = None,
) -> str:
    """Write `out` from our exports: `UnCLIPPipeline`'s layout for prior + Karlo-structured decoder and upsampler,
    else (no decoder) `KandinskyV22PriorPipeline`'s for the prior. Returns the layout written. `out` must not
    exist (or be empty): nothing there is replaced."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out='{out}' exists and is not empty: give a new folder for the diffusers export")
    if upsampler is not None and decoder is None:
        raise UserError("exports.upsampler without exports.decoder: the UnCLIPPipeline layout needs both")
    check_exports({"clip": clip, "prior": prior, "decoder": decoder, "upsampler": upsampler}, "exports.")
    frozen = load_frozen_clip(clip, "exports.clip", text=True, image=None)  # one copy, shared by the stages
    stages: Mapping[str, Any] = {
        name: load_stage_export(path, name, clip=frozen, option=f"exports.{name}")
        for name, path in (("prior", prior), ("decoder", decoder), ("upsampler", upsampler))
        if path is not None
    }
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with torch.no_grad():
            if decoder is not None:
                write_unclip(tmp, frozen, stages["prior"], stages["decoder"], stages.get("upsampler"))
                layout = "UnCLIPPipeline"
            else:
                full = write_kandinsky_prior(tmp, frozen, stages["prior"])
                layout = "KandinskyV22PriorPipeline" if full else "PriorTransformer"
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return layout
