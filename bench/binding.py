"""Binding recipes on the default synthetic features, through the project's own training loop:
train one method with params overrides, then RSUM (COCO protocol) and the binding probe (overall
and per swap kind, 95 % CIs over twin pairs) on the **val** split, with val's own twins. Test is
scored only with ``--final``, for the configuration already chosen on val (the output says so).

    python -m bench.binding --method joint --set train.twin_negatives=false --set methods.image_positions=none
    python -m bench.binding --method joint --final          # the chosen recipe, on test

Reads ``data/features/{train,val}`` (``test`` with ``--final``) and ``eval/val_index.json``
(``eval/test_index.json`` with ``--final``); writes nothing but a JSON line per run to stdout
(and models under a temporary directory).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench import entry
from crossalign import config
from crossalign.evaluate.binding import binding_probe
from crossalign.io import load_features, read_json
from crossalign.methods import load_aligner
from crossalign.retrieval.protocol import retrieval_metrics
from crossalign.retrieval.scoring import score_matrices
from crossalign.train.stage import train_seed

from bench.splits import add_final_flag, index_path, scored_split


def parse_value(text: str):
    return yaml.safe_load(text)


def config_with(root: Path, sets: list[str], params: str = "params.yaml") -> config.Config:
    """params.yaml with ``dotted.key=value`` overrides, on the CPU."""
    raw = yaml.safe_load(Path(root, params).read_text())
    for item in sets:
        key, value = item.split("=", 1)
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = parse_value(value)
    raw["train"]["device"] = "cpu"
    return config.from_dict(raw, f"{params} + --set")


def _probe_cells(probe: dict) -> dict:
    return {k: [round(v["i2t"], 1), round(v["t2i"], 1), round(v["mean"], 1), [round(x, 1) for x in v["ci95"]["mean"]]]
            for k, v in [("overall", probe["overall"]), *probe["per_swap"].items()]}


def train_once(cfg: config.Config, features: Path, method: str, max_steps: int | None = None):
    """Train ``method`` (seed 0, early stopping on the val features) on ``features/{train,val}`` into
    a temporary directory -> (the trained model, its meta, training seconds)."""
    train = load_features(features / "train")
    val = load_features(features / "val").first_images(cfg.train.val_images)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        meta = train_seed(cfg, Path(tmp), method, 0, train, val, Path(tmp) / "final", log=lambda m: None,
                          max_steps=max_steps)
        seconds = time.perf_counter() - started
        model, _ = load_aligner(Path(tmp) / "final")
    return model, meta, seconds


def measure(root: Path, method: str, sets: list[str], split: str = "val", threads: int = 1,
            max_steps: int | None = None, alphas: tuple[float, ...] = (0.75, 1.0), params: str = "params.yaml") -> dict:
    """Train ``method`` (params.yaml + ``sets``, seed 0) and score ``split`` -> one result record:
    RSUM and the binding probe ([i2t, t2i, mean, 95 % CI of the mean] overall and per kind); a
    re-ranking method is also scored at each fusion alpha of ``alphas`` (an evaluation knob)."""
    torch.set_num_threads(threads)
    cfg = config_with(root, sets, params)
    scored = load_features(root / "data/features" / split)  # val (every choice) or test (--final)
    index = read_json(index_path(root, split))
    model, meta, seconds = train_once(cfg, root / "data/features", method, max_steps)
    i2t, t2i = score_matrices(model, scored, "cpu", progress=False)
    metrics = retrieval_metrics(i2t, scored.caption_image_index, t2i)
    probe = binding_probe(i2t, t2i, scored.caption_image_index, index["twins"])
    out = {"method": method, "set": sets, "split": split, "params": meta["trainable_params"],
           "best_epoch": meta["best_epoch"], "epochs": cfg.train.epochs, "train_seconds": round(seconds, 1),
           "threads": threads, "early_stopping_val_rsum": round(meta["val_metrics"]["rsum"], 1),
           f"{split}_rsum": round(metrics["rsum"], 1), "binding": _probe_cells(probe)}
    if model.rerank is not None:  # the same model re-ranking with other fusion weights (an evaluation knob)
        from dataclasses import replace
        for alpha in alphas:
            model.rerank = replace(model.rerank, alpha=alpha)
            i2t, t2i = score_matrices(model, scored, "cpu", progress=False)
            probe = binding_probe(i2t, t2i, scored.caption_image_index, index["twins"])
            out[f"alpha_{alpha}"] = {
                f"{split}_rsum": round(retrieval_metrics(i2t, scored.caption_image_index, t2i)["rsum"], 1),
                **_probe_cells(probe)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--set", action="append", default=[], help="dotted.key=value over params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="steps per epoch at most (smoke runs)")
    add_final_flag(ap)
    a = ap.parse_args()
    split = scored_split(a.final)
    print(json.dumps(measure(Path(a.root), a.method, a.set, split, a.threads, a.max_steps)), flush=True)


if __name__ == "__main__":
    entry(main)
