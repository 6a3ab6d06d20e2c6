"""The unCLIP text-to-image pipeline: CLIP text encoding → prior → decoder → upsampler, from the four exports.

    pipe = UnCLIPPipeline.from_exports(clip="export/clip", prior="export/prior",
                                       decoder="export/decoder", upsampler="export/upsampler")
    out = pipe(["a red circle", "two blue squares"], num_images_per_prompt=4, seed=0)
    out.grid().save("grid.png")

`clip` is the frozen CLIP the stages were trained on: our CLIP export or any transformers CLIP
(`models.clip.load_frozen_clip`; a text-only CLIP, as Karlo ships, serves prompts, not image inputs). Each stage is
the trained module rebuilt from its export (`export.load_stage_export`), so the pipeline samples with exactly the
code and defaults it was trained with; `prior_options`, `decoder_options` and
`upsampler_options` override those defaults (the keyword arguments of `PriorModule.sample`,
`DecoderModule.generate` and `UpsamplerModule.generate`). Because everything passes through the CLIP image
embedding, unCLIP also gives variations of an image, interpolation between images or prompts, text diffs and,
with replacement sampling, inpainting. Outputs are images in [-1, 1] on the CPU.

Embeddings pass between the steps L2-normalised ("unit", `models.clip.EMBEDDING_CONVENTIONS`); a stage trained on
another convention (its `embedding_convention`, recorded in its export's manifest) gets them converted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from dalle_lightning.errors import UserError
from dalle_lightning.export import check_exports, load_stage_export
from dalle_lightning.models.clip import FrozenClip, load_frozen_clip, match_convention
from dalle_lightning.visualize import captioned_grid, to_pil

PromptFilter = Callable[[str], bool]
ImageFilter = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
ImageInput = torch.Tensor | Image.Image | str | Path


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit vectors `a` and `b` (…, D); the result is unit length."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    mixed = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return F.normalize(mixed, dim=-1)


def images_to_tensor(images: Sequence[ImageInput] | torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Images (files, PIL images, or (3, H, W) tensors in [-1, 1]) → one (N, 3, S, S) tensor in [-1, 1],
    resized to `size` when given (else all must share one size)."""
    if torch.is_tensor(images):
        images = list(images) if images.ndim == 4 else [images]
    tensors = []
    for image in images:
        if isinstance(image, str | Path):
            if not Path(image).is_file():
                raise UserError(f"image '{image}' does not exist: give paths of image files")
            image = Image.open(image)
        if isinstance(image, Image.Image):
            if size is not None:
                image = image.convert("RGB").resize((size, size), Image.BICUBIC)
            image = torch.from_numpy(np.array(to_pil(image))).permute(2, 0, 1).float() / 127.5 - 1
        elif size is not None and image.shape[-1] != size:
            image = F.interpolate(image[None].float(), size=(size, size), mode="bicubic", antialias=True)[0]
        tensors.append(image.float().clamp(-1, 1))
    if len({t.shape for t in tensors}) > 1:
        raise UserError(f"images of different sizes {sorted({tuple(t.shape[1:]) for t in tensors})}: give a size")
    return torch.stack(tensors)


@dataclass
class PipelineOutput:
    """Generated images (N, 3, H, W) in [-1, 1], the image embeddings they were decoded from, a caption per
    image, and per image what withheld it (None, "prompt" or "image": withheld images are black)."""

    images: torch.Tensor
    image_embeds: torch.Tensor
    captions: list[str]
    filtered: list[str | None] = field(default_factory=list)

    def pil(self) -> list[Image.Image]:
        return [to_pil(image) for image in self.images]

    def grid(self, cell: int = 96) -> Image.Image:
        """A captioned grid: consecutive images with the same caption share a row."""
        rows: list[tuple[str, list[torch.Tensor]]] = []
        for caption, image in zip(self.captions, self.images):
            if rows and rows[-1][0] == caption:
                rows[-1][1].append(image)
            else:
                rows.append((caption, [image]))
        return captioned_grid(rows, cell=cell)


