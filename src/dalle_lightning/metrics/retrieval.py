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
    """R@K both ways and zero-shot accuracy (each image classified among the distinct captions).

    The gallery is always the whole set; queries are all items, and separately the `heldout` ones and the
    seen ones when both are present, so the held-out figures say how well novel combinations are found
    among everything.
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5), **kwargs):
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        for name in ("image", "text", "group", "caption", "heldout"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self, image: torch.Tensor, text: torch.Tensor, group: torch.Tensor, caption: torch.Tensor, heldout: torch.Tensor
    ) -> None:
        self.image.append(image.float())
        self.text.append(text.float())
        self.group.append(group)
        self.caption.append(caption)
        self.heldout.append(heldout)

    def compute(self) -> dict[str, torch.Tensor]:
        image, text = dim_zero_cat(self.image), dim_zero_cat(self.text)
        group, caption, heldout = dim_zero_cat(self.group), dim_zero_cat(self.caption), dim_zero_cat(self.heldout)
        heldout = heldout.bool()
        sim = text @ image.T  # rows: text queries, columns: the image gallery
        same = group[:, None] == group[None, :]
        hits: dict[str, torch.Tensor] = {}
        for k in self.ks:
            k_eff = min(k, sim.shape[1])
            hits[f"t2i_r{k}"] = same.gather(1, sim.topk(k_eff, dim=1).indices).any(1)
            hits[f"i2t_r{k}"] = same.T.gather(1, sim.T.topk(k_eff, dim=1).indices).any(1)
        # Zero-shot: each image against one text per distinct caption.
        first = _first_occurrences(caption)
        predicted = first[(image @ text[first].T).argmax(1)]
        hits["zeroshot_acc"] = group[predicted] == group
        subsets = {"": torch.ones_like(heldout)}
        if heldout.any() and not heldout.all():
            subsets.update({"_heldout": heldout, "_seen": ~heldout})
        return {
            f"{name}{suffix}": hit[mask].float().mean()
            for name, hit in hits.items()
            for suffix, mask in subsets.items()
        }


def _first_occurrences(values: torch.Tensor) -> torch.Tensor:
    """The index of the first occurrence of each distinct value."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(values.numel(), device=values.device)
    return torch.full_like(unique, values.numel()).scatter_reduce(0, inverse, positions, reduce="amin")
