"""Why position is not fitted: on the position twins, does a shape word's matched place follow its
object (the image side of the late matcher's relation geometry), and does the word's predicted
offset point the right way (the text side)?

The late matcher's geometry term (``methods.relation_geometry``, crossalign/methods/late.py) scores
``sum_j w_j * where_j . (at_j - centre)``: it needs both halves right. For every training (or val)
image whose binding twin has two objects' places exchanged, and every caption of it that names
each of the two objects' shapes once (as one word piece), this scores the two shape words:

- ``place_follows_object``: the word's soft-argmax place ``at`` (softmax at the matcher's scale
  over the cells' x in [-1, 1]) moves the way its object moved between the image and its twin
  (the sign of the change; 50 = chance);
- ``best_cell_follows_object``: the same with the word's single best cell;
- ``best_cell_on_object``: the word's best cell is the cell under its object's centre (a 7x7 grid
  at 224 px: 1 of 49; an object covers about 2x2 cells);
- ``object_cell_rank``: the median rank of that cell among the word's similarities (0 = best);
- ``two_words_same_cell``: the two shape words of a caption share their best cell;
- ``place_entropy``: the nats of the word's softmax over the cells (ln 49 = 3.9 is uniform);
- ``offset_order``: the two words' weighted x offsets ``w * where`` are in the objects' order
  (the right object's is larger; a constant offset cancels in the score, so only the order
  counts; per caption, 50 = chance);
- ``geometry_prefers_image``: the geometry term alone scores the caption higher with its image
  than with the twin (per caption, 50 = chance): both halves together.

    python -m bench.grounding --models models/joint/final/seed-0 models/cross_attention/final/seed-0
    python -m bench.grounding --split val --models ...

Reads ``--root``'s ``data/prepared/<split>/`` (word pieces, the generator's object records) and
``data/features/<split>/`` (what the models read). Synthetic data only (it needs the objects'
boxes). Appends to ``bench/results/grounding.json``; prints one JSON line per model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from bench import entry
from crossalign.features.encoders.text import resolve_source
from crossalign.io import load_features, load_npy, read_json
from crossalign.methods import load_aligner
from crossalign.methods.late import LateEncoder
from crossalign.methods.positions import grid_side

OUT = Path(__file__).resolve().parent / "results" / "grounding.json"


def twin_pairs(records: list[dict], n_images: int) -> list[tuple[int, int, list[int]]]:
    """(image row, twin row, the two objects whose places were exchanged) for each position twin
    pair among the first ``n_images`` records, each pair once (from the lower row)."""
    rows = {r.get("id"): i for i, r in enumerate(records)}
    out = []
    for i, record in enumerate(records[:n_images]):
        j = rows.get(record.get("twin_id"))
        if record.get("swap") != "position" or j is None or not i < j < n_images:
            continue
        a = record.get("objects", [])
        b = {_identity(o): o for o in records[j].get("objects", [])}
        # the twin lists its objects by place: the same object is found by what it is
        moved = [k for k, o in enumerate(a) if _identity(o) in b and abs(_centre(o)[0] - _centre(b[_identity(o)])[0]) > 1.0]
        if len(moved) == 2 and len(b) == len(a):
            out.append((i, j, moved))
    return out


def _identity(obj: dict) -> tuple:
    return obj.get("colour"), obj.get("shape"), obj.get("size")


def _centre(obj: dict) -> tuple[float, float]:
    x, y, w, h = obj["bbox"]
    return x + w / 2, y + h / 2


def encoder_of(model) -> LateEncoder | None:
    """The model's late matcher (through trained text layers), None for any other matcher."""
    inner = getattr(model, "inner", model)
    enc = getattr(inner, "encoder", None)
    return enc if isinstance(enc, LateEncoder) else None