class UnCLIPPipeline:
    """Prompts → images with the four trained stages; the upsampler is optional (images then come at the
    decoder's size). Filters are off unless given (see `dalle_lightning.filters`)."""

    def __init__(
        self,
        clip: FrozenClip,
        prior,
        decoder,
        upsampler=None,
        prompt_filter: PromptFilter | None = None,
        image_filter: ImageFilter | None = None,
        prior_options: Mapping[str, Any] | None = None,
        decoder_options: Mapping[str, Any] | None = None,
        upsampler_options: Mapping[str, Any] | None = None,
    ):
        self.clip, self.prior, self.decoder, self.upsampler = clip, prior, decoder, upsampler
        self.prompt_filter, self.image_filter = prompt_filter, image_filter
        self.prior_options = {k: v for k, v in (prior_options or {}).items() if v is not None}
        self.decoder_options = {k: v for k, v in (decoder_options or {}).items() if v is not None}
        self.upsampler_options = {k: v for k, v in (upsampler_options or {}).items() if v is not None}
        width = clip.projection_dim
        if prior.embedding_dim != width or decoder.embedding_dim != width:
            raise UserError(
                f"the exports do not fit together: CLIP embeddings are {width}-wide, the prior makes "
                f"{prior.embedding_dim}, the decoder takes {decoder.embedding_dim}: train them on the same CLIP"
            )
        if upsampler is not None and upsampler.low_res_size != decoder.image_size:
            raise UserError(
                f"the decoder makes {decoder.image_size} px images but the upsampler takes {upsampler.low_res_size} px "
                "inputs: use an upsampler trained for the decoder's size, or none (upsampler=null)"
            )

    @classmethod
    def from_exports(
        cls,
        clip: str | Path,
        prior: str | Path,
        decoder: str | Path,
        upsampler: str | Path | None = None,
        device: str | torch.device | None = None,
        option_prefix: str = "",
        **options: Any,
    ) -> UnCLIPPipeline:
        """Load the stages from their export folders (`export/<stage>` after `train.py stage=<stage>`) and the
        frozen CLIP they were trained on (`clip`: see `load_frozen_clip`); errors name the argument as
        `<option_prefix><stage>` (e.g. the config key `exports.prior`)."""
        check_exports({"clip": clip, "prior": prior, "decoder": decoder, "upsampler": upsampler}, option_prefix)
        frozen = load_frozen_clip(clip, f"{option_prefix}clip", text=True, image=None)
        stages = {  # the stages share the pipeline's CLIP
            name: load_stage_export(path, name, clip=frozen, option=f"{option_prefix}{name}")
            for name, path in (("prior", prior), ("decoder", decoder), ("upsampler", upsampler))
            if path is not None
        }
        pipe = cls(frozen, stages["prior"], stages["decoder"], stages.get("upsampler"), **options)
        return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def to(self, device: str | torch.device) -> UnCLIPPipeline:
        for model in (self.clip, self.prior, self.decoder, self.upsampler):
            if model is not None:
                model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def image_size(self) -> int:
        """The side of the images the pipeline makes."""
        return self.upsampler.image_size if self.upsampler is not None else self.decoder.image_size

    def blocked(self, prompt: str) -> bool:
        """Whether the prompt filter (if any) refuses the prompt."""
        return bool(self.prompt_filter and self.prompt_filter(prompt))

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(int(seed))

    # --- embeddings ----------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.clip.tokenize(prompts)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP text embeddings."""
        return self.clip.encode_texts(*self.tokenize(prompts))

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings of images (any size: the CLIP's preprocessing resizes them)."""
        return self.clip.encode_images(images_to_tensor(images).to(self.device))

    @torch.no_grad()
    def prior_embeddings(self, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """L2-normalised image embeddings the prior samples for the prompts (best of its candidates)."""
        convention = _convention(self.prior)
        ids, mask = self.tokenize(prompts)
        batch = {"txt_emb": self.clip.encode_texts(ids, mask, normalize=convention == "unit"), "txt_ids": ids}
        return match_convention(self.prior.sample(batch, generator=generator, **self.prior_options), convention, "unit")

    # --- decoding ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(
        self,
        image_embeds: torch.Tensor,
        prompts: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        same_noise: bool = False,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Images for L2-normalised image embeddings: decoder (with the prompts' tokens when it reads text; the
        embeddings in the decoder's convention), then upsampler. `same_noise` starts every image from the same
        noise (smooth interpolation strips); `known = (images, masks)` at the output size inpaints where the mask
        is 1."""
        n = image_embeds.shape[0]
        ids = self.tokenize(prompts)[0] if prompts is not None and self.decoder.text_tokens else None
        size = self.decoder.image_size
        noise = self._shared_noise(n, size, generator) if same_noise else None
        low_known = None
        if known is not None:  # the decoder inpaints at its own size; the mask grows to cover partial pixels
            images, masks = known
            scale = images.shape[-1] // size
            low_known = (F.avg_pool2d(images, scale), F.max_pool2d(masks, scale)) if scale > 1 else known
        image_embeds = match_convention(
            image_embeds, "unit", _convention(self.decoder), getattr(self.decoder, "raw_norm", None)
        )
        images = self.decoder.generate(
            image_embeds, ids, generator=generator, noise=noise, known=low_known, **self.decoder_options
        )
        if self.upsampler is not None:
            noise = self._shared_noise(n, self.upsampler.image_size, generator) if same_noise else None
            images = self.upsampler.generate(images, generator=generator, noise=noise, **self.upsampler_options)
        if known is not None:  # keep every unmasked pixel exactly as it was
            images = known[1] * images + (1 - known[1]) * known[0]
        return images

    def _shared_noise(self, n: int, size: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn((1, 3, size, size), generator=generator, device=self.device).expand(n, -1, -1, -1)

    def _finish(self, images: torch.Tensor, embeds: torch.Tensor, captions: list[str], blocked: list[bool]):
        images, filtered = images.float().cpu(), ["prompt" if b else None for b in blocked]
        if self.image_filter is not None:
            flagged = self.image_filter(images, captions)
            for i in torch.as_tensor(flagged).nonzero().flatten().tolist():
                filtered[i] = filtered[i] or "image"
        for i, reason in enumerate(filtered):
            if reason:
                images[i] = -1.0  # black
        return PipelineOutput(images, embeds.float().cpu(), captions, filtered)

    # --- what unCLIP can do ----------------------------------------------------------------------------------

    def __call__(
        self,
        prompts: str | Sequence[str],
        num_images_per_prompt: int = 1,
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = True,
    ) -> PipelineOutput:
        """Text to image: `num_images_per_prompt` images per prompt, in prompt order, seeded."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        captions = [p for p in prompts for _ in range(num_images_per_prompt)]
        blocked = [self.blocked(p) for p in captions]
        allowed = [c for c, b in zip(captions, blocked) if not b]
        generator = self.generator(seed)
        images = torch.full((len(captions), 3, self.image_size, self.image_size), -1.0)
        embeds = torch.zeros(len(captions), self.clip.projection_dim)
        made_images, made_embeds = [], []
        for part in _batches(allowed, batch_size, progress, "text → image"):
            made_embeds.append(self.prior_embeddings(part, generator))
            made_images.append(self.decode(made_embeds[-1], part, generator).cpu())
        if allowed:
            keep = torch.tensor([not b for b in blocked])
            images[keep], embeds[keep] = torch.cat(made_images), torch.cat(made_embeds).cpu()
        return self._finish(images, embeds, captions, blocked)

    @torch.no_grad()
    def variations(
        self, images: Sequence[ImageInput] | torch.Tensor, num_variations: int = 4, seed: int = 0
    ) -> PipelineOutput:
        """New images with the same CLIP image embedding as each given image (its "gist")."""
        embeds = self.image_embeddings(images).repeat_interleave(num_variations, 0)
        captions = [f"variation of image {i // num_variations}" for i in range(len(embeds))]
        out = self.decode(embeds, generator=self.generator(seed))
        return self._finish(out, embeds, captions, [False] * len(captions))

    def _endpoint(self, item: str | ImageInput, generator: torch.Generator) -> tuple[torch.Tensor, str]:
        if isinstance(item, str) and not _is_file(item):  # a prompt: the prior's embedding for it
            if self.blocked(item):
                raise UserError(f"the prompt '{item}' is blocked by the prompt filter")
            return self.prior_embeddings([item], generator)[0], item
        return self.image_embeddings([item])[0], "image"

    @torch.no_grad()
    def interpolate(self, start: str | ImageInput, end: str | ImageInput, steps: int = 5, seed: int = 0):
        """`steps` images along the slerp between the image embeddings of `start` and `end` (prompts or
        images), all from the same noise, so only the embedding changes along the strip."""
        if steps < 2:
            raise UserError(f"interpolation needs at least 2 steps, got {steps}")
        generator = self.generator(seed)
        (a, a_name), (b, b_name) = self._endpoint(start, generator), self._endpoint(end, generator)
        fractions = torch.linspace(0, 1, steps, device=self.device)[:, None]
        embeds = slerp(a[None], b[None], fractions)
        out = self.decode(embeds, generator=generator, same_noise=True)
        captions = [f"{a_name} → {b_name}"] * steps
        return self._finish(out, embeds, captions, [False] * steps)

    @torch.no_grad()
    def text_diff(
        self,
        image: ImageInput,
        source: str,
        target: str,
        amounts: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5),
        seed: int = 0,
    ) -> PipelineOutput:
        """DALL-E 2's text diffs: move the image's embedding towards the normalised difference of the
        target and source captions' text embeddings (slerp by each amount), from the same noise."""
        if self.blocked(target):
            raise UserError(f"the prompt '{target}' is blocked by the prompt filter")
        image_embed = self.image_embeddings([image])
        texts = self.text_embeddings([source, target])
        direction = F.normalize(texts[1] - texts[0], dim=-1)[None]
        embeds = slerp(image_embed, direction, torch.tensor(amounts, device=self.device)[:, None].float())
        out = self.decode(embeds, generator=self.generator(seed), same_noise=True)
        captions = [f"{source} → {target}"] * len(amounts)
        return self._finish(out, embeds, captions, [False] * len(amounts))

    @torch.no_grad()
    def inpaint(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        masks: torch.Tensor,
        prompts: Sequence[str] | None = None,
        seed: int = 0,
    ) -> PipelineOutput:
        """Regenerate where `masks` (N, 1, S, S) or (N, S, S) is 1 and keep every other pixel, guided by the
        prompts (through the prior) or, without prompts, by each image's own embedding."""
        images = images_to_tensor(images).to(self.device)
        if images.shape[-1] != self.image_size:
            raise UserError(
                f"inpainting takes images at the pipeline's output size, {self.image_size} px, got "
                f"{images.shape[-1]} px: resize the image first"
            )
        masks = masks.to(self.device, torch.float32)
        masks = masks[:, None] if masks.ndim == 3 else masks
        if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            raise UserError(f"masks of shape {tuple(masks.shape)} do not match images of {tuple(images.shape)}")
        generator = self.generator(seed)
        if prompts is not None:
            prompts = list(prompts)
            blocked = [self.blocked(p) for p in prompts]
            if any(blocked):
                raise UserError("a prompt is blocked by the prompt filter: " + prompts[blocked.index(True)])
            embeds, captions = self.prior_embeddings(prompts, generator), [f"inpainted: {p}" for p in prompts]
        else:
            embeds, captions = self.image_embeddings(images), ["inpainted"] * images.shape[0]
        out = self.decode(embeds, prompts, generator, known=(images, (masks > 0.5).float()))
        return self._finish(out, embeds, captions, [False] * len(captions))


def _convention(stage: Any) -> str:
    """The embedding convention a stage module was trained on ("unit" unless it says otherwise)."""
    return getattr(stage, "embedding_convention", "unit")


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except OSError:  # e.g. a long prompt is not a valid file name
        return False


def _batches(items: list[str], batch_size: int, progress: bool, desc: str) -> Iterator[list[str]]:
    with tqdm(total=len(items), disable=not progress, desc=desc, unit="img") as bar:
        for start in range(0, len(items), batch_size):
            part = items[start : start + batch_size]
            yield part
            bar.update(len(part))
