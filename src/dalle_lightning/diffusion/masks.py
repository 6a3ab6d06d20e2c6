"""Masks for editing: the random holes an editing decoder learns to fill, and the windows outpainting works in.

Convention everywhere: a mask is (N, 1, H, W) float, 1 where the image is to be generated (the hole), 0 where it
is known and kept. An editing decoder trains on holes of four kinds (GLIDE trains its inpainting model on random
erased regions; LaMa showed thick free-form strokes generalise to the masks people draw):

- ``box``: one rectangle (objects, the usual inpainting request);
- ``strokes``: a few thick polylines (free-form brush masks);
- ``border``: bands along one to four sides (what outpainting asks for: the known image on one side);
- ``all``: the whole image, nothing known, so the decoder still generates from nothing (text to image).

The masks are drawn per batch by the stage with its torch generator (as timesteps and noise are), not in the
data pipeline, so they come the same for image and embedding shards and validation draws the same ones each epoch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from dalle_lightning.errors import UserError

MASK_KINDS = ("box", "strokes", "border", "all")
# Sides of a box and widths of a border band, as fractions of the image side.
BOX_SIDE = (0.15, 0.6)
BORDER_WIDTH = (0.1, 0.45)
# Free-form strokes: how many, their vertices, and their thickness and step length in fractions of the side.
STROKES = (1, 4)
STROKE_VERTICES = (3, 8)
STROKE_WIDTH = (0.08, 0.2)
STROKE_STEP = (0.1, 0.35)


def check_mask_weights(weights: Mapping[str, float], option: str = "model.decoder.edit_masks") -> dict[str, float]:
    """The kinds' probabilities (non-negative, normalised); a one-line error for an unknown kind or no weight."""
    unknown = sorted(set(weights) - set(MASK_KINDS))
    if unknown:
        raise UserError(f"{option} has unknown mask kinds {unknown}: use {', '.join(MASK_KINDS)}")
    values = {kind: float(weights.get(kind) or 0.0) for kind in MASK_KINDS}
    total = sum(values.values())
    if any(v < 0 for v in values.values()) or total <= 0:
        raise UserError(f"{option}={dict(weights)}: give each kind a weight >= 0, at least one above 0")
    return {kind: v / total for kind, v in values.items()}


def random_masks(
    n: int,
    size: int,
    weights: Mapping[str, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n, 1, size, size) training holes, each of a kind drawn with `weights` (kind -> probability)."""
    generator = _cpu(generator)
    probs = torch.tensor([check_mask_weights(weights)[k] for k in MASK_KINDS])
    kinds = torch.multinomial(probs, n, replacement=True, generator=generator).tolist()
    draw = {"box": _box, "strokes": _strokes, "border": _border, "all": _everything}
    masks = [draw[MASK_KINDS[k]](size, generator) for k in kinds]
    return torch.stack(masks)[:, None].to(device)


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    # Mask drawing is a few scalars per image: on the CPU even for a CUDA batch, with a CPU generator of the
    # device generator's seed so that a seeded validation draws the same masks each epoch.
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(generator.initial_seed())


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _box(size: int, generator: torch.Generator | None) -> torch.Tensor:
    mask = torch.zeros(size, size)
    h, w = (max(1, round(_uniform(*BOX_SIDE, generator) * size)) for _ in range(2))
    top = int(torch.randint(0, size - h + 1, (), generator=generator))
    left = int(torch.randint(0, size - w + 1, (), generator=generator))
    mask[top : top + h, left : left + w] = 1
    return mask


def _strokes(size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Thick random-walk polylines: each pixel within half the stroke's width of one of its segments."""
    yx = (torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1) + 0.5).view(-1, 2)
    mask = torch.zeros(size * size, dtype=torch.bool)
    for _ in range(int(torch.randint(STROKES[0], STROKES[1] + 1, (), generator=generator))):
        radius = _uniform(*STROKE_WIDTH, generator) * size / 2
        point = torch.rand(2, generator=generator) * size
        angle = _uniform(0, 2 * math.pi, generator)
        for _ in range(int(torch.randint(*STROKE_VERTICES, (), generator=generator))):
            angle += _uniform(-math.pi / 2, math.pi / 2, generator)
            step = _uniform(*STROKE_STEP, generator) * size
            end = (point + step * torch.tensor([math.sin(angle), math.cos(angle)])).clamp(0, size)
            mask |= _distance_to_segment(yx, point, end) <= radius
            point = end
    return mask.view(size, size).float()


def _distance_to_segment(points: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ab = b - a
    t = ((points - a) @ ab / ab.dot(ab).clamp_min(1e-6)).clamp(0, 1)
    return (points - (a + t[:, None] * ab)).norm(dim=-1)


def _border(size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Bands along a random non-empty set of sides (left, top, right, bottom), each of its own width."""
    sides = torch.rand(4, generator=generator) < 0.5
    sides[int(torch.randint(0, 4, (), generator=generator))] = True
    mask = torch.zeros(size, size)
    for side in sides.nonzero().flatten().tolist():
        width = max(1, round(_uniform(*BORDER_WIDTH, generator) * size))
        band = slice(0, width) if side in (0, 1) else slice(size - width, size)
        if side in (0, 2):
            mask[:, band] = 1
        else:
            mask[band] = 1
    return mask


def _everything(size: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.ones(size, size)


# --- outpainting -----------------------------------------------------------------------------------------------


def next_window(hole: torch.Tensor, size: int, origin: tuple[int, int], max_new: float = 0.5) -> tuple[int, int]:
    """(top, left) of the `size` x `size` window of the canvas `hole` (H, W) to generate next, for an image first
    placed at `origin` (top, left). Windows move from there in steps of half a window (clamped to the canvas),
    and the next one has the most hole pixels but at most `max_new` of the window, so each step sees at least
    the rest as context; ties go to the window nearest the image, so it grows outwards. Where no such step is
    left, any window position is considered (one always has a few new rows: a window moved by one pixel
    gains at most one row), so outpainting of any extent ends."""
    fraction = F.avg_pool2d(hole[None, None].float(), size, stride=1)[0, 0]
    lattice = torch.zeros_like(fraction, dtype=torch.bool)
    half = max(1, size // 2)
    rows = {min(max(origin[0] + k * half, 0), hole.shape[0] - size) for k in range(-hole.shape[0], hole.shape[0])}
    cols = {min(max(origin[1] + k * half, 0), hole.shape[1] - size) for k in range(-hole.shape[1], hole.shape[1])}
    lattice[torch.tensor(sorted(rows))[:, None], torch.tensor(sorted(cols))[None, :]] = True
    useful = (fraction > 0) & (fraction <= max_new + 1e-6)
    allowed = useful & lattice if (useful & lattice).any() else useful
    if not allowed.any():
        if not hole.any():
            raise ValueError("the canvas has no hole left to generate")
        allowed = fraction > 0
    best = fraction[allowed].max() if (allowed & useful).any() else fraction[allowed].min()
    tops, lefts = torch.nonzero(allowed & ((fraction - best).abs() < 1e-6), as_tuple=True)
    distance = (tops - origin[0]) ** 2 + (lefts - origin[1]) ** 2
    i = int(distance.argmin())
    return int(tops[i]), int(lefts[i])
