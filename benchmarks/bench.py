#!/usr/bin/env python3
"""Throughput of dalle-lightning's stages, side by side with the peer library DALLE2-pytorch.

Benchmarks (all on the same shapes and settings as ``../shared/bench/peer_dalle2.py`` where the peer has one):

  decoder32_train           decoder training step at 32x32, batch 16, UNet matched to the peer's 16.3 M parameters
  decoder32_train_peerlayout  the same step with the peer's UNet layout (3 levels 64/128/256, 2 resnets per level)
  decoder64_train           the matched decoder at 64x64, batch 8
  prior_train               prior training step on precomputed embeddings, text embedding only, batch 64 (24.9 M peer)
  sample                    decoder sampling, our default sampler (DPM-Solver++, config steps), guidance 3, batch 16
  sample_ddim50             the same with 50 DDIM steps (the peer's sampler)
  upsampler_train           upsampler training step, tiny preset (32 -> 64 px on 32 px crops), batch 32 (no peer)
  clip_train                contrastive CLIP training step, tiny preset, batch 256 at 32 px (no peer)
  loader                    img2dataset-style 256 px JPEG shards -> 64 px training tensors on one core:
                            ours (draft-mode decode) vs stock webdataset .decode("pil") + Pillow resize
  embedding_reader          rows/s per core of the prior's clip-retrieval reader (LAION's format, 768-wide float16,
                            memory-mapped): text embeddings only, and with the captions read and tokenized
  prior_reader              the matched prior's step fed by that reader against the same step fed from memory
  matmul                    the fp32 (and bf16) torch.mm ceiling of this run (always measured)

Training steps run in a real Lightning Trainer built from the stage's Hydra config (conf/, as train.py composes it):
forward, backward, the config's gradient clipping, and the AdamW step from the stage's configure_optimizers. The
frozen CLIP is not timed (nor is it in the peer): the decoder reads precomputed image embeddings
(stage.embeddings=shards), the prior its text/image embeddings. No EMA (the peer's step has none either).
Each benchmark does one untimed FLOP-counting step (torch.utils.flop_counter, matmul/conv/attention only, fwd+bwd),
``--warmup`` untimed steps and reports the median of ``--iters`` timed ones, as the peer script does.

Device: CUDA when available (bf16 autocast, TF32 matmuls, channels_last UNets), CPU fp32 otherwise.

Examples:
  python benchmarks/bench.py                                   # everything, a table
  python benchmarks/bench.py --only decoder32_train,loader     # a subset
  python benchmarks/bench.py --json outputs/bench.json --peer /tmp/peer-dalle2/bin/python   # + the peer, ratios
  python benchmarks/bench.py --quick --only prior_train        # a few iterations (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

import numpy as np
import torch

from dalle_lightning.errors import report_user_errors

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DEFAULT_PEER_SCRIPT = ROOT.parent / "shared" / "bench" / "peer_dalle2.py"

# The decoder UNet matched to the peer's (dalle2-pytorch Unet dim 64, mults (1, 2, 4): 16.3 M parameters): our tiny
# preset's layout (4 levels, one resnet per level, cross-attention over the image tokens at the bottleneck) at the
# peer's widths 64/128/256 plus a 224-wide 4 px level: 16.8 M trainable parameters (+3.6%), 24% fewer FLOPs
# per step than the peer's UNet (most of the extra parameters sit at the cheap 4 px level).
DECODER_MATCHED = [
    "model.decoder.text_tokens=false",  # the peer's decoder reads no text either
    "model.decoder.unet.block_out_channels=[64,128,256,224]",
    "model.decoder.unet.layers_per_block=1",
    "model.decoder.unet.norm_num_groups=32",
    "model.decoder.unet.cross_attention_dim=224",
    "model.decoder.unet.attention_head_dim=7",  # heads (diffusers reads the name so): 32 channels each, as the peer's
]
# The peer's own layout in our UNet: 3 levels 64/128/256, two resnets per level, attention at the 8 px bottleneck
# only: 17.0 M trainable parameters (+4.7%), 12% more FLOPs per step than the peer's UNet. It isolates the
# implementation's speed from the architecture's.
DECODER_PEER_LAYOUT = [
    "model.decoder.text_tokens=false",
    "model.decoder.unet.block_out_channels=[64,128,256]",
    "model.decoder.unet.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D]",
    "model.decoder.unet.up_block_types=[UpBlock2D,UpBlock2D,UpBlock2D]",
    "model.decoder.unet.layers_per_block=2",
    "model.decoder.unet.norm_num_groups=32",
    "model.decoder.unet.cross_attention_dim=256",
    "model.decoder.unet.attention_head_dim=4",  # 4 heads of 64 channels
]
# The prior matched to the peer's DiffusionPriorNetwork (dim 512, depth 6: 24.9 M): width 512 (8 heads of 64), depth 8:
# 26.5 M trainable parameters (+6.5%); conditioned on the text embedding only, as the peer's benchmark.
PRIOR_MATCHED = [
    "model.prior.depth=8",
    "model.prior.heads=8",
    "model.prior.head_dim=64",
    "model.prior.text_tokens=false",
]
# The CLIP stage's tiny preset with the vocabulary its tokenizer gives it in training (a BPE of model.clip.vocab_size
# trained on the captions; without a tokenizer, transformers' default 49408-token vocabulary would add 6 M parameters).
CLIP_TINY = [
    "+model.clip.text.vocab_size=${model.clip.vocab_size}",
    "+model.clip.text.bos_token_id=0",  # the BPE's special tokens (models/tokenizer.py): BOS, EOS, PAD
    "+model.clip.text.eos_token_id=1",
    "+model.clip.text.pad_token_id=2",
]
EMBED_DIM = 512  # the peer's image/text embedding width; our CLIP export for the benchmark projects to it

# Our benchmark name -> the peer's benchmark it is compared with (peer --only name, peer result name).
PEER_OF = {
    "decoder32_train": ("decoder32", "decoder32_train"),
    "decoder32_train_peerlayout": ("decoder32", "decoder32_train"),
    "decoder64_train": ("decoder64", "decoder64_train"),
    "prior_train": ("prior", "prior_train"),
    "sample": ("sample", "decoder{size}_sample_ddim{steps}_cfg{scale:g}"),
    "sample_ddim50": ("sample", "decoder{size}_sample_ddim{steps}_cfg{scale:g}"),
}
# Targets of issue 8: (minimum ratio to the peer, minimum fraction of the fp32 matmul ceiling).
TARGETS = {
    "decoder32_train": (1.5, 0.60),
    "decoder64_train": (1.5, 0.60),
    "prior_train": (5.0, None),
    "sample": (5.0, None),
    "loader": (2.0, None),
}
ALL = (
    "decoder32_train",
    "decoder32_train_peerlayout",
    "decoder64_train",
    "prior_train",
    "sample",
    "upsampler_train",
    "clip_train",
    "loader",
    "embedding_reader",
    "prior_reader",
)


# ---------------------------------------------------------------------------------------------------------------------
# measurement helpers (the peer script's method: untimed warmup, median of timed iterations)
# ---------------------------------------------------------------------------------------------------------------------


class Device:
    """Where the benchmark runs: CUDA with bf16 autocast and TF32, or CPU in fp32."""

    def __init__(self, name: str):
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        self.type = name
        self.cuda = name == "cuda"
        self.bf16 = self.cuda and torch.cuda.is_bf16_supported()
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.precision = "bf16-mixed" if self.bf16 else ("16-mixed" if self.cuda else "32-true")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):
        if not self.cuda:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.bf16 else torch.float16)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"type": self.type, "precision": self.precision}
        if self.cuda:
            info.update(name=torch.cuda.get_device_name(), tf32=True)
        return info


def time_it(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def flop_counter():
    """torch's FlopCounterMode, also counting the CPU flash-attention kernels that SDPA dispatches to on CPU (torch
    has no formula for them, so attention would count as zero FLOPs; the peer's einsum attention counts)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    custom = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):

        def forward(q, k, v, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(q, k, v)

        def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out, q, k, v)

        custom[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return fc.FlopCounterMode(display=False, custom_mapping=custom)


def count_params(module: torch.nn.Module) -> int:
    """Trainable parameters (the frozen CLIP a stage carries for its conditioning and metrics is not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def summarize(name: str, times: list[float], batch: int, flops: int | None, params: int | None, **extra) -> dict:
    med = statistics.median(times)
    row = {
        "name": name,
        "batch": batch,
        "iters": len(times),
        "ms_per_iter_median": med * 1e3,
        "ms_per_iter_min": min(times) * 1e3,
        "ms_per_iter_max": max(times) * 1e3,
        "samples_per_s": batch / med,
        "params": params,
        "gflop_per_iter": None if flops is None else flops / 1e9,
        "achieved_gflops": None if flops is None else flops / med / 1e9,
    }
    row.update(extra)
    return row


# ---------------------------------------------------------------------------------------------------------------------
# our modules, built from the Hydra configs as train.py builds them
# ---------------------------------------------------------------------------------------------------------------------


def compose_config(overrides: list[str], workdir: Path):
    """The train config for `overrides`, as train.py composes it (paths under `workdir`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import dalle_lightning.resolvers  # noqa: F401  (dl.auto_precision)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"paths.root_dir={workdir}",
                f"trainer.default_root_dir={workdir / 'run'}",
                "logger=none",
                *overrides,
            ],
        )


