"""Does a frozen image-grid cell carry the attributes binding needs? (the image side of binding)

For every object of the synthetic scenes, the image encoder's grid cell under the object's centre
(``data/features/<split>/image_tokens.npy``, row-major 7x7) is the input of a linear probe
(multinomial logistic regression, standardised by the train statistics) that predicts the object's
colour, shape and size (``data/raw/synthetic/annotations/captions_<split>.json``). Trained on the
train objects, scored on the val objects (the test objects only with ``--final``, which says so),
next to the majority-class rate. High accuracy means the
frozen features hold *which object sits where*, so a position or attribute twin is separable on the
image side and a method that fails on it fails in fusion or on the text side.

    python -m bench.cell_probe [--root .] [--out bench/results/cell_probe.json] [--final]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from bench import entry
from bench.splits import add_final_flag, scored_split

ATTRIBUTES = ("colour", "shape", "size")


def cell_features(root: Path, split: str) -> tuple[np.ndarray, dict[str, list[str]]]:
    """(objects, D) float32 features of the cell under each object's centre, and its attributes."""
    feat = root / "data" / "features" / split
    meta = json.loads((feat / "meta.json").read_text())
    grid_h, grid_w = meta["image_encoder"]["grid"]
    size = float(meta["image_size"])
    tokens = np.load(feat / "image_tokens.npy", mmap_mode="r")  # (N, grid_h*grid_w, D) fp16
    row_of = {int(i): r for r, i in enumerate(np.load(feat / "image_ids.npy"))}
    ann = json.loads((root / "data" / "raw" / "synthetic" / "annotations" / f"captions_{split}.json").read_text())
    xs, ys = [], {k: [] for k in ATTRIBUTES}
    for image in ann["images"]:
        r = row_of[int(image["id"])]
        for obj in image["objects"]:
            x, y, w, h = obj["bbox"]
            col = min(int((x + w / 2) / size * grid_w), grid_w - 1)
            row = min(int((y + h / 2) / size * grid_h), grid_h - 1)
            xs.append(np.asarray(tokens[r, row * grid_w + col], dtype=np.float32))
            for k in ATTRIBUTES:
                ys[k].append(str(obj[k]))
    return np.stack(xs), ys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, default=Path("bench/results/cell_probe.json"))
    ap.add_argument("--C", type=float, default=0.05, help="inverse L2 strength of the probe")
    add_final_flag(ap)
    args = ap.parse_args(argv)
    split = scored_split(args.final)
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = cell_features(args.root, "train")
    x_test, y_test = cell_features(args.root, split)  # val, or test under --final
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    result = {"split": split, "objects": {"train": len(x_train), split: len(x_test)}, "C": args.C, "probe": {}}
    for k in ATTRIBUTES:
        clf = LogisticRegression(max_iter=300, C=args.C).fit(x_train, y_train[k])
        majority = Counter(y_test[k]).most_common(1)[0][1] / len(y_test[k])
        result["probe"][k] = {"classes": len(set(y_train[k])), "train_acc": round(100 * clf.score(x_train, y_train[k]), 1),
                              f"{split}_acc": round(100 * clf.score(x_test, y_test[k]), 1),
                              f"{split}_majority": round(100 * majority, 1)}
        print(k, result["probe"][k], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    entry(main)
