"""`evaluate.py`: the whole stack scored end to end, from prompts to images.

Generates one image per prompt (the captions of the validation shards, or a prompt file) with the
`UnCLIPPipeline` of `conf/evaluate.yaml`, then measures:

- the Fréchet distance between generated and real images (`fid_inception` with Inception weights, else
  `fd_clip` in the CLIP's embedding space; the report names which), when real images exist;
- the CLIP score of the generated images with their prompts, and of the real images with theirs (the
  ceiling to read the first against), on the pipeline's CLIP or on `scorer_clip` (a fixed reference CLIP, so
  that stacks with different CLIPs can be compared: a better-trained CLIP is also a stricter judge);
- on Shapes prompts, compositional accuracy: the oracle of `shapes/oracle.py` reads the objects back
  and checks colour, shape, count and relation, seen vs held-out combinations.

Writes `report.json`, `grid.png` (prompt | generated | real) and `samples.json` (per-image scores) to the
run folder, and with `wandb=true` a wandb table of prompt / image / scores.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dalle_lightning.errors import UserError
from dalle_lightning.generation import build_pipeline, read_prompts, wandb_run
from dalle_lightning.metrics.image import clip_scores, frechet_distance
from dalle_lightning.models.clip import FrozenClip, load_frozen_clip
from dalle_lightning.pipeline import UnCLIPPipeline
from dalle_lightning.shapes.oracle import CompositionalAccuracy, judge, parse_prompt
from dalle_lightning.visualize import captioned_grid, to_pil

log = logging.getLogger(__name__)


def evaluation_set(cfg: DictConfig, pipe: UnCLIPPipeline) -> tuple[list[str], torch.Tensor | None]:
    """(prompts, real images in [-1, 1] at the pipeline's size, or None for a prompt file)."""
    if cfg.get("prompt_file"):
        prompts = read_prompts([], cfg.prompt_file)[: cfg.num_samples]
        if not prompts:
            raise UserError(f"prompt_file='{cfg.prompt_file}' holds no prompt")
        return prompts, None
    with open_dict(cfg):
        cfg.data.update(image_size=pipe.image_size, num_workers=0, val_samples=cfg.num_samples)
        if OmegaConf.is_missing(cfg.data, "train_shards"):  # only the validation split is read
            cfg.data.train_shards = None
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    if not datamodule.val_shards:
        raise UserError("no validation data: set data.val_shards=... (or prompt_file=... to score prompts alone)")
    prompts, images = [], []
    for batch in datamodule.val_dataloader():
        batch = datamodule.on_after_batch_transfer(batch, 0)
        prompts += list(batch["caption"])
        images.append(batch["image"])
        if len(prompts) >= cfg.num_samples:
            break
    return prompts[: cfg.num_samples], torch.cat(images)[: cfg.num_samples]


def chunks(tensor: torch.Tensor, size: int):
    return tensor.split(max(1, size))


def scoring_clip(cfg: DictConfig, pipe: UnCLIPPipeline) -> FrozenClip:
    """The CLIP that scores the images: the pipeline's own, or `scorer_clip` (any CLIP `load_frozen_clip` takes),
    so that stacks with different CLIPs are measured with the same ruler."""
    if not cfg.get("scorer_clip"):
        return pipe.clip
    return load_frozen_clip(cfg.scorer_clip, "scorer_clip", text=True, image=True).to(pipe.device)


def score_images(
    pipe: UnCLIPPipeline, prompts: list[str], generated: torch.Tensor, real: torch.Tensor | None, cfg: DictConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report's metrics and per-sample records."""
    report: dict[str, Any] = {"num_samples": len(prompts)}
    clip = scoring_clip(cfg, pipe)
    ids, mask = clip.tokenize(prompts)
    size = cfg.batch_size
    device = pipe.device

    def per_image_clip_score(images: torch.Tensor) -> torch.Tensor:
        parts = zip(chunks(images, size), chunks(ids, size), chunks(mask, size))
        return torch.cat([clip_scores(clip, x.to(device), i.to(device), m.to(device)).cpu() for x, i, m in parts])

    generated_scores = per_image_clip_score(generated)
    report["clip_score_generated"] = generated_scores.mean().item()
    if real is not None:
        real_scores = per_image_clip_score(real)
        report["clip_score_real"] = real_scores.mean().item()
        report["clip_score_ratio"] = report["clip_score_generated"] / max(report["clip_score_real"], 1e-8)
        name, distance = frechet_distance(clip, cfg.get("inception_weights"))
        distance = distance.to(device)
        for fake_part, real_part in zip(chunks(generated, size), chunks(real, size)):
            distance.update(real_part.to(device), real=True)
            distance.update(fake_part.to(device), real=False)
        report["fd_name"], report["fd"] = name, distance.compute().item()

    accuracy = CompositionalAccuracy()
    accuracy.update(generated, prompts)
    compositional = accuracy.compute()
    parsed = len(prompts) - compositional["unparsed"]
    report["compositional"] = compositional if parsed else None  # not Shapes prompts: nothing to judge

    records = []
    for i, prompt in enumerate(prompts):
        record: dict[str, Any] = {"prompt": prompt, "clip_score": generated_scores[i].item()}
        if real is not None:
            record["clip_score_real"] = real_scores[i].item()
        try:
            spec = parse_prompt(prompt)
            record.update(heldout=spec.heldout, kind=spec.kind, **judge(generated[i], spec))
        except ValueError:
            pass
        records.append(record)
    return report, records


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    pipe = build_pipeline(cfg)
    prompts, real = evaluation_set(cfg, pipe)
    start = time.perf_counter()
    out = pipe(prompts, 1, cfg.seed, cfg.batch_size)
    seconds = time.perf_counter() - start
    report, records = score_images(pipe, prompts, out.images, real, cfg)
    report.update(
        generate_s=seconds,
        images_per_s=len(prompts) / seconds,
        image_size=pipe.image_size,
        exports={k: str(v) for k, v in cfg.exports.items()},
        scorer_clip=str(cfg.scorer_clip) if cfg.get("scorer_clip") else str(cfg.exports.clip),
    )

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        (prompt + (" [held-out]" if records[i].get("heldout") else ""), [out.images[i]])
        for i, prompt in enumerate(prompts[: cfg.grid_rows])
    ]
    if real is not None:
        rows = [(caption, [*images, real[i]]) for i, (caption, images) in enumerate(rows)]
    captioned_grid(rows).save(output_dir / "grid.png")
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    (output_dir / "samples.json").write_text(json.dumps(records, indent=2))
    report["grid"] = str(output_dir / "grid.png")

    if cfg.get("wandb"):
        import wandb

        run = wandb_run(output_dir, "evaluate", cfg)
        columns = ["prompt", "image", "real", "clip_score", "heldout", "colour", "shape", "count", "relation", "all"]
        table = wandb.Table(columns=columns)
        for i, record in enumerate(records):
            real_image = wandb.Image(to_pil(real[i])) if real is not None else None
            table.add_data(
                record["prompt"],
                wandb.Image(to_pil(out.images[i])),
                real_image,
                *(record.get(k) for k in columns[3:]),
            )
        scalars = {f"eval/{k}": v for k, v in report.items() if isinstance(v, int | float)}
        run.log({**scalars, "eval/grid": wandb.Image(str(output_dir / "grid.png")), "eval/samples": table})
        run.summary["compositional"] = report["compositional"]
        report["wandb_run"] = str(Path(run.dir).parent)
        run.finish()
    print(json.dumps({k: v for k, v in report.items() if k != "compositional"}, indent=2))
    if report["compositional"]:
        print("compositional accuracy:", json.dumps(report["compositional"], indent=2))
    return report