def clip_export(workdir: Path) -> Path:
    """A tiny CLIP (random weights) projecting to EMBED_DIM, exported as the later stages load it. Built in-process:
    the stages need its config (embedding width) and, for the decoder and upsampler, its frozen image encoder for
    their metrics — which no training step here runs."""
    from dalle_lightning.export import MANIFEST, write_export
    from dalle_lightning.models.tokenizer import train_bpe
    from dalle_lightning.stages.clip import ClipModule

    path = workdir / "export" / "clip"
    if (path / MANIFEST).is_file():
        return path
    cfg = compose_config(["stage=clip", f"model.clip.projection_dim={EMBED_DIM}"], workdir)
    torch.manual_seed(0)
    with quiet():
        tokenizer = train_bpe(["a red circle", "two blue squares"], 300, cfg.model.clip.context_length)
        module = ClipModule(plain(cfg.model.clip), plain(cfg.optim), None, tokenizer)
        write_export(path, "clip", module.export)
    return path


def plain(node) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def build_stage(stage: str, overrides: list[str], workdir: Path):
    """(module, cfg) for `stage`, instantiated from `cfg.stage.module` exactly as train.py does."""
    from hydra.utils import instantiate

    extra = [] if stage == "clip" else [f"stage.clip={clip_export(workdir)}"]
    if stage == "decoder":
        extra.append("stage.embeddings=shards")  # precomputed image embeddings: the frozen CLIP is not timed
    cfg = compose_config([f"stage={stage}", *extra, *overrides], workdir)
    torch.manual_seed(0)
    with quiet():
        module = instantiate(cfg.stage.module, tokenizer=None, _convert_="all")
    return module, cfg


