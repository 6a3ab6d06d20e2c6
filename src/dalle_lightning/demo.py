"""`make demo`: build Shapes, train the stages at demo scale on this machine, and report what they reached.

CLIP → (embed the shards) → prior → decoder → upsampler, then the whole chain from text (`evaluate.py`) on
validation captions, about half of them held-out combinations: CLIP score, FD-CLIP, compositional accuracy.

Each stage is trained by the real entry point (`python train.py experiment=demo/<stage>`) in its own
process; the figures come from the runs' `metrics.json` and the exports. The report is printed as a table
and written to `outputs/demo/report.json`, one section per stage, so machines can be compared.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dalle_lightning.shapes import dataset as shapes
from dalle_lightning.visualize import plot_training_curves, read_csv_log

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "outputs" / "demo"
SHAPES_DIR = ROOT / "data" / "shapes"
# The same build as conf/data/shapes.yaml, so training finds it ready.
SHAPES_ARGS = dict(num_train=20_000, num_val=1000, size=64, seed=0, samples_per_shard=1000)


# The chain evaluation: the first 128 val captions (about half held-out), one image each, with fewer sampling
# steps than training's previews (DPM-Solver++ needs few) to stay inside the demo's time.
CHAIN_ARGS = ["num_samples=128", "decoder.steps=10", "upsampler.steps=6"]

# training_curves.png: each stage's losses, and below them its headline metric (solid) beside its reference.
CURVES = {
    "clip": ["val/t2i_r1_heldout", "val/t2i_r1_seen"],
    "prior": ["val/cos_sampled_heldout", "val/cos_text_baseline_heldout"],
    "decoder": ["val/clip_score", "val/clip_score_real"],
    "upsampler": ["val/psnr", "val/psnr_bicubic"],
}

# Lightning's CSV logger beside wandb: the demo reads each metric's first value from it.
CSV_LOGGER = [
    "+logger.csv._target_=lightning.pytorch.loggers.CSVLogger",
    "+logger.csv.save_dir=${paths.output_dir}",
    "+logger.csv.name=csv",
    "+logger.csv.version=0",
]


def run_script(label: str, script: str, run_dir: Path, args: list[str]) -> float:
    """Run a root script (train.py, embed.py, evaluate.py) with its run folder at `run_dir`; its wall time."""
    command = [sys.executable, str(ROOT / script), f"hydra.run.dir={run_dir}", *args]
    print(f"\n=== {label}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def train_stage(stage: str, extra: list[str] = ()) -> tuple[dict[str, float], float, Path]:
    """Run `train.py experiment=demo/<stage>`; return its metrics, wall time and run folder."""
    run_dir = OUT / "runs" / stage
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [f"experiment=demo/{stage}", f"paths.export_dir={OUT / 'export'}", *CSV_LOGGER, *extra]
    seconds = run_script(stage, "train.py", run_dir, args)
    return json.loads((run_dir / "metrics.json").read_text()), seconds, run_dir


def csv_log(run_dir: Path) -> Path:
    return run_dir / "csv" / "version_0" / "metrics.csv"


def first_values(run_dir: Path, names: list[str]) -> dict[str, float]:
    """The first logged value of each metric (from the CSV log), to show how far training moved it."""
    series = read_csv_log(csv_log(run_dir))
    return {name: series[name][0][1] for name in names}


def last_grid(run_dir: Path) -> str:
    grids = sorted((run_dir / "samples").glob("epoch*.png"))
    return str(grids[-1]) if grids else ""


def evaluate_clip(export: Path, grid_path: Path, rows: int = 8, top: int = 5) -> dict[str, float]:
    """Held-out text→image R@1 by scene kind (single / count / relation; gallery: the whole val set), and a
    picture: held-out captions, each with the val images the trained CLIP ranks highest for it."""
    from dalle_lightning.metrics.retrieval import RetrievalMetrics
    from dalle_lightning.models.clip import load_frozen_clip
    from dalle_lightning.shapes.validation import embed_val_split
    from dalle_lightning.visualize import captioned_grid

    cat = embed_val_split(load_frozen_clip(export, "clip"), SHAPES_DIR)
    captions, images, texts = cat["caption"], cat["image_emb"], cat["text_emb"]
    kinds = [m.get("kind", "") for m in cat["meta"]]
    # Queries of each kind against the whole val gallery.
    metric = RetrievalMetrics()
    scores: dict[str, float] = {}
    for kind in sorted(set(kinds)):
        of_kind = torch.tensor([k == kind for k in kinds])
        metric.update(images, texts, cat["group_id"], cat["caption_id"], cat["heldout"] & of_kind)
        scores[f"r1_heldout_{kind}"] = metric.compute()["t2i_r1_heldout"].item()
        metric.reset()

    chosen = []
    for i in cat["heldout"].nonzero().flatten().tolist():
        if captions[i] not in {captions[j] for j in chosen} and len(chosen) < rows:
            chosen.append(i)
    ranked = (texts[chosen] @ images.T).topk(top, dim=1).indices
    grid = captioned_grid(
        [(f"{captions[i]} (held-out)", [cat["image"][j] for j in ranked[r]]) for r, i in enumerate(chosen)]
    )
    grid.save(grid_path)
    return scores


def embed_shapes(clip_export: Path) -> dict[str, str]:
    """Embedding shards of the Shapes train and val splits, by the real `embed.py` (resumable: a rerun with
    the same export redoes nothing; a new export gets a fresh folder)."""
    manifest = json.loads((SHAPES_DIR / "manifest.json").read_text())
    out = OUT / "embeddings"
    shutil.rmtree(out, ignore_errors=True)  # the CLIP was just retrained: old embeddings are stale
    patterns = {}
    for split in ("train", "val"):
        args = [f"clip={clip_export}", f"shards='{manifest['shards'][split]}'", f"output_dir={out / split}"]
        # embed.py reads with 4 worker processes by default; on the demo's 2 cores torch warns of too many
        args.append(f"num_workers={min(4, os.cpu_count() or 1)}")
        run_script(f"embed {split}", "embed.py", OUT / "runs" / f"embed_{split}", args)
        patterns[split] = str(out / split / f"{split}-*.tar")
    return patterns


def evaluate_chain() -> tuple[dict[str, Any], float, Path]:
    """Text → image through all four exports (`evaluate.py`) for the first val captions (about half of them
    held-out combinations): CLIP score against the real images', FD-CLIP, compositional accuracy."""
    run_dir = OUT / "runs" / "chain"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [f"paths.export_dir={OUT / 'export'}", *CHAIN_ARGS, "wandb=true"]
    seconds = run_script("chain", "evaluate.py", run_dir, args)
    result = json.loads((run_dir / "report.json").read_text())
    compositional = result["compositional"]
    chain = {
        "clip_score_generated": result["clip_score_generated"],
        "clip_score_real": result["clip_score_real"],
        "clip_score_ratio": result["clip_score_ratio"],
        result["fd_name"]: result["fd"],
        "images_per_s": result["images_per_s"],
        "single_heldout_colour_shape": compositional["single_heldout_colour_shape"],
        "compositional": {
            split: {k: v for k, v in compositional[split].items() if k != "n"} | {"prompts": compositional[split]["n"]}
            for split in ("seen", "heldout")
        },
    }
    return chain, seconds, run_dir


