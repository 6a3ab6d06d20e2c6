"""What the decoder draws, read back by the compositional oracle without the upsampler.

The decoder's FD and CLIP score say how close its images are on the whole; the oracle (`shapes/oracle.py`)
says which part of a scene it gets wrong. For the first N Shapes validation images this script scores three sets
of images at the decoder's size with the oracle against their captions:

  - `real`: the validation images themselves (the oracle's own accuracy at this size),
  - `reconstruction`: the decoder from the CLIP image embeddings of those images (the training grids' rows),
  - `from_text`: the decoder from the prior's image embeddings for their captions (the chain without upsampler),

each per category (colour, shape, count, relation, all) for seen and held-out combinations, the single-object
prompts apart, and writes a grid: per caption its val image, the reconstruction and the image from the caption.
Prints one JSON object on stdout (`--json PATH` also writes it).

Examples:
  python -m experiments.decoder_oracle                                 # the demo's exports, N=256 (~1 min)
  python -m experiments.decoder_oracle --decoder /tmp/run/export/decoder --grid /tmp/run/oracle.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from dalle_lightning.errors import report_user_errors
from dalle_lightning.shapes.validation import read_val_split

ROOT = Path(__file__).resolve().parents[1]
SETS = ("real", "reconstruction", "from_text")


def add_stack_arguments(p: argparse.ArgumentParser) -> None:
    """--exports, --decoder (for `load_pipeline`) and --data-root (the Shapes build whose val split is read)."""
    p.add_argument("--exports", default=str(ROOT / "outputs/demo/export"), help="folder with clip/, prior/, decoder/")
    p.add_argument("--decoder", default=None, help="another decoder export (trained on the same CLIP)")
    p.add_argument("--data-root", default=str(ROOT / "data/shapes"), help="a Shapes build (its val/ shards)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_stack_arguments(p)
    p.add_argument("--num-samples", type=int, default=256, help="validation images (N)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--grid", default=None, help="grid PNG (default: oracle_grid.png beside the decoder export)")
    p.add_argument("--grid-rows", type=int, default=12)
    p.add_argument("--json", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The oracle's nested result, trimmed to what tells the sets apart."""
    single = result["by_kind"]["single"]
    return {
        "seen": result["seen"],
        "heldout": result["heldout"],
        "single_seen": single["seen"],
        "single_heldout": single["heldout"],
        "single_heldout_colour_shape": result["single_heldout_colour_shape"],
    }


def load_pipeline(exports: str, decoder: str | None = None, threads: int = 2):
    """(UnCLIPPipeline of `exports`/clip, prior, decoder, the decoder's export path) on `threads` torch threads;
    `decoder` replaces the decoder. Errors name the flag the user gave: --exports/<stage>, or --decoder."""
    torch.set_num_threads(threads)
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from dalle_lightning.export import check_exports
    from dalle_lightning.pipeline import UnCLIPPipeline

    found = {stage: Path(exports) / stage for stage in ("clip", "prior", "decoder")}
    check_exports({k: v for k, v in found.items() if not (k == "decoder" and decoder)}, "--exports/")
    if decoder:
        found["decoder"] = Path(decoder)
        check_exports({"decoder": found["decoder"]}, "--")
    return UnCLIPPipeline.from_exports(**found), found["decoder"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    from dalle_lightning.shapes.oracle import CompositionalAccuracy

    pipe, decoder_export = load_pipeline(args.exports, args.decoder, args.threads)
    size, bs = pipe.decoder.image_size, args.batch_size
    data = read_val_split(Path(args.data_root), size, args.num_samples, bs, pipe.clip.tokenizer)
    captions = data["caption"]
    generator = pipe.generator(args.seed)
    images: dict[str, list[torch.Tensor]] = {"real": [data["image"]], "reconstruction": [], "from_text": []}
    for start in range(0, len(captions), bs):
        part = captions[start : start + bs]
        real = data["image"][start : start + bs].to(pipe.device)
        images["reconstruction"].append(pipe.decode(pipe.image_embeddings(real), part, generator).cpu())
        images["from_text"].append(pipe.decode(pipe.prior_embeddings(part, generator), part, generator).cpu())
    out: dict[str, Any] = {"decoder": str(decoder_export), "image_size": size, "num_samples": len(captions)}
    for name in SETS:
        oracle = CompositionalAccuracy()
        oracle.update(torch.cat(images[name]), captions)
        out[name] = summary(oracle.compute())

    stacked = [torch.cat(images[name]) for name in SETS]
    grid_path = Path(args.grid) if args.grid else decoder_export.parent / "oracle_grid.png"
    return report(out, captions, stacked, SETS, grid_path, args)


def report(
    out: dict[str, Any],
    captions: list[str],
    columns: list[torch.Tensor],
    names: tuple[str, ...] | list[str],
    grid_path: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Save the grid (a row per caption, up to `args.grid_rows`: the named image sets side by side), name it in
    `out`, print `out` as JSON and write it to `args.json` when given; `out`."""
    from dalle_lightning.visualize import captioned_grid

    rows = [(captions[i], [c[i] for c in columns]) for i in range(min(args.grid_rows, len(captions)))]
    captioned_grid(rows, cell=64).save(grid_path)
    out["grid"] = f"{grid_path} (columns: {', '.join(names)})"
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return out


if __name__ == "__main__":
    with report_user_errors():
        main()