@contextlib.contextmanager
def quiet():
    """Silence library chatter (progress bars, Lightning's info lines, warnings about this synthetic setup)."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class FixedBatches(torch.utils.data.IterableDataset):
    """The same batch forever: the step is timed, not the data (the `loader` benchmark times that)."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class SavedForBackward(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the distinct non-parameter tensors autograd keeps for the backward pass: the
    activation memory of a step, on any device. Tensors that gradient checkpointing drops and recomputes are
    not kept, so they do not count."""

    def __init__(self):
        self.storages: dict[tuple[torch.device, int], int] = {}
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            self.storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
        return tensor

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def make_timer(device: Device, flops_step: bool, after_flops: Callable[[Any], None] | None):
    import lightning as L

    class StepTimer(L.Callback):
        """Times each optimizer step (training_step, backward, clipping, AdamW) between the batch hooks; the first
        step counts FLOPs instead of being timed."""

        def __init__(self):
            self.times: list[float] = []
            self.flops: int | None = None
            self._counter = None
            self.saved = SavedForBackward()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            device.sync()
            if batch_idx == 0:  # never timed: the FLOP step or a warmup step
                self.saved.__enter__()
                if flops_step:
                    self._counter = flop_counter()
                    self._counter.__enter__()
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            device.sync()
            elapsed = time.perf_counter() - self._t0
            if batch_idx == 0:
                self.saved.__exit__(None, None, None)
            if self._counter is not None:
                self._counter.__exit__(None, None, None)
                self.flops = int(self._counter.get_total_flops())
                self._counter = None
            else:
                self.times.append(elapsed)
            if batch_idx == 0 and after_flops is not None:
                after_flops(module)

    return StepTimer()


def bench_trainer(cfg, device: Device, steps: int, callbacks: list) -> Any:
    """The stage's Lightning Trainer as its config builds it (gradient clipping, ...), for `steps` training steps on
    one device, with nothing but `callbacks`: no logger, checkpoints, progress bar or validation."""
    from hydra.utils import instantiate

    return instantiate(
        cfg.trainer,
        accelerator="gpu" if device.cuda else "cpu",
        devices=1,
        precision=device.precision,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def train_benchmark(
    name: str,
    stage: str,
    overrides: list[str],
    make_batch: Callable[[torch.device], dict[str, torch.Tensor]],
    args,
    device: Device,
    workdir: Path,
    prepare: Callable[[Any, dict], None] | None = None,
    **extra,
) -> dict:
    module, cfg = build_stage(stage, overrides, workdir)
    checkpointed = bool(args.gradient_checkpointing and module.checkpointed_networks)
    if checkpointed:
        module.enable_gradient_checkpointing()
    batch = make_batch(torch.device(device.type))
    if prepare is not None:
        prepare(module, batch)
    batch_size = next(iter(batch.values())).shape[0]
    warmup = max(args.warmup, 2) if args.compile else args.warmup
    after = (lambda m: m.compile_networks()) if args.compile else None
    timer = make_timer(device, not args.no_flops, after)
    steps = int(not args.no_flops) + warmup + args.iters
    with quiet():
        trainer = bench_trainer(cfg, device, steps, [timer])
        loader = torch.utils.data.DataLoader(FixedBatches(batch), batch_size=None)
        if device.cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, train_dataloaders=loader)
    times = timer.times[warmup:]
    if device.cuda:
        extra["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    clip = cfg.trainer.get("gradient_clip_val")
    return summarize(
        name,
        times,
        batch_size,
        timer.flops,
        count_params(module),
        step="fwd+bwd+AdamW" + (f" (+ clip_grad_norm {clip:g})" if clip else "") + ", Lightning Trainer",
        flops_scope="fwd+bwd (matmul/conv/attention only)",
        overrides=overrides,
        compiled=bool(args.compile),
        gradient_checkpointing=checkpointed,
        saved_for_backward_mib=timer.saved.mib,
        **extra,
    )


def decoder_batch(size: int, n: int):
    def make(dev: torch.device) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {
            "image": (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(dev),
            "img_emb": torch.nn.functional.normalize(torch.randn(n, EMBED_DIM, generator=g), dim=-1).to(dev),
        }

    return make


def prior_batch(n: int):
    def make(dev: torch.device) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        unit = lambda: torch.nn.functional.normalize(torch.randn(n, EMBED_DIM, generator=g), dim=-1)  # noqa: E731
        return {"img_emb": unit().to(dev), "txt_emb": unit().to(dev)}  # unit norm, as embed.py writes them

    return make


def prior_statistics(module, batch) -> None:
    """The image-embedding statistics the prior measures before training (on_fit_start), set beforehand."""
    module.prior.clip_mean.data.copy_(batch["img_emb"].mean(0, keepdim=True))
    module.prior.clip_std.data.copy_(batch["img_emb"].std(0, keepdim=True))


def image_batch(size: int, n: int):
    def make(dev: torch.device) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {"image": (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(dev)}

    return make


def clip_batch(size: int, n: int, vocab: int, length: int):
    def make(dev: torch.device) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (n, length), generator=g)
        ids[:, 0], ids[:, -1] = 0, 1  # BOS ... EOS (CLIP_TINY's ids)
        return {
            "image": (torch.rand(n, 3, size, size, generator=g) * 2 - 1).to(dev),
            "input_ids": ids.to(dev),
            "attention_mask": torch.ones(n, length, dtype=torch.long).to(dev),
        }

    return make


def sample_benchmarks(args, device: Device, workdir: Path) -> list[dict]:
    """Decoder sampling with guidance, batch 16 at 32 px: our default sampler, and DDIM with the peer's 50 steps."""
    module, cfg = build_stage("decoder", [*DECODER_MATCHED, f"model.decoder.image_size={args.sample_size}"], workdir)
    module = module.to(device.type).eval()
    if device.cuda and cfg.model.decoder.get("channels_last", True):  # as after training (on_fit_start)
        module.unet.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.randn(args.batch_sample, EMBED_DIM, generator=g), dim=-1)
    embeds = embeds.to(device.type)
    g = torch.Generator(device.type).manual_seed(0)  # the sampling noise is drawn on the device
    default_sampler = cfg.model.decoder.sampler
    default_steps = int(args.sample_steps_ours or cfg.model.decoder.sample_steps)
    plans = [("sample", default_sampler, default_steps), (f"sample_ddim{args.sample_steps}", "ddim", args.sample_steps)]

    def run(steps: int, sampler: str) -> torch.Tensor:
        with device.autocast():
            return module.generate(embeds, steps=steps, guidance_scale=args.cond_scale, sampler=sampler, generator=g)

    flops = {}
    for name, sampler, steps in plans:
        out = run(steps, sampler)  # the first warmup call
        assert out.shape == (args.batch_sample, 3, args.sample_size, args.sample_size), out.shape
        if not args.no_flops:
            # Each solver step is one batched (conditional + unconditional) UNet forward: count a short run and
            # scale linearly, as the peer script does.
            probe = min(steps, 5)
            with flop_counter() as counter:
                run(probe, sampler)
            flops[name] = counter.get_total_flops() * steps // probe
    if args.compile:  # after the eager FLOP count; the first timed-warmup call compiles
        module.compile_networks()
    warmup = max(args.sample_warmup - 1, 0) + int(args.compile)
    rows = []
    for name, sampler, steps in plans:
        times = time_it(
            lambda steps=steps, sampler=sampler: run(steps, sampler), warmup, args.sample_iters, device.sync
        )
        rows.append(
            summarize(
                name,
                times,
                args.batch_sample,
                flops.get(name),
                count_params(module),
                image_size=args.sample_size,
                sampler=sampler,
                steps=steps,
                cond_scale=args.cond_scale,
                dynamic_thresholding=cfg.model.decoder.get("dynamic_thresholding"),
                unet_forwards_per_sample_call=steps,
                unet_batch=2 * args.batch_sample if args.cond_scale != 1 else args.batch_sample,
                flops_scope="whole generate() call, inference",
                compiled=bool(args.compile),
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# loader: img2dataset-style shards -> 64 px training tensors, one core
# ---------------------------------------------------------------------------------------------------------------------


def photo_like(rng: np.random.Generator, size: int, alpha: float = 1.5) -> np.ndarray:
    """A random RGB image with a 1/f^alpha amplitude spectrum, like a photograph's. At alpha 1.5 a 256 px quality-95
    JPEG is ~31 KiB, about the size of img2dataset's 256 px photos (JPEG decoding cost grows with that size: flat
    synthetic shapes would flatter the decode, white noise would overstate it)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size) ** alpha
    channels = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
        channel = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(size, size))
        channels.append((channel - channel.mean()) / (channel.std() + 1e-8))
    mix = rng.normal(size=(3, 3)) * 0.4 + np.eye(3)  # correlated colour channels
    image = np.tensordot(np.stack(channels, -1), mix, axes=1)
    return np.clip(image * 45 + rng.uniform(80, 170, 3), 0, 255).astype(np.uint8)


def write_jpeg_shards(out: Path, num: int, per_shard: int, size: int = 256, quality: int = 95) -> tuple[str, float]:
    """img2dataset's layout: {key}.jpg (quality 95, its default), {key}.txt, {key}.json, in tar shards. Returns the
    brace pattern and the mean JPEG size in KiB."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    sizes = []
    shards = (num + per_shard - 1) // per_shard
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(num, (s + 1) * per_shard)):
                key = f"{i:09d}"
                buffer = io.BytesIO()
                Image.fromarray(photo_like(rng, size)).save(buffer, format="JPEG", quality=quality)
                sizes.append(buffer.tell())
                caption = f"a photo of thing number {i}"
                members = {
                    "jpg": buffer.getvalue(),
                    "txt": caption.encode(),
                    "json": json.dumps({"key": key, "caption": caption, "width": size, "height": size}).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out / f"{{00000..{shards - 1:05d}}}.tar"), float(np.mean(sizes)) / 1024


def loader_benchmark(args, workdir: Path) -> list[dict]:
    """Ours and the stock paths read the same shards in the same way (resampled shards, a 1000-sample shuffle
    buffer, batches of 64, one process, one thread). The first `loader_warmup` batches (the shuffle buffer filling
    up) are not timed; then the paths take turns batch by batch, so that a load on the machine hits them alike."""
    import webdataset as wds
    from PIL import Image

    from dalle_lightning.data.datamodule import ShardDataModule

    size, batch, buffer = 64, args.batch_loader, 1000
    num = args.loader_samples
    pattern, mean_kb = write_jpeg_shards(workdir / "jpeg_shards", num, per_shard=max(batch, num // 4))
    total = (args.loader_warmup + args.loader_batches + 1) * batch

    def ours():
        dm = ShardDataModule(
            train_shards=pattern,
            batch_size=batch,
            num_workers=0,
            image_size=size,
            samples_per_epoch=total,
            shuffle_buffer=buffer,
        )
        dm.setup("fit")
        for b in dm.train_dataloader():
            yield dm.on_after_batch_transfer(b, 0)["image"]

    def stock(resample):
        def to_tensor(sample):
            image, caption = sample
            # webdataset's .decode("pil") gives the full 256 px image; Pillow resizes it to the training size.
            image = image.convert("RGB").resize((size, size), resample)
            return torch.from_numpy(np.asarray(image)).permute(2, 0, 1), caption

        dataset = (
            wds.WebDataset(pattern, resampled=True, shardshuffle=False, empty_check=False)
            .shuffle(buffer)
            .decode("pil")
            .to_tuple("jpg", "txt")
            .map(to_tensor)
            .batched(batch)
        )
        for images, _ in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=0):
            yield images.float().div_(127.5).sub_(1.0)

    sources = (
        ("loader", ours, "dalle_lightning.data (draft-mode JPEG decode)"),
        # Pillow's default resize filter (bicubic), the filter ours uses too
        ("loader_stock_webdataset", lambda: stock(Image.BICUBIC), 'webdataset .decode("pil") + Pillow resize'),
        # torchvision's Resize default (bilinear): a cheaper filter than ours, for reference
        ("loader_stock_bilinear", lambda: stock(Image.BILINEAR), 'webdataset .decode("pil") + Pillow bilinear resize'),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet():
            iterators = [source() for _, source, _ in sources]
            for iterator in iterators:
                for _ in range(args.loader_warmup):
                    first = next(iterator)
                assert first.shape == (batch, 3, size, size) and first.dtype == torch.float32, first.shape
            times: list[list[float]] = [[] for _ in sources]
            for _ in range(args.loader_batches):
                for iterator, record in zip(iterators, times):
                    t0 = time.perf_counter()
                    next(iterator)
                    record.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    rows = [
        summarize(
            name,
            record,
            batch,
            None,
            None,
            image_size=size,
            source=f"img2dataset-style shards: {num} 256x256 JPEGs (quality 95, random 1/f^1.5 images), txt, json",
            mean_jpeg_kib=mean_kb,
            shuffle_buffer=buffer,
            threads=1,
            num_workers=0,
            path=path,
        )
        for (name, _, path), record in zip(sources, times)
    ]
    rows[0]["stock_samples_per_s"] = rows[1]["samples_per_s"]
    rows[0]["ratio_to_stock"] = rows[0]["samples_per_s"] / rows[1]["samples_per_s"]
    rows[0]["ratio_to_stock_bilinear"] = rows[0]["samples_per_s"] / rows[2]["samples_per_s"]
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# the prior's clip-retrieval reader
# ---------------------------------------------------------------------------------------------------------------------


def write_embedding_folder(out: Path, parts: int, rows: int, dim: int) -> Path:
    """A folder as LAION published its embeddings: `parts` parts of `rows` random unit-norm float16 rows of `dim`,
    captions of LAION's typical length in parquet."""
    import pyarrow as pa

    from dalle_lightning.data.clip_retrieval import write_part

    rng = np.random.default_rng(0)
    words = ["a", "photo", "of", "red", "vintage", "wooden", "chair", "in", "the", "garden", "with", "sunlight"]
    for part in range(parts):
        embeddings = []
        for _ in range(2):
            x = rng.standard_normal((rows, dim), dtype=np.float32)
            embeddings.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        captions = [" ".join(rng.choice(words, 12)) for _ in range(rows)]
        write_part(out, f"{part:04d}", *embeddings, pa.table({"url": ["https://x/y.jpg"] * rows, "caption": captions}))
    return out


def reader_datamodule(folder: Path, batch: int, samples: int, captions: bool = False, tokenizer=None):
    from dalle_lightning.data.datamodule import ClipRetrievalDataModule

    dm = ClipRetrievalDataModule(
        str(folder),
        captions=captions,
        tokenizer=tokenizer,
        batch_size=batch,
        num_workers=0,
        samples_per_epoch=samples,
        val_samples=0,
        shuffle_buffer=20_000,
    )
    dm.setup("fit")
    return dm


def embedding_reader_benchmark(args, workdir: Path) -> list[dict]:
    """The reader in the training process itself (no loader workers), one thread: every row read from the
    memory-mapped files (in the page cache, as a folder being read again is), shuffled, normalised, batched; with
    `captions`, also read from parquet and tokenized (a 77-token BPE)."""
    from dalle_lightning.models.tokenizer import train_bpe

    rows, dim, batch = args.reader_rows, 768, args.batch_reader
    folder = write_embedding_folder(workdir / "laion768", 4, rows // 4, dim)
    tokenizer = train_bpe(["a photo of a red vintage wooden chair in the garden with sunlight"] * 10, 300, 77)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = []
    try:
        for name, captions in (("embedding_reader", False), ("embedding_reader_captions", True)):
            dm = reader_datamodule(folder, batch, rows, captions, tokenizer if captions else None)
            batches = iter(dm.train_dataloader())
            next(batches)  # the first window read: part of the steady state below too, a window every 20000 rows
            times, seen = [], 0
            for _ in range(max(1, rows // batch - 2)):
                t0 = time.perf_counter()
                out = next(batches)
                times.append(time.perf_counter() - t0)
                seen += len(out["img_emb"])
            row = summarize(
                name,
                times,
                batch,
                None,
                None,
                rows_per_s_per_core=seen / sum(times),
                embedding_dim=dim,
                rows=rows,
                source="4 parts of random unit-norm float16 embeddings + parquet captions, memory-mapped",
                mode="text embedding and captions' tokens" if captions else "text embedding only",
                threads=1,
                num_workers=0,
            )
            results.append(row)
    finally:
        torch.set_num_threads(threads)
    return results


def prior_reader_benchmark(args, device: Device, workdir: Path) -> list[dict]:
    """The matched prior's training step (PRIOR_MATCHED, batch `--batch-prior`, 512-wide embeddings) in a Lightning
    Trainer, fed by the reader in the training process (no loader workers: its cost falls between the steps) and
    from memory (one batch held and repeated); the two take turns. Each step is split into the step itself (batch
    start to end) and the loading before the next (batch end to the next start): the reader's cost is the loading
    time it adds, as a fraction of the step."""
    import lightning as L

    class LoopTimer(L.Callback):
        def __init__(self):
            self.step: list[float] = []
            self.loading: list[float] = []
            self._end: float | None = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            device.sync()
            self._start = time.perf_counter()
            if self._end is not None and batch_idx > args.warmup:
                self.loading.append(self._start - self._end)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            device.sync()
            self._end = time.perf_counter()
            if batch_idx >= args.warmup:
                self.step.append(self._end - self._start)

    batch = args.batch_prior
    steps = args.warmup + args.iters + 1
    folder = write_embedding_folder(workdir / "laion512", 2, max(4 * batch * steps, 20_000) // 2, EMBED_DIM)
    memory = prior_batch(batch)(torch.device(device.type))
    timers: dict[str, list[LoopTimer]] = {"prior_reader": [], "prior_memory": []}
    for _ in range(2):
        for name, runs in timers.items():
            module, cfg = build_stage("prior", PRIOR_MATCHED, workdir)
            runs.append(LoopTimer())
            with quiet():
                trainer = bench_trainer(cfg, device, steps, [runs[-1]])
                if name == "prior_reader":
                    trainer.fit(module, datamodule=reader_datamodule(folder, batch, batch * steps))
                else:
                    prior_statistics(module, memory)
                    loader = torch.utils.data.DataLoader(FixedBatches(memory), batch_size=None)
                    trainer.fit(module, train_dataloaders=loader)
    rows = []
    for name, runs in timers.items():
        step = [t for run in runs for t in run.step]
        loading = statistics.median(t for run in runs for t in run.loading)
        fed = "the clip-retrieval reader, in the training process" if name == "prior_reader" else "one batch in memory"
        rows.append(summarize(name, step, batch, None, None, loading_ms_median=loading * 1e3, fed_by=fed))
    reader, memory_row = rows
    added = reader["loading_ms_median"] - memory_row["loading_ms_median"]
    reader["reader_cost_fraction_of_step"] = added / memory_row["ms_per_iter_median"]
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# matmul ceiling
# ---------------------------------------------------------------------------------------------------------------------


def matmul_benchmark(n: int, dtype: torch.dtype, args, device: Device) -> dict:
    a = torch.randn(n, n, dtype=dtype, device=device.type)
    b = torch.randn(n, n, dtype=dtype, device=device.type)
    times = time_it(lambda: torch.mm(a, b), args.warmup, max(args.iters, 3 if args.quick else 5), device.sync)
    med = statistics.median(times)
    flops = 2 * n**3
    name = f"mm_{n}_{str(dtype).replace('torch.', '')}" + ("_tf32" if device.cuda and dtype == torch.float32 else "")
    return {
        "name": name,
        "ms_per_iter_median": med * 1e3,
        "ms_per_iter_min": min(times) * 1e3,
        "ms_per_iter_max": max(times) * 1e3,
        "gflop_per_iter": flops / 1e9,
        "achieved_gflops": flops / med / 1e9,
        "iters": len(times),
    }


# ---------------------------------------------------------------------------------------------------------------------
# the peer
# ---------------------------------------------------------------------------------------------------------------------


def run_peer(python: str, args, wanted: list[str]) -> dict | None:
    """Run the peer script in its own environment; its JSON, or None (with the reason printed)."""
    script = Path(args.peer_script)
    if not script.is_file():
        print(f"[peer] {script} not found: no peer comparison")
        return None
    only = sorted({PEER_OF[name][0] for name in wanted if name in PEER_OF})
    if not only:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        command = [python, str(script), "--only", *only, "matmul", "--threads", str(args.threads), "--json", str(out)]
        command += ["--warmup", str(args.warmup), "--iters", str(args.iters)]
        command += ["--sample-warmup", str(args.sample_warmup), "--sample-iters", str(args.sample_iters)]
        command += ["--sample-steps", str(args.sample_steps), "--cond-scale", f"{args.cond_scale:g}"]
        print(f"\n[peer] {' '.join(command)}", flush=True)
        done = subprocess.run(command, text=True)
        if done.returncode != 0 or not out.is_file():
            print(f"[peer] failed (exit {done.returncode}): no peer comparison")
            return None
        return json.loads(out.read_text())


def ratios(ours: list[dict], peer: dict | None, args) -> list[dict]:
    """our/peer samples/s per benchmark (the loader's ratio is to the stock webdataset path, in the same run)."""
    by_name = {r["name"]: r for r in (peer or {}).get("results", [])}
    rows = []
    for row in ours:
        name = row["name"]
        entry = None
        peer_name = None
        key = "sample_ddim50" if name.startswith("sample_ddim") else name
        if key in PEER_OF:
            peer_name = PEER_OF[key][1].format(size=args.sample_size, steps=args.sample_steps, scale=args.cond_scale)
        if name == "loader" and "ratio_to_stock" in row:
            entry = {"name": name, "versus": "stock webdataset decode (same run)", "ratio": row["ratio_to_stock"]}
        elif peer_name in by_name:
            other = by_name[peer_name]
            entry = {
                "name": name,
                "versus": f"peer {other['name']}",
                "ratio": row["samples_per_s"] / other["samples_per_s"],
                "peer_samples_per_s": other["samples_per_s"],
                "peer_params": other.get("params"),
                "params_ratio": row["params"] / other["params"] if row.get("params") and other.get("params") else None,
                "peer_fraction_of_fp32_mm_ceiling": other.get("fraction_of_fp32_mm_ceiling"),
            }
        if entry is None:
            continue
        target = TARGETS.get(name)
        if target:
            ratio_min, ceiling_min = target
            entry["target_ratio"] = ratio_min
            met = entry["ratio"] >= ratio_min
            if ceiling_min is not None:
                entry["target_fraction_of_ceiling"] = ceiling_min
                fraction = row.get("fraction_of_fp32_mm_ceiling")
                met = met and fraction is not None and fraction >= ceiling_min
            entry["target_met"] = met
        rows.append(entry)
    return rows


# ---------------------------------------------------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"model": model, "simd_flags": simd, "logical_cpus": os.cpu_count()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--only", nargs="+", default=None, help=f"benchmarks, comma- or space-separated: {', '.join(ALL)}")
    p.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="PATH", help="write JSON to PATH ('-': stdout)"
    )
    p.add_argument("--quick", action="store_true", help="a few iterations and small shards (a smoke test)")
    p.add_argument("--compile", action="store_true", help="torch.compile the stage's networks (after the FLOP step)")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (not the prior)"
    )
    p.add_argument(
        "--peer",
        nargs="?",
        const=os.environ.get("PEER_PYTHON", "/tmp/peer-dalle2/bin/python"),
        default=None,
        metavar="PYTHON",
        help="also run the peer script with this python (its own environment) and print our/peer ratios",
    )
    p.add_argument("--peer-script", default=str(DEFAULT_PEER_SCRIPT))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the peer script's default: 2)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    p.add_argument("--batch32", type=int, default=16)
    p.add_argument("--batch64", type=int, default=8)
    p.add_argument("--batch-prior", type=int, default=64)
    p.add_argument("--batch-sample", type=int, default=16)
    p.add_argument("--batch-upsampler", type=int, default=32)
    p.add_argument("--batch-clip", type=int, default=256)
    p.add_argument("--batch-loader", type=int, default=64)
    p.add_argument("--loader-samples", type=int, default=1024, help="JPEGs written to the loader's shards")
    p.add_argument("--loader-warmup", type=int, default=16, help="untimed batches (the shuffle buffer fills up)")
    p.add_argument("--loader-batches", type=int, default=24, help="timed batches per path")
    p.add_argument("--reader-rows", type=int, default=200_000, help="rows of the embedding reader's folder")
    p.add_argument("--batch-reader", type=int, default=512)
    p.add_argument("--sample-size", type=int, default=32)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (the peer's)")
    p.add_argument("--sample-steps-ours", type=int, default=None, help="our sampler's steps (default: the config's)")
    p.add_argument("--cond-scale", type=float, default=3.0)
    p.add_argument("--sample-warmup", type=int, default=2)
    p.add_argument("--sample-iters", type=int, default=5)
    p.add_argument("--mm-size", type=int, default=None, help="fp32 torch.mm size (default 2048; 8192 on CUDA)")
    p.add_argument("--mm-bf16-size", type=int, default=None, help="bf16 torch.mm size (default 512; 8192 on CUDA)")
    p.add_argument("--no-flops", action="store_true")
    args = p.parse_args(argv)
    names = [n for item in (args.only or ALL) for n in item.split(",") if n]
    names = ["sample" if n == "sample_ddim50" else n for n in names]
    unknown = sorted(set(names) - set(ALL) - {"matmul"})
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}: choose from {', '.join(ALL)}")
    args.only = [n for n in ALL if n in names]
    if args.quick:
        args.warmup, args.iters = 1, 2
        args.sample_warmup, args.sample_iters = 1, 1
        args.loader_samples = min(args.loader_samples, 4 * args.batch_loader)
        args.loader_warmup, args.loader_batches = 1, 3
        args.reader_rows = min(args.reader_rows, 8 * args.batch_reader)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = Device(args.device)
    to_stdout = args.json == "-"
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if to_stdout else (lambda *a: print(*a, flush=True))

    import diffusers
    import lightning
    import transformers

    for name in ("lightning.pytorch", "lightning.fabric"):  # their info lines (after import: it sets the level)
        logging.getLogger(name).setLevel(logging.WARNING)

    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "threads": torch.get_num_threads(),
        "device": device.describe(),
        "cpu": cpu_info(),
        "dtype": "bfloat16 autocast" if device.bf16 else ("float16 autocast" if device.cuda else "float32"),
        "warmup": args.warmup,
        "iters": args.iters,
        "compile": bool(args.compile),
        "quick": bool(args.quick),
        "decoder_matched": DECODER_MATCHED,
        "decoder_peer_layout": DECODER_PEER_LAYOUT,
        "prior_matched": PRIOR_MATCHED,
        "clip_in_timed_step": False,
        "ema_in_timed_step": False,
    }
    log(
        f"torch {meta['torch']} | diffusers {meta['diffusers']} | {device.type} ({device.precision}) | threads "
        f"{meta['threads']}" + (" | compile" if args.compile else "")
    )

    # Each training benchmark: the stage, its config overrides, the batch it steps on, and what the row reports
    # besides.
    def decoder(layout: list[str], image_size: int, batch: int) -> dict[str, Any]:
        overrides = [*layout, f"model.decoder.image_size={image_size}"]
        make_batch = decoder_batch(image_size, batch)
        return dict(stage="decoder", overrides=overrides, make_batch=make_batch, image_size=image_size)

    train_specs = {
        "decoder32_train": decoder(DECODER_MATCHED, 32, args.batch32),
        "decoder32_train_peerlayout": decoder(DECODER_PEER_LAYOUT, 32, args.batch32),
        "decoder64_train": decoder(DECODER_MATCHED, 64, args.batch64),
        "prior_train": dict(
            stage="prior",
            overrides=PRIOR_MATCHED,
            make_batch=prior_batch(args.batch_prior),
            prepare=prior_statistics,
            conditioning="text embedding only",
        ),
        "upsampler_train": dict(
            stage="upsampler",
            overrides=[],
            make_batch=image_batch(64, args.batch_upsampler),
            preset="model/upsampler/tiny (32 -> 64 px, 32 px training crops)",
            image_size=64,
        ),
        "clip_train": dict(
            stage="clip",
            overrides=CLIP_TINY,
            make_batch=clip_batch(32, args.batch_clip, 1024, 24),
            preset="model/clip/tiny",
            image_size=32,
        ),
    }

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dalle-bench-") as tmp:
        workdir = Path(tmp)
        for name in args.only:
            t0 = time.perf_counter()
            if name in train_specs:
                rows = [train_benchmark(name, args=args, device=device, workdir=workdir, **train_specs[name])]
            elif name == "sample":
                rows = sample_benchmarks(args, device, workdir)
            elif name == "loader":
                rows = loader_benchmark(args, workdir)
            elif name == "embedding_reader":
                rows = embedding_reader_benchmark(args, workdir)
            elif name == "prior_reader":
                rows = prior_reader_benchmark(args, device, workdir)
            else:  # pragma: no cover
                raise AssertionError(name)
            for row in rows:
                row["wall_s_incl_setup"] = time.perf_counter() - t0
                log(
                    f"  {row['name']}: {row['ms_per_iter_median']:.1f} ms/iter, {row['samples_per_s']:.2f} samples/s"
                    + (f", {row['achieved_gflops']:.1f} GFLOP/s" if row.get("achieved_gflops") else "")
                    + (f", {row['params'] / 1e6:.2f} M params" if row.get("params") else "")
                )
            results.extend(rows)

    mm_fp32 = args.mm_size or (8192 if device.cuda else 2048)
    mm_bf16 = args.mm_bf16_size or (8192 if device.cuda else 512)
    ceilings = [
        matmul_benchmark(mm_fp32, torch.float32, args, device),
        matmul_benchmark(mm_bf16, torch.bfloat16, args, device),
    ]
    for row in ceilings:
        log(f"  {row['name']}: {row['ms_per_iter_median']:.1f} ms/iter, {row['achieved_gflops']:.1f} GFLOP/s")
    fp32_ceiling, bf16_ceiling = ceilings[0]["achieved_gflops"], ceilings[1]["achieved_gflops"]
    for row in results:
        if row.get("achieved_gflops"):
            row["fraction_of_fp32_mm_ceiling"] = row["achieved_gflops"] / fp32_ceiling
            if device.cuda:
                row["fraction_of_bf16_mm_ceiling"] = row["achieved_gflops"] / bf16_ceiling
    results.extend(ceilings)

    peer = None
    if args.peer:
        if device.cuda:
            log("[peer] the peer script runs on CPU only: a GPU/CPU ratio would mean nothing; running it anyway")
        peer = run_peer(args.peer, args, args.only)
    ratio_rows = ratios(results, peer, args)

    out = {"meta": meta, "results": results, "ratios": ratio_rows}
    if peer is not None:
        out["peer"] = peer
    print_table(results, ratio_rows, peer, log)
    if to_stdout:
        json.dump(out, sys.stdout, indent=2)
        print()
    elif args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        log(f"wrote {args.json}")
    return out


def print_table(results: list[dict], ratio_rows: list[dict], peer: dict | None, log) -> None:
    def fmt(row, key, spec):
        return spec.format(row[key]) if row.get(key) is not None else "-"

    log("")
    log(
        f"{'benchmark':28s} {'batch':>5s} {'ms/iter':>10s} {'samples/s':>10s} {'params':>11s} {'GFLOP/it':>9s} "
        f"{'GFLOP/s':>8s} {'%mm':>5s}"
    )
    for row in results:
        frac = row.get("fraction_of_fp32_mm_ceiling")
        log(
            f"{row['name']:28s} {fmt(row, 'batch', '{}'):>5s} {fmt(row, 'ms_per_iter_median', '{:.1f}'):>10s} "
            f"{fmt(row, 'samples_per_s', '{:.2f}'):>10s} {fmt(row, 'params', '{:,}'):>11s} "
            f"{fmt(row, 'gflop_per_iter', '{:.1f}'):>9s} {fmt(row, 'achieved_gflops', '{:.1f}'):>8s} "
            f"{format(100 * frac, '.0f') if frac else '-':>5s}"
        )
    if not ratio_rows:
        return
    log("")
    log(f"{'ours / reference':28s} {'ratio':>7s} {'target':>8s}  versus")
    for row in ratio_rows:
        target = ""
        if "target_ratio" in row:
            target = f">={row['target_ratio']:g}x" + (" ok" if row["target_met"] else " MISS")
        log(f"{row['name']:28s} {row['ratio']:>6.2f}x {target:>8s}  {row['versus']}")
    if peer is not None:
        mm = next((r for r in peer["results"] if r["name"].startswith("mm_") and "float32" in r["name"]), None)
        if mm:
            log(f"(peer's fp32 matmul ceiling in its run: {mm['achieved_gflops']:.1f} GFLOP/s)")


if __name__ == "__main__":
    with report_user_errors():
        main()
