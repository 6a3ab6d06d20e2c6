"""Does a CLIP export see shape apart from colour? Linear probes on Shapes, seen vs held-out colour-shape pairs.

Held-out retrieval and the chain's held-out prompts need the CLIP to know a red circle is a circle although it
never saw a red one. This script asks that of the embeddings the later stages use:

  1. the single- and count-object scenes of the Shapes shards (`<data>/train/*.tar`, `<data>/val/*.tar`), read
     with the datamodule's safe decoders; label = the objects' shape;
  2. image probe: a multinomial logistic regression on the CLIP image embeddings of `--num-train` training
     images, scored on the val images of seen pairs and of held-out pairs (pairs the training split never has);
  3. text probe: the same on the text embeddings of the scenes' captions;
  4. `nearest_neighbours`: the most common shape among the 10 training scenes whose embeddings are most
     cosine-similar. No linear read-out is assumed, so on seen pairs this is about the most shape a later stage
     can take from the embedding: the decoder's reconstructions cannot draw a shape the embedding confuses with
     another (the demo CLIP: 0.64 of seen single- and count-object scenes, 0.0 of held-out ones).

Chance is 0.2 (5 shapes). A held-out accuracy near the seen one means shape is encoded independently of colour;
near or below chance means the encoder learned colour-shape pairs as units, and a held-out pair reads as one of
the seen pairs of its colour.

The plain probe can be misled by colour: in the training split a colour never comes with its held-out shape (no
red circle), so where the embedding also carries colour, "red" is evidence against "circle" and vetoes it on the
held-out pair even if the shape is encoded apart. `colour_removed` repeats the probe after projecting out the
directions of the per-colour means of the training embeddings, so that only what is left of shape is scored.

Prints one JSON object. Example: python -m experiments.shape_probe --clip-export outputs/demo/export/clip
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import webdataset as wds

from dalle_lightning.data.decode import decode_caption, decode_image, decode_json
from dalle_lightning.data.shards import expand_shards
from dalle_lightning.errors import report_user_errors
from dalle_lightning.models.clip import load_frozen_clip
from dalle_lightning.shapes.dataset import COLOURS, SHAPES


class Scenes(NamedTuple):
    """One-shape scenes: images in [-1, 1], captions, and per scene its shape and colour index and held-out flag."""

    pixels: torch.Tensor
    captions: list[str]
    shapes: torch.Tensor
    heldout: torch.Tensor
    colours: torch.Tensor


def read_scenes(pattern: str, limit: int, size: int) -> Scenes:
    """Up to `limit` single- and count-object scenes of the shards, in shard order."""
    images, captions, labels, heldout, colours = [], [], [], [], []
    source = wds.WebDataset(expand_shards(pattern), shardshuffle=False, empty_check=False)
    for sample in source:
        meta = decode_json(sample.get("json"))
        if meta.get("kind") not in ("single", "count"):
            continue
        image = decode_image(sample["jpg"], size, min_size=size)
        images.append(torch.from_numpy(image.copy()).permute(2, 0, 1))
        captions.append(decode_caption(sample.get("txt")))
        labels.append(SHAPES.index(meta["objects"][0]["shape"]))
        heldout.append(bool(meta.get("heldout")))
        colours.append(list(COLOURS).index(meta["objects"][0]["colour"]))
        if len(labels) >= limit:
            break
    pixels = torch.stack(images).float() / 127.5 - 1
    return Scenes(pixels, captions, torch.tensor(labels), torch.tensor(heldout), torch.tensor(colours))


def probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Predicted labels of `test` by an L2-regularised logistic regression fitted on standardised `train`."""
    torch.manual_seed(0)  # the classifier's initialisation: the same figures on every run
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    linear = torch.nn.Linear(train.shape[1], len(SHAPES))
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(train), train_labels) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return linear(test).argmax(1)


def nearest_neighbour_shapes(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, k: int = 10
) -> torch.Tensor:
    """Per `test` embedding, the most common label of its `k` most similar `train` embeddings (dot product: the
    embeddings are L2-normalised, so cosine)."""
    return train_labels[(test @ train.T).topk(k, dim=1).indices].mode(dim=1).values


def remove_colour(train: torch.Tensor, colours: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`train` and `test` with the span of the per-colour means of `train` (about its mean) projected out."""
    mean = train.mean(0)
    means = torch.stack([train[colours == c].mean(0) - mean for c in colours.unique()])
    basis, _ = torch.linalg.qr(means.T)
    return tuple(x - (x - mean) @ basis @ basis.T for x in (train, test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip-export", default="outputs/demo/export/clip")
    parser.add_argument("--data", default="data/shapes", help="Shapes shards folder (train/ and val/)")
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-val", type=int, default=1000)
    args = parser.parse_args()

    clip = load_frozen_clip(args.clip_export, "--clip-export")
    size = clip.image_size
    data = Path(args.data)
    train = read_scenes(str(data / "train" / "*.tar"), args.num_train, size)
    val = read_scenes(str(data / "val" / "*.tar"), args.num_val, size)

    def features(scenes: Scenes) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.cat([clip.encode_images(chunk) for chunk in scenes.pixels.split(500)])
        return images, clip.encode_texts(*clip.tokenize(scenes.captions))

    (train_images, train_texts), (val_images, val_texts) = features(train), features(val)
    heldout = val.heldout
    report: dict[str, object] = {"clip_export": args.clip_export, "train_scenes": len(train.shapes)}

    def scores(predicted: torch.Tensor) -> dict[str, float]:
        right = (predicted == val.shapes).float()
        return {"seen": round(right[~heldout].mean().item(), 3), "heldout": round(right[heldout].mean().item(), 3)}

    for name, train_x, val_x in (("image", train_images, val_images), ("text", train_texts, val_texts)):
        train_without, val_without = remove_colour(train_x, train.colours, val_x)
        report[name] = {
            **scores(probe(train_x, train.shapes, val_x)),
            "colour_removed": scores(probe(train_without, train.shapes, val_without)),
            "nearest_neighbours": scores(nearest_neighbour_shapes(train_x, train.shapes, val_x)),
            "val_scenes": {"seen": int((~heldout).sum()), "heldout": int(heldout.sum())},
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    with report_user_errors():
        main()
