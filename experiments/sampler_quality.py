"""Few-step sampling quality: FD-CLIP of the decoder's reconstructions per sampler and step count.

Whether a few-step sampler matches a many-step one: the FD-CLIP of each configuration against our own 50-step
DDIM on Shapes, on a trained decoder export:

  1. N validation images of the Shapes shards (the split evaluate.py reads: `<data-root>/val/*.tar`, in order),
  2. their CLIP image embeddings (the CLIP export the decoder was trained on),
  3. decoded back into images by the decoder stage (`DecoderModule.generate`: the export's guidance scale and
     dynamic thresholding) once per sampler configuration, every configuration starting from the SAME initial
     noise per image, so that configurations differ by their discretisation only,
  4. per configuration: FD in CLIP space against the real images (the project's metric, `frechet_distance`),
     the ratio to the reference's FD (DDIM 50), FD to the reference's own samples (how far the few-step images
     are from the 50-step ones drawn from the same noise), the CLIP score of the samples with their captions,
     images/s and seconds of sampling.

Noise floor: a 5% criterion means nothing if FD moves more than that with the noise seed alone, so the reference
is also run from a second noise seed (`reference_seed2`), and FD between the two halves of the real set is given.

Prints one JSON object on stdout (`--json PATH` also writes it); a progress bar over configurations on stderr.

Examples:
  python -m experiments.sampler_quality                                 # the demo's exports, N=256
  python -m experiments.sampler_quality --num-samples 512 --json outputs/sampler_quality.json
  python -m experiments.sampler_quality --configs dpmsolver++:10,dpmsolver++:12 --second-seed -1
  python -m experiments.sampler_quality --reference ddim:50:0 --configs "" --second-seed -1   # thresholding off

A configuration is `sampler:steps[:thresholding]`; the third field overrides the export's dynamic thresholding
percentile (0: off).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tqdm.auto import tqdm

from dalle_lightning.errors import report_user_errors
from dalle_lightning.shapes.validation import read_val_split

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = "dpmsolver++:8,dpmsolver++:10,dpmsolver++:12,dpmsolver++:16,ddim:8,ddim:10,ddim:12,ddim:16"

Config = tuple[str, int, float | None]  # (sampler, steps, dynamic thresholding: None = the export's, 0 = off)


def parse_config(text: str) -> Config:
    """`sampler:steps[:thresholding]`, e.g. `dpmsolver++:12`, or `ddim:50:0` (dynamic thresholding off)."""
    parts = text.strip().split(":")
    sampler, steps, extra = parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else ""
    try:
        threshold = float(extra) if extra else None
    except ValueError:
        threshold = -1.0
    if len(parts) not in (2, 3) or not sampler or not steps.isdigit() or int(steps) < 1 or (threshold or 0) < 0:
        raise argparse.ArgumentTypeError(f"expected sampler:steps[:thresholding] (e.g. dpmsolver++:12), got {text!r}")
    return sampler, int(steps), threshold


def config_name(config: Config) -> str:
    sampler, steps, threshold = config
    return f"{sampler}_{steps}" + ("" if threshold is None else f"_thr{threshold:g}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--decoder", default=str(ROOT / "outputs/demo/export/decoder"), help="decoder export")
    p.add_argument("--clip", default=str(ROOT / "outputs/demo/export/clip"), help="its CLIP export")
    p.add_argument("--data-root", default=str(ROOT / "data/shapes"), help="a Shapes build (its val/ shards)")
    p.add_argument("--num-samples", type=int, default=256, help="validation images (N)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reference", type=parse_config, default=("ddim", 50, None), help="sampler:steps the ratios are to")
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="comma-separated sampler:steps to compare with the reference (samplers: dpmsolver++, ddim, ddpm)",
    )
    p.add_argument("--seed", type=int, default=0, help="the initial noise shared by all configurations")
    p.add_argument("--second-seed", type=int, default=1, help="the reference's second noise seed (-1: skip)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        args.configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    except argparse.ArgumentTypeError as error:
        p.error(str(error))
    if args.num_samples < 4:
        p.error("--num-samples must be at least 4 (FD needs a covariance of each half of the real set)")
    return args


def fd_metric(clip, reset_real: bool = False):
    """The project's Fréchet distance (`fd_clip` here: no Inception weights are looked up). The real side is
    kept across `reset()` so each configuration only adds its samples."""
    from dalle_lightning.metrics.image import frechet_distance

    name, metric = frechet_distance(clip)
    metric.reset_real_features = reset_real
    return name, metric


def update_fd(metric, images: torch.Tensor, real: bool, batch_size: int, device: torch.device) -> None:
    for part in images.split(batch_size):
        metric.update(part.to(device), real=real)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import diffusers

    from dalle_lightning.loading import load_stage_export
    from dalle_lightning.metrics.image import clip_scores
    from dalle_lightning.models.clip import load_frozen_clip

    start = time.perf_counter()
    clip = load_frozen_clip(args.clip, "--clip").to(device)
    decoder = load_stage_export(args.decoder, "decoder", clip=args.clip, option="--decoder").to(device)
    data = read_val_split(Path(args.data_root), decoder.image_size, args.num_samples, args.batch_size, clip.tokenizer)
    n, size, bs = args.num_samples, decoder.image_size, args.batch_size
    real = data["image"]
    embeds = torch.cat([clip.encode_images(part.to(device)) for part in real.split(bs)])
    # Noise drawn once on the CPU (the same numbers on any device), then reused by every configuration.
    noises = {
        seed: torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))
        for seed in (args.seed, args.second_seed)
        if seed >= 0
    }

    def mean_clip_score(images: torch.Tensor) -> float:
        ids, mask = data["input_ids"], data["attention_mask"]
        parts = zip(images.split(bs), ids.split(bs), mask.split(bs))
        return (
            torch.cat([clip_scores(clip, x.to(device), i.to(device), m.to(device)).cpu() for x, i, m in parts])
            .mean()
            .item()
        )

    def sample(sampler: str, steps: int, threshold: float | None, seed: int) -> tuple[torch.Tensor, float]:
        """All N reconstructions for one configuration, and the seconds spent in the decoder."""
        outputs, seconds = [], 0.0
        ids = data["input_ids"] if decoder.text_tokens else None
        # Only stochastic samplers (DDPM) draw from it: seeded, so that they too give the same images every run.
        generator = torch.Generator(device).manual_seed(seed)
        for i in range(0, n, bs):
            part_ids = None if ids is None else ids[i : i + bs].to(device)
            noise = noises[seed][i : i + bs].to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            images = decoder.generate(
                embeds[i : i + bs],
                part_ids,
                steps=steps,
                sampler=sampler,
                dynamic_thresholding=threshold,
                generator=generator,
                noise=noise,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            outputs.append(images.cpu())
        return torch.cat(outputs), seconds

    # One untimed call first: the first forward pays for allocator warm-up and lazy initialisation.
    decoder.generate(embeds[:2], None if not decoder.text_tokens else data["input_ids"][:2].to(device), steps=1)

    fd_name, fd_real = fd_metric(clip)
    update_fd(fd_real, real, True, bs, device)
    _, fd_ref = fd_metric(clip)  # distance to the reference's samples (same noise): the discretisation error alone

    plan = [("reference", *args.reference, args.seed)]
    plan += [(config_name(c), *c, args.seed) for c in args.configs if c != args.reference]
    if args.second_seed >= 0:
        plan.append(("reference_seed2", *args.reference, args.second_seed))
    results: list[dict[str, Any]] = []
    reference_images = None
    for name, sampler, steps, threshold, seed in tqdm(plan, desc="configurations", file=sys.stderr):
        images, seconds = sample(sampler, steps, threshold, seed)
        update_fd(fd_real, images, False, bs, device)
        row: dict[str, Any] = {
            "name": name,
            "sampler": sampler,
            "steps": steps,
            "dynamic_thresholding": threshold,  # None: the export's
            "noise_seed": seed,
            "fd": fd_real.compute().item(),
        }
        fd_real.reset()
        if reference_images is None:
            reference_images = images
            update_fd(fd_ref, reference_images, True, bs, device)
        if name != "reference":
            update_fd(fd_ref, images, False, bs, device)
            row["fd_to_reference"] = fd_ref.compute().item()
            fd_ref.reset()
        row.update(
            clip_score=mean_clip_score(images),
            seconds=seconds,
            images_per_s=n / seconds,
            unet_forwards_per_image=steps,
        )
        results.append(row)

    reference = results[0]
    for row in results:
        row["fd_ratio"] = row["fd"] / reference["fd"]
        row["speedup"] = row["images_per_s"] / reference["images_per_s"]

    # Noise floor: FD between the two halves of the real set (a floor for FD at N/2 against N/2), and how far the
    # reference's FD moves with its noise seed alone.
    _, fd_halves = fd_metric(clip, reset_real=True)
    update_fd(fd_halves, real[: n // 2], True, bs, device)
    update_fd(fd_halves, real[n // 2 :], False, bs, device)
    noise_floor: dict[str, Any] = {"fd_real_halves": fd_halves.compute().item(), "halves": [n // 2, n - n // 2]}
    seed2 = next((r for r in results if r["name"] == "reference_seed2"), None)
    if seed2 is not None:
        noise_floor["reference_seed_spread"] = abs(seed2["fd"] - reference["fd"]) / reference["fd"]

    config = decoder.config
    out = {
        "meta": {
            "decoder": str(args.decoder),
            "clip": str(args.clip),
            "data_root": str(args.data_root),
            "num_samples": n,
            "batch_size": bs,
            "image_size": size,
            "fd_name": fd_name,
            "reference": config_name(args.reference),
            "guidance_scale": config.get("guidance_scale", 3.0),
            "dynamic_thresholding": config.get("dynamic_thresholding", 0.995),
            "prediction_type": config.get("prediction_type"),
            "seed": args.seed,
            "second_seed": args.second_seed,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "total_s": time.perf_counter() - start,
        },
        "real": {"clip_score": mean_clip_score(real)},
        "noise_floor": noise_floor,
        "results": results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    return out


if __name__ == "__main__":
    with report_user_errors():
        main()