def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys, for the table."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_table(report: dict[str, Any]) -> None:
    print("\n" + "=" * 64)
    print(f"{'section':10s} {'figure':34s} {'value':>16s}")
    print("-" * 64)
    for section, values in report.items():
        if section in ("machine", "paths"):
            continue
        for key, value in flat(values).items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            print(f"{section:10s} {key:34s} {shown:>16s}")
    print("-" * 64)
    for key, value in report["paths"].items():
        print(f"{key}: {value}")
    print("=" * 64)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    total_start = time.perf_counter()
    install_file = ROOT / ".venv" / ".install_s"
    times: dict[str, float] = {"install_s": float(install_file.read_text()) if install_file.exists() else 0.0}

    start = time.perf_counter()
    print("=== building the Shapes shards (skipped when already built)", flush=True)
    shapes.build(SHAPES_DIR, **SHAPES_ARGS)
    times["shapes_s"] = time.perf_counter() - start

    clip_metrics, times["clip_s"], clip_run = train_stage("clip")
    clip = {
        "r1_heldout": clip_metrics["val/t2i_r1_heldout"],
        "r5_heldout": clip_metrics["val/t2i_r5_heldout"],
        "r1_seen": clip_metrics["val/t2i_r1_seen"],
        "i2t_r1_heldout": clip_metrics["val/i2t_r1_heldout"],
        "zeroshot_acc_heldout": clip_metrics["val/zeroshot_acc_heldout"],
        "train_loss": clip_metrics["train/loss"],
    }
    grid = OUT / "clip_retrieval_heldout.png"
    clip.update(evaluate_clip(OUT / "export" / "clip", grid))

    start = time.perf_counter()
    embeddings = embed_shapes(OUT / "export" / "clip")
    prior_metrics, prior_train_s, prior_run = train_stage(
        "prior",
        [
            f"stage.clip={OUT / 'export' / 'clip'}",
            f"data.train_shards='{embeddings['train']}'",
            f"data.val_shards='{embeddings['val']}'",
        ],
    )
    times["prior_s"] = time.perf_counter() - start
    prior = {
        "cos_sampled": prior_metrics["val/cos_sampled_heldout"],
        "cos_text_baseline": prior_metrics["val/cos_text_baseline_heldout"],
        "cos_sampled_seen": prior_metrics["val/cos_sampled_seen"],
        "cos_text_baseline_seen": prior_metrics["val/cos_text_baseline_seen"],
        "retrieval_acc_heldout": prior_metrics["val/retrieval_acc_heldout"],
        "train_s": prior_train_s,
    }

    frozen_clip = f"stage.clip={OUT / 'export' / 'clip'}"
    decoder_metrics, times["decoder_s"], decoder_run = train_stage("decoder", [frozen_clip])
    first = first_values(decoder_run, ["val/fd_clip", "val/clip_score"])
    decoder = {
        "fd_clip": decoder_metrics["val/fd_clip"],
        "clip_score": decoder_metrics["val/clip_score"],
        "clip_score_real": decoder_metrics["val/clip_score_real"],
        "fd_clip_first": first["val/fd_clip"],
        "clip_score_first": first["val/clip_score"],
        "val_loss": decoder_metrics["val/loss"],
    }

    upsampler_metrics, times["upsampler_s"], upsampler_run = train_stage("upsampler", [frozen_clip])
    first = first_values(upsampler_run, ["val/fd_clip", "val/psnr"])
    upsampler = {
        "fd_clip": upsampler_metrics["val/fd_clip"],
        "fd_clip_first": first["val/fd_clip"],
        "psnr": upsampler_metrics["val/psnr"],
        "psnr_first": first["val/psnr"],
        "psnr_bicubic": upsampler_metrics["val/psnr_bicubic"],
        "val_loss": upsampler_metrics["val/loss"],
    }

    chain, times["chain_s"], chain_run = evaluate_chain()

    curves = OUT / "training_curves.png"
    runs = {"clip": clip_run, "prior": prior_run, "decoder": decoder_run, "upsampler": upsampler_run}
    plot_training_curves({stage: csv_log(run) for stage, run in runs.items()}, CURVES, curves)

    times["total_s"] = time.perf_counter() - total_start + times["install_s"]
    wandb_runs = sorted(str(p) for p in (OUT / "runs").glob("*/wandb/offline-run-*"))
    report = {
        "clip": clip,
        "prior": prior,
        "decoder": decoder,
        "upsampler": upsampler,
        "chain": chain,
        "times": times,
        "machine": machine(),
        "paths": {
            "report": str(OUT / "report.json"),
            "clip_retrieval_grid": str(grid),
            "training_curves": str(curves),
            "clip_export": str(OUT / "export" / "clip"),
            "clip_run": str(clip_run),
            "prior_export": str(OUT / "export" / "prior"),
            "prior_run": str(prior_run),
            "decoder_grid": last_grid(decoder_run),
            "decoder_export": str(OUT / "export" / "decoder"),
            "upsampler_grid": last_grid(upsampler_run),
            "upsampler_export": str(OUT / "export" / "upsampler"),
            "chain_grid": str(chain_run / "grid.png"),
            "chain_samples": str(chain_run / "samples.json"),
            "wandb_offline_runs": ", ".join(wandb_runs),
        },
    }
    (OUT / "report.json").write_text(json.dumps(report, indent=2))
    print_table(report)


if __name__ == "__main__":
    main()
