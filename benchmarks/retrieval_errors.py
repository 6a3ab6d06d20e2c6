#!/usr/bin/env python3
"""Where a CLIP export's text→image retrieval fails on the Shapes val split, by scene kind.

Every val caption queries the whole val gallery (as the CLIP stage's validation does); a hit is a top image of
the query's scene group. Reported:

  1. R@1 per scene kind (single, count, relation), seen and held-out queries apart;
  2. for relation queries whose top image is another relation scene: the fraction whose top image has the two
     objects on the other axis (beside instead of above, or the reverse), the two colours swapped, and other
     shapes than the query's (each object read in the canonical "left of" / "above" order);
  3. how far the text embedding moves when one thing in a relation caption changes: the mean cosine between
     "a <colour> <shape> <relation> a <colour> <shape>" for each val relation scene and the same caption with
     the relation said the other way round (the same scene), on the other axis, with the colours swapped, or
     with the first object's shape or colour changed. A caption whose embedding barely moves for a change cannot
     retrieve the image that change makes.

Prints one JSON object. Example: python benchmarks/retrieval_errors.py --clip-export outputs/demo/export/clip
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from dalle_lightning.data.shapes import COLOURS, SHAPES, canonical_relation
from dalle_lightning.demo import SHAPES_DIR, embed_shapes_val
from dalle_lightning.errors import report_user_errors
from dalle_lightning.export import load_clip_export
from dalle_lightning.models.clip import encode_texts
from dalle_lightning.models.tokenizer import tokenize_prompts

OTHER_AXIS = {"left of": "above", "above": "left of"}
INVERSE = {"left of": "right of", "above": "below"}


def arrangement(meta: dict[str, Any]) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """(axis, first object, second object) of a relation scene, objects as (colour, shape) in canonical order."""
    objects, relation = meta["objects"], meta["relation"]
    first, axis, second = canonical_relation(
        objects[relation["subject"]], relation["relation"], objects[relation["object"]]
    )
    return axis, (first["colour"], first["shape"]), (second["colour"], second["shape"])


def caption_variants(axis: str, a: tuple[str, str], b: tuple[str, str]) -> dict[str, str]:
    """A plain caption of the arrangement, and the same with one thing changed."""

    def say(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
        return f"a {first[0]} {first[1]} {relation} a {second[0]} {second[1]}"

    other_shape = next(shape for shape in SHAPES if shape not in (a[1], b[1]))
    other_colour = next(colour for colour in COLOURS if colour not in (a[0], b[0]))
    return {
        "caption": say(a, axis, b),
        "same_scene_said_inversely": say(b, INVERSE[axis], a),
        "other_axis": say(a, OTHER_AXIS[axis], b),
        "colours_swapped": say((b[0], a[1]), axis, (a[0], b[1])),
        "first_shape_changed": say((a[0], other_shape), axis, b),
        "first_colour_changed": say((other_colour, a[1]), axis, b),
    }


def caption_sensitivity(
    model: Any, tokenizer: Any, arrangements: list[tuple[str, tuple[str, str], tuple[str, str]]]
) -> dict[str, float]:
    """Mean cosine between each plain caption's text embedding and each variant's."""
    variants = [caption_variants(*arrangement) for arrangement in arrangements]
    with torch.no_grad():
        embedded = {
            name: encode_texts(model, *tokenize_prompts(tokenizer, [v[name] for v in variants])) for name in variants[0]
        }
    return {
        name: round((embedded["caption"] * embedding).sum(-1).mean().item(), 4)
        for name, embedding in embedded.items()
        if name != "caption"
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip-export", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=SHAPES_DIR, help="the Shapes shards (the demo's by default)")
    args = parser.parse_args()

    model, tokenizer = load_clip_export(args.clip_export, "--clip-export")
    val = embed_shapes_val(model, tokenizer, args.data)
    meta, groups = val["meta"], val["group_id"]
    top = (val["text_emb"] @ val["image_emb"].T).argmax(1)
    hits = groups[top] == groups

    by_kind: dict[str, list[bool]] = defaultdict(list)
    wrong = defaultdict(int)
    for query, scene in enumerate(meta):
        by_kind[f"{scene['kind']}_{'heldout' if scene['heldout'] else 'seen'}"].append(bool(hits[query]))
        found = meta[top[query]]
        if scene["kind"] != "relation" or hits[query] or found["kind"] != "relation":
            continue
        (axis, a, b), (found_axis, found_a, found_b) = arrangement(scene), arrangement(found)
        wrong["count"] += 1
        wrong["other_axis"] += axis != found_axis
        wrong["colours_swapped"] += (a[0], b[0]) == (found_b[0], found_a[0]) != (found_a[0], found_b[0])
        wrong["other_shapes"] += {a[1], b[1]} != {found_a[1], found_b[1]}
    result = {
        "clip_export": str(args.clip_export),
        "r1": {key: round(sum(v) / len(v), 4) for key, v in sorted(by_kind.items())},
        "queries": {key: len(v) for key, v in sorted(by_kind.items())},
        "wrong_relation_top1": {
            "count": wrong["count"],
            **{
                key: round(wrong[key] / max(wrong["count"], 1), 4)
                for key in ("other_axis", "colours_swapped", "other_shapes")
            },
        },
        "caption_cosine_to_variant": caption_sensitivity(
            model, tokenizer, [arrangement(scene) for scene in meta if scene["kind"] == "relation"]
        ),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    with report_user_errors():
        main()
