"""Inpainting on Shapes: replacement sampling against a decoder trained to edit.

For two-object (relation) scenes of the Shapes validation split, one object is hidden under a hole (its bounding
box grown by `--grow` pixels, at the decoder's size; the objects alternate between first and second) and the scene is
inpainted from the prior's embedding of its caption, which names both objects (`--steer image`: from the
image's own CLIP embedding instead). Every decoder starts from the same embeddings and the same noise:

  - `replacement`: the plain decoder (`--exports`/decoder), the known pixels pinned after each step;
  - `editing`: the editing decoder (`--editing`), which sees the known pixels and the mask as input;
  - `editing_replacement`: the editing decoder with the known pixels pinned as well.

Per set, read back by the Shapes oracle (`shapes/oracle.py`):

  - `hidden_colour`: an object of the hidden object's colour is found with its centre inside the hole;
  - `hidden_colour_shape`: ... of its colour and its shape;
  - `all`: the whole caption holds (both objects, colours bound to shapes, the relation, nothing else);
  - `seam`: mean absolute difference (0-255, over channels) between neighbouring pixels across the hole's
    border; `known`: the same between neighbouring pixels both outside the hole; `seam_ratio`: seam / known;
    `seam_drawn`: the seam over the scenes where the hidden colour was found (an object drawn against the
    border is cut there; an empty hole has no seam). `real`: the validation images themselves.

Images are the decoder's (no upsampler). Prints one JSON object (`--json PATH` also writes it) and writes a grid:
per scene the real image, the masked one and each set's result.

Examples (after `python train.py experiment=demo/decoder_edit paths.export_dir=outputs/demo/export`):
  python -m experiments.editing                                        # the demo's exports, N=256 scenes
  python -m experiments.editing --editing /tmp/run/export/decoder_edit --steer image --num-scenes 128
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from dalle_lightning.errors import UserError, report_user_errors
from dalle_lightning.shapes.validation import read_val_split
from experiments.decoder_oracle import add_stack_arguments, load_pipeline, report

SETS = ("replacement", "editing", "editing_replacement")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_stack_arguments(p)
    p.add_argument("--editing", default=None, help="the editing decoder's export (default: <exports>/decoder_edit)")
    p.add_argument("--num-scenes", type=int, default=256, help="relation scenes inpainted (N)")
    p.add_argument("--steer", choices=("prompt", "image"), default="prompt", help="the embedding that steers")
    p.add_argument("--grow", type=int, default=1, help="pixels (at the decoder's size) the hole adds to the box")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--grid", default=None, help="grid PNG (default: editing_grid.png beside the editing export)")
    p.add_argument("--grid-rows", type=int, default=12)
    p.add_argument("--json", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def object_box(obj: dict[str, Any], scale: float, size: int, grow: int = 0) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) at `size` px of a scene object (its json: centre and side at the render size,
    `scale` = size / render size), covering every pixel it touches, grown by `grow` pixels."""
    half = obj["size"] / 2
    return (
        max(0, math.floor((obj["y"] - half) * scale) - grow),
        max(0, math.floor((obj["x"] - half) * scale) - grow),
        min(size, math.ceil((obj["y"] + half) * scale) + grow),
        min(size, math.ceil((obj["x"] + half) * scale) + grow),
    )


def hidden_boxes(
    metas: list[dict[str, Any]], size: int, grow: int = 1
) -> list[tuple[int, dict[str, Any], tuple[int, ...]]]:
    """Per usable relation scene (index, the hidden object, its hole (top, left, bottom, right) at `size` px):
    the first object of even scenes, the second of odd ones, its box grown by `grow` pixels; scenes where the
    hole would reach the other object's box are left out (the hole must hide one object only)."""
    out = []
    for index, meta in enumerate(metas):
        if meta.get("kind") != "relation":
            continue
        scale = size / meta["width"]
        objects = meta["objects"]
        hidden, other = (objects[0], objects[1]) if len(out) % 2 == 0 else (objects[1], objects[0])
        hole, keep = object_box(hidden, scale, size, grow), object_box(other, scale, size)
        overlaps = hole[0] < keep[2] and keep[0] < hole[2] and hole[1] < keep[3] and keep[1] < hole[3]
        if not overlaps:
            out.append((index, hidden, hole))
    return out


def found_hidden(image: torch.Tensor, hidden: dict[str, Any], hole: tuple[int, ...]) -> tuple[bool, bool]:
    """(colour found, colour and shape found): an object of the hidden one's colour centred inside the hole."""
    from dalle_lightning.shapes.oracle import read_objects

    top, left, bottom, right = hole
    inside = [o for o in read_objects(image) if top <= o.y <= bottom and left <= o.x <= right]
    colour = [o for o in inside if o.colour == hidden["colour"]]
    return bool(colour), any(o.shape == hidden["shape"] for o in colour)


