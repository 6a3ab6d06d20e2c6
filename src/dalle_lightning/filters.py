"""Optional content filters for the text-to-image pipeline: off unless the user asks for them.

A prompt filter is any `Callable[[str], bool]` returning True for a prompt that must not be drawn; an image
filter any `Callable[[images, prompts], bool tensor]` returning True for images that must not be shown.
What the pipeline withholds it replaces with a black image and names in `PipelineOutput.filtered`
(the convention of diffusers' safety checker), so a batch never fails because of one prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from dalle_lightning.errors import UserError
from dalle_lightning.models.clip import FrozenClip


class PromptBlocklist:
    """Blocks prompts containing any listed word or phrase (whole words, case-insensitive). The file holds
    one entry per line; blank lines and lines starting with `#` are ignored."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"prompt blocklist '{path}' does not exist: give a text file with one phrase per line")
        phrases = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        phrases = [p for p in phrases if p and not p.startswith("#")]
        alternatives = "|".join(re.escape(p) for p in phrases)
        self.pattern = re.compile(rf"\b(?:{alternatives})\b", re.I) if phrases else None

    def __call__(self, prompt: str) -> bool:
        return bool(self.pattern and self.pattern.search(prompt))


class ConceptFilter:
    """Withholds images whose CLIP image embedding is at least `threshold` cosine-similar to the text
    embedding of any listed concept (as DALL-E 2's and Stable Diffusion's safety checkers do with their
    CLIPs). Uses the pipeline's own CLIP, so the threshold must be tuned for that CLIP."""

    def __init__(self, clip: FrozenClip, concepts: Sequence[str], threshold: float):
        if not concepts:
            raise UserError("the image filter needs at least one concept (filters.image_concepts=[...])")
        self.clip, self.threshold = clip, float(threshold)
        ids, mask = clip.tokenize(concepts)
        self.concepts = clip.encode_texts(ids.to(clip.device), mask.to(clip.device))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        embeddings = self.clip.encode_images(images.to(self.clip.device))
        return (embeddings @ self.concepts.to(embeddings.device).T).amax(1).cpu() >= self.threshold