def measure(model, root: Path, split: str, n_images: int) -> dict:
    """The grounding numbers of ``model`` on ``split``'s position twins (see the module docstring)."""
    from transformers import AutoTokenizer

    enc = encoder_of(model)
    if enc is None:
        raise ValueError("the model has no late matcher (methods.<m>.matcher: late): nothing has a place to score")
    prepared = root / "data" / "prepared" / split
    records = read_json(prepared / "images.json")
    pieces, offsets = np.asarray(load_npy(prepared / "tokens.npy")), np.asarray(load_npy(prepared / "offsets.npy"))
    feats = load_features(root / "data" / "features" / split)
    size = float(read_json(prepared / "meta.json").get("image_size", 224))
    vocab = AutoTokenizer.from_pretrained(resolve_source("offline"))
    by_image = {}
    for c, i in enumerate(np.asarray(feats.caption_image_index)):
        by_image.setdefault(int(i), []).append(c)
    counts = dict.fromkeys(("place", "best", "on_object", "offset", "geometry", "same_cell"), 0)
    words = captions = 0
    ranks, entropy = [], []
    with torch.no_grad():
        for i, j, moved in twin_pairs(records, n_images):
            im = model.encode_images(torch.tensor(np.asarray(feats.image_tokens[[i, j]]), dtype=torch.float32),
                                     torch.tensor(np.asarray(feats.image_pooled[[i, j]]), dtype=torch.float32))
            regions = im["x_cells"].shape[-2]
            side, xy = grid_side(regions), enc.cell_xy(regions, torch.device("cpu"))
            objects = records[i]["objects"]
            twin_objects = {_identity(o): o for o in records[j]["objects"]}
            for c in by_image.get(i, []):
                text = vocab.convert_ids_to_tokens(pieces[offsets[c]:offsets[c + 1]].tolist())
                at_word = {k: text.index(objects[k]["shape"]) for k in moved if text.count(objects[k]["shape"]) == 1}
                if len(at_word) != 2:
                    continue
                tokens, _ = feats.text.gather([c])  # (1, L, Dt)
                tx = model.encode_texts(torch.tensor(tokens, dtype=torch.float32), torch.ones(1, tokens.shape[1], dtype=torch.bool),
                                        torch.tensor(np.asarray(feats.text_pooled[[c]]), dtype=torch.float32))
                sim = tx["x_tokens"][0] @ im["x_cells"].transpose(-1, -2)  # (2 images, L, R)
                logits = enc.log_scale.exp() * sim
                at = logits.softmax(-1) @ xy  # (2, L, 2): each word's soft place in each image
                captions += 1
                best = [int(sim[0, p].argmax()) for p in at_word.values()]
                counts["same_cell"] += best[0] == best[1]
                if "x_where" in tx:  # a constant offset cancels in the score: the two words' order is what counts
                    pull = {k: float(tx["x_weight"][0, p] * tx["x_where"][0, p, 0]) for k, p in at_word.items()}
                    right, left = sorted(moved, key=lambda k: -_centre(objects[k])[0])
                    counts["offset"] += pull[right] > pull[left]
                    geometry = [float(enc.score({"x_cells": im["x_cells"][n:n + 1]}, {**tx, "x_where": tx["x_where"]})
                                      - enc.score({"x_cells": im["x_cells"][n:n + 1]}, {**tx, "x_where": 0 * tx["x_where"]}))
                                for n in (0, 1)]
                    counts["geometry"] += geometry[0] > geometry[1]
                for (k, p), top in zip(at_word.items(), best):
                    moved_right = _centre(objects[k])[0] > _centre(twin_objects[_identity(objects[k])])[0]
                    counts["place"] += bool(at[0, p, 0] > at[1, p, 0]) == moved_right
                    hard = float(xy[top, 0] - xy[int(sim[1, p].argmax()), 0])
                    counts["best"] += 0.5 if hard == 0 else float((hard > 0) == moved_right)
                    cx, cy = _centre(objects[k])
                    cell = min(side - 1, int(cy / size * side)) * side + min(side - 1, int(cx / size * side))
                    counts["on_object"] += top == cell
                    ranks.append(int((sim[0, p] > sim[0, p, cell]).sum()))
                    entropy.append(float(-(logits[0, p].softmax(-1) * logits[0, p].log_softmax(-1)).sum()))
                    words += 1
    pct = lambda n, d: round(100.0 * n / d, 1) if d else None  # noqa: E731
    return {"split": split, "images": n_images, "captions": captions, "words": words,
            "place_follows_object": pct(counts["place"], words), "best_cell_follows_object": pct(counts["best"], words),
            "best_cell_on_object": pct(counts["on_object"], words),
            "object_cell_rank": float(np.median(ranks)) if ranks else None,
            "two_words_same_cell": pct(counts["same_cell"], captions),
            "place_entropy": round(float(np.mean(entropy)), 2) if entropy else None,
            "offset_order": pct(counts["offset"], captions) if enc.relation else None,
            "geometry_prefers_image": pct(counts["geometry"], captions) if enc.relation else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, nargs="+", required=True, help="trained model folders (model.json + weights)")
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--split", choices=["train", "val"], default="train",
                    help="train: the twins the model was fitted on (default); val: held-out twins")
    ap.add_argument("--images", type=int, default=600, help="the first N images of the split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    doc = json.loads(a.out.read_text()) if a.out.exists() else {"runs": []}
    doc.update(what=__doc__.splitlines()[0], machine=f"{platform.machine()} {os.cpu_count()} cores")
    for folder in a.models:
        model, meta = load_aligner(folder)
        run = {"model": str(folder), "method": meta["method"], "text_layers": meta.get("text_layers"),
               "methods": meta["methods"], **measure(model, a.root, a.split, a.images)}
        print(json.dumps(run), flush=True)
        doc["runs"].append(run)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    entry(main)
