"""`sample.py`: images from the trained stack, in any of the pipeline's modes, saved as PNGs and a grid.

Builds an `UnCLIPPipeline` from the exports named in `conf/sample.yaml`, runs the chosen mode, writes
`<output_dir>/<index>.png` per image, `grid.png` with captions and `samples.json` (caption, file, filter
verdict per image), and with `wandb=true` logs the grid and a table to an offline wandb run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from dalle_lightning.errors import UserError
from dalle_lightning.generation import build_pipeline, read_prompts, wandb_run
from dalle_lightning.pipeline import PipelineOutput, UnCLIPPipeline, images_to_tensor, open_image

log = logging.getLogger(__name__)

MODES = ("text", "variations", "interpolate", "textdiff", "inpaint", "outpaint")


def inpaint_masks(mask: Any, count: int, size: int) -> torch.Tensor:
    """(count, 1, size, size) masks from a mask image file (white = regenerate) or a box [l, t, r, b] in
    fractions of the image."""
    if isinstance(mask, str):
        grey = open_image(mask, "mask").convert("L").resize((size, size), Image.NEAREST)
        single = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(1, size, size) > 127
    elif mask is not None and len(mask) == 4 and all(0 <= float(v) <= 1 for v in mask):
        left, top, right, bottom = (round(float(v) * size) for v in mask)
        if right <= left or bottom <= top:
            raise UserError(f"mask box {list(mask)} is empty: give [left, top, right, bottom] with left < right")
        single = torch.zeros(1, size, size, dtype=torch.bool)
        single[:, top:bottom, left:right] = True
    else:
        raise UserError("mode=inpaint needs mask=<mask image> or mask=[left, top, right, bottom] in fractions 0..1")
    return single.float()[None].expand(count, -1, -1, -1)


def edit_images(paths: list[str], size: int) -> tuple[torch.Tensor, int]:
    """The images to edit, at the pipeline's output size `size`, and the side they had (square images only:
    resizing any other would distort it)."""
    opened = [open_image(path, "image") for path in paths]
    sides = {image.size for image in opened}
    for path, image in zip(paths, opened):
        if image.width != image.height:
            raise UserError(f"image '{path}' is {image.width}x{image.height}: editing takes square images, crop it")
    if len(sides) > 1:
        raise UserError(f"the images have different sizes {sorted(sides)}: give images of one size")
    return images_to_tensor(opened, size), opened[0].width


def source_pixels(extend: Any, side: int, size: int) -> Any:
    """`extend` with its pixel counts (ints) counted on the source image (side `side`) turned into pixels at the
    pipeline's size `size`; fractions (floats) stay as they are."""

    def scale(value: Any) -> Any:
        return round(value * size / side) if isinstance(value, int) and not isinstance(value, bool) else value

    return [scale(v) for v in extend] if isinstance(extend, list | tuple) else scale(extend)


def run_mode(pipe: UnCLIPPipeline, cfg: DictConfig) -> PipelineOutput:
    """Run `cfg.mode` with the config's prompts and images."""
    mode = cfg.mode
    prompts = read_prompts(cfg.get("prompts"), cfg.get("prompt_file"))
    images = [str(p) for p in cfg.get("images") or []]

    def need(what: str, have: int, count: int) -> None:  # count 0: at least one
        if (have == 0) if count == 0 else (have != count):
            raise UserError(f"mode={mode} needs {count or 'at least one'} {what}, got {have}")

    if mode == "text":
        need("prompts (prompts=[...] or prompt_file=...)", len(prompts), 0)
        return pipe(prompts, cfg.num_images, cfg.seed, cfg.batch_size)
    if mode == "variations":
        need("images (images=[...])", len(images), 0)
        return pipe.variations(images, cfg.num_images, cfg.seed)
    if mode == "interpolate":
        ends = prompts + images
        need("ends, prompts or images", len(ends), 2)
        return pipe.interpolate(ends[0], ends[1], cfg.frames, cfg.seed)
    if mode == "textdiff":
        need("image (images=[...])", len(images), 1)
        if not cfg.get("source") or not cfg.get("target"):
            raise UserError("mode=textdiff needs source='<caption of the image>' and target='<caption to move to>'")
        return pipe.text_diff(images[0], cfg.source, cfg.target, list(cfg.amounts), cfg.seed)
    if mode in ("inpaint", "outpaint"):
        need("images (images=[...])", len(images), 0)
        if prompts and len(prompts) != len(images):
            raise UserError(f"mode={mode} takes one prompt per image or none: {len(prompts)} for {len(images)}")
        pixels, side = edit_images(images, pipe.image_size)
        if mode == "inpaint":
            masks = inpaint_masks(cfg.get("mask"), len(images), pipe.image_size)
            return pipe.inpaint(pixels, masks, prompts or None, cfg.seed)
        extend = cfg.get("extend")
        if extend is None:
            raise UserError("mode=outpaint needs extend=[left, top, right, bottom]: pixels (16) or fractions (0.5)")
        extend = OmegaConf.to_container(extend) if OmegaConf.is_config(extend) else extend
        return pipe.outpaint(pixels, source_pixels(extend, side, pipe.image_size), prompts or None, cfg.seed)
    raise UserError(f"mode='{mode}' is unknown: use one of {', '.join(MODES)}")


def save_output(out: PipelineOutput, output_dir: Path) -> list[dict[str, Any]]:
    """One PNG per image, grid.png and samples.json; the per-image records."""
    output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (image, caption) in enumerate(zip(out.pil(), out.captions)):
        image.save(output_dir / f"{i:04d}.png")
        withheld = out.filtered[i] if out.filtered else None
        records.append({"index": i, "caption": caption, "file": f"{i:04d}.png", "withheld_by": withheld})
    out.grid().save(output_dir / "grid.png")
    (output_dir / "samples.json").write_text(json.dumps(records, indent=2))
    return records


def sample(cfg: DictConfig) -> PipelineOutput:
    if cfg.mode not in MODES:
        raise UserError(f"mode='{cfg.mode}' is unknown: use one of {', '.join(MODES)}")
    pipe = build_pipeline(cfg)
    out = run_mode(pipe, cfg)
    output_dir = Path(cfg.output_dir)
    records = save_output(out, output_dir)
    if cfg.get("wandb"):
        import wandb

        run = wandb_run(output_dir, "sample", cfg)
        table = wandb.Table(columns=["caption", "image", "withheld_by"])
        for record, image in zip(records, out.pil()):
            table.add_data(record["caption"], wandb.Image(image), record["withheld_by"])
        run.log({"samples/grid": wandb.Image(str(output_dir / "grid.png")), "samples/table": table})
        run.finish()
    images = f"{len(records)} image{'s' if len(records) != 1 else ''}"
    log.info("%s in %s (grid: %s)", images, output_dir, output_dir / "grid.png")
    print(f"wrote {images} and grid.png to {output_dir}")
    return out
