#!/usr/bin/env python3
"""Where does the decoder lose an object's shape? The oracle's shape and colour on single-object Shapes scenes.

The chain draws the right colours but shapes at chance (issues #5, #6). This script separates "the decoder cannot
draw the shape" from "the conditioning does not tell it which shape", on the single-object scenes among the first
`--num-samples` validation images, each read back by the compositional oracle (`metrics/compositional.py`):

  - `x0@t`: the real image noised to timestep t and denoised in ONE step with its own conditioning (the image's
    CLIP embedding, and its caption when the decoder reads text): does the decoder keep a shape it can see?
    Where the accuracy falls between two timesteps is where a sampled image's shape is decided;
  - `generated`: sampled from pure noise with the same conditioning (what the decoder's grid shows);
  - `text_only`: sampled from the caption alone (image embedding dropped): what the text path carries;
  - `swapped_text`: the image's embedding with the caption's shape word replaced by the next shape, scored
    against the new caption (does the drawn shape follow the text?) and against the old one (or the image?).

Chance for shape is 0.2 (5 shapes). Prints one JSON object.

Example: python benchmarks/decoder_shape_trace.py --exports outputs/demo/export
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from decoder_oracle import add_stack_arguments, load_pipeline
from sampler_quality import load_validation

from dalle_lightning.errors import report_user_errors

TIMESTEPS = (100, 300, 500, 700, 900)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_stack_arguments(p)
    p.add_argument("--num-samples", type=int, default=512, help="validation images read (about 30%% are single)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return p.parse_args(argv)


def accuracy(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    from dalle_lightning.metrics.compositional import judge

    verdicts = [judge(image, caption) for image, caption in zip(images, captions, strict=True)]
    return {k: round(sum(bool(v[k]) for v in verdicts) / len(verdicts), 3) for k in ("colour", "shape")}


def next_shape(caption: str) -> str:
    from dalle_lightning.data.shapes import SHAPES

    shape = next(s for s in SHAPES if re.search(rf"\b{s}\b", caption))
    return re.sub(rf"\b{shape}\b", SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)], caption)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)

    from dalle_lightning.metrics.compositional import parse_prompt

    pipe, decoder_export = load_pipeline(args.exports, args.decoder, args.threads)
    decoder = pipe.decoder
    data = load_validation(Path(args.data_root), decoder.image_size, args.num_samples, 64, pipe.tokenizer)
    single = [i for i, caption in enumerate(data["caption"]) if parse_prompt(caption).kind == "single"]
    captions = [data["caption"][i] for i in single]
    images = data["image"][single].to(pipe.device)
    ids = pipe.tokenize(captions)[0] if decoder.text_tokens else None
    embeds = pipe.image_embeddings(images)

    out: dict[str, Any] = {"decoder": str(decoder_export), "single_object_scenes": len(captions)}
    out["real"] = accuracy(images, captions)
    generator = torch.Generator(pipe.device).manual_seed(args.seed)
    scheduler = decoder.noise
    with torch.no_grad():
        condition = decoder.condition(embeds, ids)
        for step in TIMESTEPS:
            t = torch.full((len(captions),), step, device=pipe.device)
            noisy = scheduler.add_noise(images, torch.randn(images.shape, generator=generator), t)
            x0 = scheduler.step(decoder.denoise(noisy, t, condition), step, noisy).pred_original_sample
            out[f"x0@{step}"] = accuracy(x0.clamp(-1, 1), captions)

    def sample(embeddings: torch.Tensor, token_ids: torch.Tensor | None) -> torch.Tensor:
        return decoder.generate(embeddings, token_ids, generator=torch.Generator(pipe.device).manual_seed(args.seed))

    out["generated"] = accuracy(sample(embeds, ids), captions)
    if decoder.text_tokens:
        out["text_only"] = accuracy(sample(torch.zeros_like(embeds), ids), captions)
        swapped = [next_shape(caption) for caption in captions]
        drawn = sample(embeds, pipe.tokenize(swapped)[0])
        out["swapped_text"] = {"follows_text": accuracy(drawn, swapped), "follows_image": accuracy(drawn, captions)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    with report_user_errors():
        main()
