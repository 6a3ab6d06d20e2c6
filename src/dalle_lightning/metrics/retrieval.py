"""Image↔text retrieval and zero-shot accuracy over a validation set, as one torchmetrics `Metric`.

A hit is an item of the same *group* as the query: the group is the caption itself for ordinary data, and
the canonical scene for Shapes (where "a red circle" and "one red circle" describe the same images, and
many images share one caption). On data with unique captions this is standard R@K.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class RetrievalMetrics(Metric):
    """R@K both ways and zero-shot accuracy (each image classified among the distinct captions), computed
    on all samples and separately on `heldout` ones and seen ones when both are present."""

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5), **kwargs):
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        for name in ("image", "text", "group", "caption", "heldout"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        group: torch.Tensor,
        caption: torch.Tensor,
        heldout: torch.Tensor,
    ) -> None:
        self.image.append(image.float())
        self.text.append(text.float())
        self.group.append(group)
        self.caption.append(caption)
        self.heldout.append(heldout)

    def compute(self) -> dict[str, torch.Tensor]:
        image, text = dim_zero_cat(self.image), dim_zero_cat(self.text)
        group, caption, heldout = (
            dim_zero_cat(self.group),
            dim_zero_cat(self.caption),
            dim_zero_cat(self.heldout),
        )
        subsets = {"": torch.ones_like(heldout, dtype=torch.bool)}
        if heldout.any() and not heldout.all():
            subsets.update({"_heldout": heldout.bool(), "_seen": ~heldout.bool()})
        out: dict[str, torch.Tensor] = {}
        for suffix, mask in subsets.items():
            out.update(
                {
                    f"{k}{suffix}": v
                    for k, v in self._scores(image[mask], text[mask], group[mask], caption[mask]).items()
                }
            )
        return out

    def _scores(self, image, text, group, caption) -> dict[str, torch.Tensor]:
        sim = text @ image.T  # (queries: texts, gallery: images)
        same = group[:, None] == group[None, :]
        scores = {}
        for k in self.ks:
            k_eff = min(k, sim.shape[1])
            top_t2i = sim.topk(k_eff, dim=1).indices
            top_i2t = sim.T.topk(k_eff, dim=1).indices
            scores[f"t2i_r{k}"] = same.gather(1, top_t2i).any(1).float().mean()
            scores[f"i2t_r{k}"] = same.T.gather(1, top_i2t).any(1).float().mean()
        # Zero-shot: each image against one text per distinct caption.
        _, first = _unique_first(caption)
        predicted = first[(image @ text[first].T).argmax(1)]
        scores["zeroshot_acc"] = (group[predicted] == group).float().mean()
        return scores


def _unique_first(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values and the index of each one's first occurrence."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.numel(), device=values.device)
    first = torch.full_like(unique, values.numel()).scatter_reduce(0, inverse, positions, reduce="amin")
    return unique, first
