"""Position binding, measured on val with the train-twin fit beside it: which text-side mechanism
lets an aligner tell "A left of B" from "B left of A".

Each arm trains one method through the project's training loop (params.yaml plus the arm's
overrides, seed 0, early stopping on val RSUM) and scores:

- **val**: RSUM (COCO protocol) and the binding probe on val's own twins (``eval/val_index.json``),
  overall and per swap kind (colour / position / size), i2t, t2i and their mean with the
  pair-bootstrap 95 % CI;
- **the train-twin fit**: the same probe on the twin pairs among the first ``--fit-images`` train
  images (twins the model was trained on). A mechanism that cannot fit the training twins cannot
  bind on val; one that fits them and stays at chance on val overfits. This is the first number
  to watch.
- **why**: with a late matcher and the project's prepared train split beside the features, the
  grounding numbers of ``bench/grounding.py`` on the same training twins (does a shape word's
  matched place follow its object; do the two words' offsets come in the objects' order).

Every arm names the three text-side keys (``features.text_token_layer``, ``methods.text_positions``,
``methods.relation_geometry``); it reads the features cached at its token layer from ``--root`` or
one of ``--features-roots`` (project roots whose ``data/features`` the features stage wrote with
another ``features.text_token_layer``, told apart by their ``meta.json``).

    python -m bench.position --features-roots /tmp/last-layer     # every arm, on val
    python -m bench.position --arms joint-L3 joint-L3+relation+text-learned
    python -m bench.position --final --arms joint-L3+relation+text-learned   # the chosen arm, on TEST

Writes ``bench/results/position.json`` after every arm (an arm already there with the same
overrides, epochs and split is skipped, so an interrupted bench resumes; a record marked
``stopped``, scored from the checkpoint of an arm stopped for time, is not), with the machine and
its load; prints one line per arm.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from dataclasses import replace
from pathlib import Path

import torch

from bench import entry
from bench.binding import _probe_cells, config_with, train_once
from bench.grounding import encoder_of
from bench.grounding import measure as grounding
from bench.splits import add_final_flag, index_path, scored_split
from crossalign.evaluate.binding import binding_probe
from crossalign.evaluate.stage import train_fit_split
from crossalign.io import load_features, read_json
from crossalign.retrieval.protocol import retrieval_metrics
from crossalign.retrieval.scoring import score_matrices

OUT = Path(__file__).resolve().parent / "results" / "position.json"
# the text side before this bench: last-layer tokens, no token indices, no geometry
BEFORE = ["features.text_token_layer=-1", "methods.text_positions=none", "methods.relation_geometry=false"]
L3 = ["features.text_token_layer=3", "methods.text_positions=none", "methods.relation_geometry=false"]
SIDE = ["methods.text_positions=learned", "methods.relation_geometry=true"]  # with L3: params.yaml as shipped
# MiniLM's top three layers trained (features.text_trainable_layers): the read layer is named as 6,
# the last of MiniLM's six, so the features cached below it (layer 3) are told apart from L3's
LIT3 = ["features.text_token_layer=6", "features.text_trainable_layers=3", "methods.text_positions=none",
        "methods.relation_geometry=false"]


def _with(base: list[str], *sets: str) -> list[str]:
    keys = {s.split("=", 1)[0] for s in sets}
    return [s for s in base if s.split("=", 1)[0] not in keys] + list(sets)


# arm -> (method, overrides over params.yaml); each arm names all three text-side keys
ARMS: dict[str, tuple[str, list[str]]] = {
    "joint-before": ("joint", BEFORE),
    "joint-before+text-learned": ("joint", _with(BEFORE, "methods.text_positions=learned")),
    "joint-before+relation": ("joint", _with(BEFORE, "methods.relation_geometry=true")),
    "joint-before+relation+text-learned": ("joint", _with(BEFORE, *SIDE)),
    "joint-L3": ("joint", L3),
    "joint-L3+relation+text-learned": ("joint", _with(L3, *SIDE)),
    "joint-L3+relation+text-learned+2-layers": ("joint", _with(L3, *SIDE, "methods.joint.layers=2")),
    "cross_attention-before": ("cross_attention", BEFORE),
    "cross_attention-before+relation+text-learned": ("cross_attention", _with(BEFORE, *SIDE)),
    "cross_attention-L3": ("cross_attention", L3),
    "cross_attention-L3+relation+text-learned": ("cross_attention", _with(L3, *SIDE)),
    # LiT's partially locked text side: MiniLM's layers 4-6 trained over cached layer-3 states
    "joint-LiT3": ("joint", LIT3),
    "joint-LiT3+relation+text-learned": ("joint", _with(LIT3, *SIDE)),
    "cross_attention-LiT3+relation+text-learned": ("cross_attention", _with(LIT3, *SIDE)),
    "cross_attention-LiT3+relation+text-learned+lr3e-4": ("cross_attention",
                                                          _with(LIT3, *SIDE, "train.text_layers_lr=0.0003")),
}


def text_side(root: Path) -> tuple[int, int]:
    """(the layer the methods read, the layers trained below it) of ``root``'s train features
    (``meta.json``; -1 = the last layer, cached with nothing trained)."""
    encoder = read_json(root / "data" / "features" / "train" / "meta.json").get("text_encoder", {})
    trained = encoder.get("text_layers")
    if trained:
        return int(trained["first"]) + int(trained["layers"]), int(trained["layers"])
    return int(encoder.get("token_layer", -1)), 0


def features_for(sets: list[str], roots: list[Path]) -> Path | None:
    """The root among ``roots`` whose features were cached for the arm's ``features.text_token_layer``
    and ``features.text_trainable_layers`` (0 when the arm does not name it)."""
    keys = dict(s.split("=", 1) for s in sets)
    want = (int(keys["features.text_token_layer"]), int(keys.get("features.text_trainable_layers", 0)))
    return next((r for r in roots if text_side(r) == want), None)


def probe(model, split, twins: list[dict]) -> tuple[float, dict]:
    """(RSUM, binding cells) of ``model`` on ``split`` with ``twins``."""
    i2t, t2i = score_matrices(model, split, "cpu", progress=False)
    rsum = retrieval_metrics(i2t, split.caption_image_index, t2i)["rsum"]
    return rsum, _probe_cells(binding_probe(i2t, t2i, split.caption_image_index, twins))


def measure(root: Path, features_root: Path, method: str, sets: list[str], split: str, fit_images: int,
            threads: int, max_steps: int | None = None) -> dict:
    torch.set_num_threads(threads)
    cfg = config_with(root, sets)
    scored = load_features(features_root / "data" / "features" / split)
    index = read_json(index_path(features_root, split))
    fit = train_fit_split(features_root, fit_images)  # the evaluate stage's train-twin fit: each pair once
    if fit is None:
        raise ValueError(f"{features_root / 'data/features/train'}: no binding twin pair among the first "
                         f"{fit_images} train images (twin_row.npy): nothing to measure the train-twin fit on")
    model, meta, seconds = train_once(cfg, features_root / "data" / "features", method, max_steps)
    out = {"method": method, "set": sets, "split": split, "params": meta["trainable_params"],
           "best_epoch": meta["best_epoch"], "epochs": cfg.train.epochs, "train_seconds": round(seconds, 1),
           "threads": threads}
    rsum, cells = probe(model, *fit)
    out["train_fit"] = {"images": fit[0].n_images, "rsum": round(rsum, 1), **cells}
    if encoder_of(model) is not None and (features_root / "data" / "prepared" / "train" / "tokens.npy").exists():
        out["train_grounding"] = grounding(model, features_root, "train", fit_images)  # why the fit is what it is
    alphas = [None] if model.rerank is None else [model.rerank.alpha, 0.0, 0.5, 1.0]
    for alpha in dict.fromkeys(alphas):
        if alpha is not None:
            model.rerank = replace(model.rerank, alpha=alpha)
        rsum, cells = probe(model, scored, index["twins"])
        key = split if alpha is None else f"{split}_alpha_{alpha}"
        out[key] = {"rsum": round(rsum, 1), **cells}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--features-roots", type=Path, nargs="*", default=None,
                    help="project roots with data/features cached at other features.text_token_layer values "
                         "(default: --root only); each arm reads the one cached at its layer")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs of every arm (default: params.yaml's)")
    ap.add_argument("--fit-images", type=int, default=600, help="train images whose twins measure the fit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="steps per epoch at most (smoke runs)")
    ap.add_argument("--out", type=Path, default=OUT)
    add_final_flag(ap)
    a = ap.parse_args(argv)
    split = scored_split(a.final)
    doc = json.loads(a.out.read_text()) if a.out.exists() else {"runs": []}
    doc.update(what=__doc__.splitlines()[0], machine=f"{platform.machine()} {os.cpu_count()} cores")
    roots = [a.root, *(a.features_roots or [])]
    for arm in a.arms:
        method, sets = ARMS[arm]
        sets = sets + ([f"train.epochs={a.epochs}"] if a.epochs else [])
        features_root = features_for(sets, roots)
        if features_root is None:
            print(f"{arm}: skipped (no features at its features.text_token_layer and text_trainable_layers among {[str(r) for r in roots]}; "
                  "build them with the features stage and pass --features-roots)")
            continue
        if any(r["arm"] == arm and r["set"] == sets and r["split"] == split and not r.get("stopped") and not a.max_steps
               for r in doc["runs"]):  # a run stopped for time (scored from its checkpoint) is run again
            print(f"{arm}: already in {a.out}")
            continue
        load = os.getloadavg()[0]
        run = measure(a.root, features_root, method, sets, split, a.fit_images, a.threads, a.max_steps)
        run = {"arm": arm, **run, "load_before": round(load, 2)}
        print(json.dumps(run), flush=True)
        doc["runs"] = [r for r in doc["runs"] if not (r["arm"] == arm and r["set"] == sets and r["split"] == split)]
        doc["runs"].append(run)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    entry(main)
