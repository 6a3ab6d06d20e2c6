"""The unCLIP text-to-image pipeline: CLIP text encoding → prior → decoder → upsampler, from the four exports.

    pipe = UnCLIPPipeline.from_exports(clip="export/clip", prior="export/prior",
                                       decoder="export/decoder", upsampler="export/upsampler")
    out = pipe(["a red circle", "two blue squares"], num_images_per_prompt=4, seed=0)
    out.grid().save("grid.png")

`clip` is the frozen CLIP the stages were trained on: our CLIP export or any transformers CLIP
(`models.clip.load_frozen_clip`; a text-only CLIP, as Karlo ships, serves prompts, not image inputs), one copy
shared by the stages. Each stage is the trained module rebuilt from its export (`loading.load_stage_export`), so
the pipeline samples with exactly the code and defaults it was trained with (or, `from_pretrained`, the networks
of a diffusers `UnCLIPPipeline` folder such as Karlo's, run as our Karlo-structured stages); `prior_options`,
`decoder_options` and `upsampler_options` override those defaults (the keyword arguments of `PriorModule.sample`,
`DecoderModule.generate` and `UpsamplerModule.generate`). Because everything passes through the CLIP image
embedding, unCLIP also gives variations of an image, interpolation between images or prompts, text diffs, and
editing: inpainting and outpainting, with a decoder trained to edit (`model.decoder.inpainting=true`) or by
replacement sampling with any other. Outputs are images in [-1, 1] on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from dalle_lightning.diffusion.masks import next_window
from dalle_lightning.errors import UserError
from dalle_lightning.export import check_exports
from dalle_lightning.loading import load_stage_export
from dalle_lightning.models.clip import FrozenClip, load_frozen_clip
from dalle_lightning.visualize import captioned_grid, to_pil

UNCLIP_LAYOUT = (
    "a diffusers UnCLIPPipeline folder in Karlo's layout (prior/, decoder/ + text_proj/, super_res_first/), as "
    "kakaobrain/karlo-v1-alpha ships and export.py format=diffusers writes"
)

PromptFilter = Callable[[str], bool]
ImageFilter = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
ImageInput = torch.Tensor | Image.Image | str | Path
Extension = Sequence[int | float] | int | float


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
            image = open_image(image, "image")
        if isinstance(image, Image.Image):
            if size is not None:
                image = image.convert("RGB").resize((size, size), Image.BICUBIC)
            image = torch.from_numpy(np.array(to_pil(image))).permute(2, 0, 1).float() / 127.5 - 1
        elif image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"an image tensor of shape {tuple(image.shape)}: give (3, H, W) RGB tensors in [-1, 1]")
        elif size is not None and image.shape[-1] != size:
            image = F.interpolate(image[None].float(), size=(size, size), mode="bicubic", antialias=True)[0]
        tensors.append(image.float().clamp(-1, 1))
    if len({t.shape for t in tensors}) > 1:
        raise UserError(f"images of different sizes {sorted({tuple(t.shape[1:]) for t in tensors})}: give a size")
    return torch.stack(tensors)


def open_image(path: str | Path, what: str) -> Image.Image:
    """The image file at `path`, fully read; a one-line error for a missing file or one Pillow cannot read."""
    if not Path(path).is_file():
        raise UserError(f"{what} '{path}' does not exist: give the path of an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{what} '{path}' is not an image Pillow can read ({err}): give a PNG or JPEG file") from None


def extension_pixels(extend: Extension, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in pixels of an image of side `size`, from four values (or one for every
    side), each a number of pixels (int) or a fraction of the side (float)."""
    values = list(extend) if isinstance(extend, Sequence) else [extend] * 4
    if len(values) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise UserError(f"extend={extend}: give [left, top, right, bottom], pixels (16) or fractions of the side (0.5)")
    if any(v < 0 for v in values):
        raise UserError(f"extend={list(values)}: extensions cannot be negative (crop the image instead)")
    pixels = tuple(v if isinstance(v, int) else round(v * size) for v in values)
    if not any(pixels):
        raise UserError(f"extend={list(values)} adds no pixel to a {size} px image: nothing to generate")
    return pixels


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
        if prior.normalize_embeddings != decoder.normalize_embeddings:
            raise UserError(
                "the exports do not fit together: the prior makes "
                f"{'L2-normalised' if prior.normalize_embeddings else 'unnormalised'} image embeddings, the decoder "
                f"takes {'L2-normalised' if decoder.normalize_embeddings else 'unnormalised'} ones: train them with "
                "the same normalize_embeddings"
            )
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
        """Load the stages from their export folders (`export/<stage>` after `train.py stage=<stage>`); errors
        name the argument as `<option_prefix><stage>` (e.g. the config key `exports.prior`)."""
        check_exports({"clip": clip, "prior": prior, "decoder": decoder, "upsampler": upsampler}, option_prefix)
        frozen = load_frozen_clip(clip, f"{option_prefix}clip", text=True, image=None)
        stages = {
            name: load_stage_export(path, name, clip=frozen, option=f"{option_prefix}{name}")
            for name, path in (("prior", prior), ("decoder", decoder), ("upsampler", upsampler))
            if path is not None
        }
        pipe = cls(frozen, stages["prior"], stages["decoder"], stages.get("upsampler"), **options)
        return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        presets: Mapping[str, Mapping[str, Any]],
        clip: str | Path | None = None,
        upsampler: bool = True,
        device: str | torch.device | None = None,
        option: str = "karlo",
        **options: Any,
    ) -> UnCLIPPipeline:
        """A diffusers `UnCLIPPipeline` folder (Karlo's layout: `prior/`, `decoder/` + `text_proj/`,
        `super_res_first/`; kakaobrain/karlo-v1-alpha, or what export.py writes) run as our stages: each built
        from its preset (`presets["prior" | "decoder" | "upsampler"]`, what `conf/model/<stage>/karlo.yaml` holds:
        sampling defaults, conventions) with `pretrained=folder`, on the frozen CLIP the folder's networks were
        trained with: `clip` (see `load_frozen_clip`), by default the folder's own `text_encoder/` + `tokenizer/`.
        Image sizes come from the folder."""
        from dalle_lightning.models.pretrained import component_folder, read_config
        from dalle_lightning.stages.decoder import KarloDecoderModule
        from dalle_lightning.stages.prior import PriorModule
        from dalle_lightning.stages.upsampler import KarloUpsamplerModule

        clip = folder if clip is None else clip
        check_exports({"clip": clip}, "exports.")
        frozen = load_frozen_clip(clip, "exports.clip", text=True, image=None)

        def sample_size(component: str, class_name: str) -> int:
            path = component_folder(folder, component, class_name, option, UNCLIP_LAYOUT)
            return int(read_config(path, option)["sample_size"])

        size = sample_size("decoder", "UNet2DConditionModel")
        common = {"clip": frozen, "optim": {}}
        prior = PriorModule({**presets["prior"], "pretrained": str(folder), "embedding_dim": None}, **common)
        decoder = KarloDecoderModule({**presets["decoder"], "pretrained": str(folder), "image_size": size}, **common)
        high = None
        if upsampler:
            model = {**presets["upsampler"], "pretrained": str(folder), "low_res_size": size, "train_crop": None}
            model["image_size"] = sample_size("super_res_first", "UNet2DModel")
            high = KarloUpsamplerModule(model, **common)
        stages = [module.eval().requires_grad_(False) for module in (prior, decoder, high) if module is not None]
        pipe = cls(frozen, *stages, **options)
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
        """CLIP image embeddings of images (any size: CLIP resizes them), L2-normalised if the decoder takes them so."""
        pixels = images_to_tensor(images).to(self.device)
        return self.clip.encode_images(pixels, normalize=self.decoder.normalize_embeddings)

    @torch.no_grad()
    def prior_embeddings(self, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Image embeddings the prior samples for the prompts (best of its candidates)."""
        ids, mask = self.tokenize(prompts)
        batch = {
            "txt_emb": self.clip.encode_texts(ids, mask, normalize=self.prior.normalize_embeddings),
            "txt_ids": ids,
        }
        return self.prior.sample(batch, generator=generator, **self.prior_options)

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
        """Images for image embeddings: decoder (with the prompts' tokens when it reads text), then upsampler.
        `same_noise` starts every image from the same noise (smooth interpolation strips); `known = (images,
        holes)` at the output size generates where the holes are 1 and keeps every other pixel: the decoder
        edits as it was trained to (`DecoderModule.generate`), the upsampler keeps them by replacement."""
        n = image_embeds.shape[0]
        ids = self.tokenize(prompts)[0] if prompts is not None and self.decoder.text_tokens else None
        size = self.decoder.image_size
        noise = self._shared_noise(n, size, generator) if same_noise else None
        low_known = None
        if known is not None:  # the decoder inpaints at its own size; the mask grows to cover partial pixels
            images, masks = known
            scale = images.shape[-1] // size
            low_known = (F.avg_pool2d(images, scale), F.max_pool2d(masks, scale)) if scale > 1 else known
        images = self.decoder.generate(
            image_embeds, ids, generator=generator, noise=noise, known=low_known, **self.decoder_options
        )
        if self.upsampler is not None:
            noise = self._shared_noise(n, self.upsampler.image_size, generator) if same_noise else None
            images = self.upsampler.generate(
                images, generator=generator, noise=noise, known=known, **self.upsampler_options
            )
        if known is not None:  # keep every unmasked pixel exactly as it was
            images = known[1] * images + (1 - known[1]) * known[0]
        return images

    def _with_norm(self, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Unit embeddings (a slerp's) at `norm` for a decoder that takes embeddings as CLIP projects them."""
        return unit if self.decoder.normalize_embeddings else unit * norm

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
        embeds = self._with_norm(slerp(a[None], b[None], fractions), torch.lerp(a.norm(), b.norm(), fractions))
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
        embeds = self._with_norm(embeds, image_embed.norm(dim=-1, keepdim=True))
        out = self.decode(embeds, generator=self.generator(seed), same_noise=True)
        captions = [f"{source} → {target}"] * len(amounts)
        return self._finish(out, embeds, captions, [False] * len(amounts))

    def _edit_inputs(self, images: Sequence[ImageInput] | torch.Tensor, mode: str) -> torch.Tensor:
        images = images_to_tensor(images).to(self.device)
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise UserError(
                f"{mode} takes square images at the pipeline's output size, {self.image_size} px, got "
                f"{images.shape[-1]}x{images.shape[-2]} px: resize (or crop) the image first"
            )
        return images

    def _edit_embeddings(
        self, images: torch.Tensor, prompts: Sequence[str] | None, generator: torch.Generator, mode: str
    ) -> tuple[torch.Tensor, list[str]]:
        """The embeddings that steer the generated region: the prior's for the prompts, else each image's own."""
        if prompts is None:
            return self.image_embeddings(images), [mode] * images.shape[0]
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise UserError(f"{mode}: one prompt per image or none, got {len(prompts)} for {images.shape[0]}")
        blocked = [self.blocked(p) for p in prompts]
        if any(blocked):
            raise UserError("a prompt is blocked by the prompt filter: " + prompts[blocked.index(True)])
        return self.prior_embeddings(prompts, generator), [f"{mode}: {p}" for p in prompts]

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
        images = self._edit_inputs(images, "inpainting")
        masks = masks.to(self.device, torch.float32)
        masks = masks[:, None] if masks.ndim == 3 else masks
        if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
            raise UserError(f"masks of shape {tuple(masks.shape)} do not match images of {tuple(images.shape)}")
        holes = (masks > 0.5).float()
        covered = holes.flatten(1).mean(1)
        if (covered == 0).any():
            raise UserError("a mask selects no pixel: nothing to inpaint (white, or 1, marks what to regenerate)")
        if (covered == 1).any():
            raise UserError("a mask covers the whole image: nothing is kept; use text to image or variations")
        generator = self.generator(seed)
        embeds, captions = self._edit_embeddings(images, prompts, generator, "inpainted")
        out = self.decode(embeds, prompts, generator, known=(images, holes))
        return self._finish(out, embeds, captions, [False] * len(captions))

    @torch.no_grad()
    def outpaint(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        extend: Extension,
        prompts: Sequence[str] | None = None,
        seed: int = 0,
        max_new: float = 0.5,
    ) -> PipelineOutput:
        """Extend images beyond their borders by `extend` = [left, top, right, bottom] (pixels, or fractions of
        the side; one value: every side), keeping every original pixel, guided by the prompts (through the prior)
        or each image's own embedding. The canvas is filled one window of the pipeline's size at a time, each
        at most `max_new` new (`masks.next_window`), so an extension of any size goes in steps: extend, move the
        window outwards, extend. Images come at (S + top + bottom) x (S + left + right)."""
        images = self._edit_inputs(images, "outpainting")
        size = self.image_size
        left, top, right, bottom = extension_pixels(extend, size)
        generator = self.generator(seed)
        embeds, captions = self._edit_embeddings(images, prompts, generator, "outpainted")
        n, height, width = images.shape[0], size + top + bottom, size + left + right
        canvas = torch.zeros((n, 3, height, width), device=self.device)
        canvas[..., top : top + size, left : left + size] = images
        hole = torch.ones((height, width), device=self.device)
        hole[top : top + size, left : left + size] = 0
        while hole.any():
            y, x = next_window(hole, size, (top, left), max_new)
            window = (..., slice(y, y + size), slice(x, x + size))
            holes = hole[window][None, None].expand(n, -1, -1, -1)
            canvas[window] = self.decode(embeds, prompts, generator, known=(canvas[window], holes))
            hole[window] = 0
        return self._finish(canvas, embeds, captions, [False] * n)


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