def seam_sums(images: torch.Tensor, holes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image, sums and counts of |difference| (0-255, mean over channels) of neighbouring pixels across
    the holes' borders (`seam`) and within the known region (`known`)."""
    pixels = (images.clamp(-1, 1) + 1) * 127.5
    out = {key: torch.zeros(images.shape[0]) for key in ("seam", "seam_n", "known", "known_n")}
    for dim in (2, 3):
        diff = (pixels.diff(dim=dim)).abs().mean(1, keepdim=True)
        a, b = holes.narrow(dim, 0, holes.shape[dim] - 1), holes.narrow(dim, 1, holes.shape[dim] - 1)
        across, known = (a != b).float(), ((a == 0) & (b == 0)).float()
        for key, pairs in (("seam", across), ("known", known)):
            out[key] += (diff * pairs).flatten(1).sum(1)
            out[f"{key}_n"] += pairs.flatten(1).sum(1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    from dalle_lightning.export import check_exports
    from dalle_lightning.loading import load_stage_export
    from dalle_lightning.pipeline import UnCLIPPipeline
    from dalle_lightning.shapes.oracle import judge

    args.editing = args.editing or str(Path(args.exports) / "decoder_edit")
    pipe, _ = load_pipeline(args.exports, None, args.threads)
    check_exports({"decoder": args.editing}, "--")
    editor = load_stage_export(args.editing, "decoder", clip=Path(args.exports) / "clip", option="--editing")
    if not editor.inpainting:
        raise UserError(f"--editing='{args.editing}' is not an editing decoder: train one with inpainting=true")
    pipes = {
        "replacement": pipe,
        "editing": UnCLIPPipeline(pipe.clip, pipe.prior, editor),
        "editing_replacement": UnCLIPPipeline(pipe.clip, pipe.prior, editor, decoder_options={"replacement": True}),
    }
    size = pipe.decoder.image_size
    if editor.image_size != size:
        raise UserError(f"--editing makes {editor.image_size} px images, the decoder {size} px: use one size")
    # Relation scenes are ~40% of the val split: read enough of it for N of them.
    data = read_val_split(
        Path(args.data_root), size, min(1000, 3 * args.num_scenes), args.batch_size, pipe.clip.tokenizer
    )
    scenes = hidden_boxes(data["meta"], size, args.grow)[: args.num_scenes]
    if not scenes:
        raise UserError(f"no usable relation scenes in {args.data_root}/val")
    index = torch.tensor([i for i, _, _ in scenes])
    real, captions = data["image"][index], [data["caption"][i] for i, _, _ in scenes]
    holes = torch.zeros(len(scenes), 1, size, size)
    for row, (_, _, (top, left, bottom, right)) in enumerate(scenes):
        holes[row, :, top:bottom, left:right] = 1

    generator = pipe.generator(args.seed)
    embeds = []
    for start in range(0, len(scenes), args.batch_size):
        part = slice(start, start + args.batch_size)
        if args.steer == "prompt":
            embeds.append(pipe.prior_embeddings(captions[part], generator))
        else:
            embeds.append(pipe.image_embeddings(real[part].to(pipe.device)))
    embeds = torch.cat(embeds)

    results: dict[str, torch.Tensor] = {"real": real}
    for name, chosen in pipes.items():
        made = []
        for start in range(0, len(scenes), args.batch_size):
            part = slice(start, start + args.batch_size)
            generator = chosen.generator(args.seed + 1 + start)  # the same starting noise for every set
            known = (real[part].to(chosen.device), holes[part].to(chosen.device))
            made.append(chosen.decode(embeds[part], captions[part], generator, known=known).cpu())
        results[name] = torch.cat(made)

    out: dict[str, Any] = {
        "decoder": str(Path(args.exports) / "decoder"),
        "editing": str(args.editing),
        "image_size": size,
        "num_scenes": len(scenes),
        "steer": args.steer,
        "grow": args.grow,
        "hole_fraction": round(float(holes.mean()), 4),
    }
    for name, images in results.items():
        found = [found_hidden(image, hidden, hole) for image, (_, hidden, hole) in zip(images, scenes)]
        verdicts = [judge(image, caption) for image, caption in zip(images, captions)]
        sums = seam_sums(images, holes)
        drawn = torch.tensor([c for c, _ in found])
        seam, known = (float(sums[key].sum() / sums[f"{key}_n"].sum()) for key in ("seam", "known"))
        seam_drawn = float(sums["seam"][drawn].sum() / sums["seam_n"][drawn].sum()) if drawn.any() else math.nan
        out[name] = {
            "hidden_colour": round(sum(c for c, _ in found) / len(found), 4),
            "hidden_colour_shape": round(sum(s for _, s in found) / len(found), 4),
            "all": round(sum(bool(v["all"]) for v in verdicts) / len(verdicts), 4),
            "seam": round(seam, 3),
            "known": round(known, 3),
            "seam_ratio": round(seam / known, 3),
            "seam_drawn": round(seam_drawn, 3),
        }

    columns = [real, real * (1 - holes), *(results[name] for name in SETS)]  # the hole grey (0)
    grid_path = Path(args.grid) if args.grid else Path(args.editing).parent / "editing_grid.png"
    return report(out, captions, columns, ["real", "masked (grey hole)", *SETS], grid_path, args)


if __name__ == "__main__":
    with report_user_errors():
        main()
