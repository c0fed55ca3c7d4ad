"""Defaults on real captions: every method on a folder of real photos (default
``../shared/flickr8k-dev``), params.yaml as shipped (calibrated on the synthetic scenes) against
``params-real.yaml`` (the real-photo profile) and a small search around it, scored on **val**.

Each arm trains one method through the project's training loop (params.yaml, then the arm's
profile, then its overrides; seed 0, early stopping on val) and scores val RSUM under the COCO
protocol; a re-ranking method (joint) is also scored at each alpha of ``evaluate.fusion_alphas``
(``--alphas``; an evaluation knob: the same weights re-ranked, alpha 0 = its own shortlist).

    python -m bench.real_val --work /tmp/real8k              # every arm; features kept in /tmp/real8k
    python -m bench.real_val --arms joint joint-real --epochs 2
    python -m bench.real_val --final --arms contrastive-real joint-real   # the chosen profile, on TEST

The features are built once under ``--work`` (default: a temporary folder, deleted at the end) by
the data, preprocess and features stages with ``data.dataset: coco-folder`` and ``data.folder``
(the encoders and their inputs do not depend on the profile). Writes
``bench/results/real_val.json`` (``--final``: ``real_final.json``) after every arm, with the command,
the machine and its load; an arm already there with the same settings is skipped, so an interrupted
bench resumes. Prints one line per arm.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from bench import REPO, entry, need, shared_dir
from bench.splits import add_final_flag, scored_split
from crossalign.cli import load_overlay, overrides

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = REPO / "params-real.yaml"
# arm -> (method, profile applied?, overrides over params.yaml [+ params-real.yaml])
ARMS = {
    "concat_mlp": ("concat_mlp", False, []),
    "concat_mlp-real": ("concat_mlp", True, []),
    "cross_attention": ("cross_attention", False, []),
    "cross_attention-real": ("cross_attention", True, []),
    "cross_attention-real-late": ("cross_attention", True, ["methods.cross_attention.matcher=late"]),
    "cross_attention-real-caption-negatives": ("cross_attention", True,
                                               ["train.caption_negatives=1", "train.binding_rank_weight=1.0"]),
    "contrastive": ("contrastive", False, []),
    "contrastive-real": ("contrastive", True, []),
    "contrastive-real-dropout-0.1": ("contrastive", True, ["methods.contrastive.dropout=0.1"]),
    "joint": ("joint", False, []),
    "joint-real": ("joint", True, []),
    "joint-real-itc-tokens": ("joint", True, ["methods.joint.itc_input=tokens"]),
    "joint-real-late": ("joint", True, ["methods.joint.matcher=late"]),
    "joint-real-caption-negatives": ("joint", True, ["train.caption_negatives=1", "train.binding_rank_weight=1.0"]),
    # caption tokens from MiniLM's layer 3 (the features under --work must be built with it)
    "cross_attention-real-L3": ("cross_attention", True, ["features.text_token_layer=3"]),
    "joint-real-L3": ("joint", True, ["features.text_token_layer=3"]),
}
REAL_FOLDER = "flickr8k-dev"
ARM_METHODS = {method for method, _, _ in ARMS.values()}


def reads(method: str, override: str) -> bool:
    """Whether ``method`` reads the key of ``override`` (``methods.<another method>.*`` it does not)."""
    parts = override.split("=", 1)[0].split(".")
    return not (parts[0] == "methods" and len(parts) > 2 and parts[1] in ARM_METHODS and parts[1] != method)


def last_wins(sets: list[str]) -> list[str]:
    """``key=value`` overrides with each key once, where it was set last (a later override wins, as
    it would when applied in order)."""
    seen: set[str] = set()
    out = []
    for item in reversed(sets):
        key = item.split("=", 1)[0]
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out[::-1]


def features_work(work: Path, sets: list[str]) -> Path:
    """Where an arm's features live: ``work`` itself, or for an arm that changes a ``features.*`` key
    (``features.text_token_layer=3``) a folder of its own under it, named by those keys."""
    keys = [s for s in sets if s.startswith("features.")]
    return work / "__".join(k.replace("=", "-") for k in keys) if keys else work


def build_features(work: Path, folder: Path, params: Path, sets: list[str] = ()) -> None:
    """data -> preprocess -> features of ``folder`` (COCO caption format) under ``work``, with the
    ``features.*`` overrides among ``sets``."""
    from crossalign import config
    from crossalign.data import stage as data
    from crossalign.features import stage as features
    from crossalign.preprocess import stage as preprocess

    if (work / "data/features/val/format.json").exists():
        return
    raw = yaml.safe_load(params.read_text())
    raw["data"].update(dataset="coco-folder", folder=str(folder.resolve()))
    for item in sets:
        key, value = item.split("=", 1)
        if key.startswith("features."):
            raw["features"][key.split(".", 1)[1]] = yaml.safe_load(value)
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = config.load(work / "params.yaml")
    data.run(cfg, work)
    preprocess.run(cfg, work)
    features.run(cfg, work, progress=False)


def measure(work: Path, method: str, sets: list[str], split: str, threads: int, alphas: list[float]) -> dict:
    """Train ``method`` under ``sets`` (seed 0) and score ``split``: RSUM, R@1 both ways, and for a
    re-ranker RSUM at each fusion alpha."""
    from bench.binding import config_with, train_once
    from crossalign.io import load_features
    from crossalign.retrieval.protocol import retrieval_metrics
    from crossalign.retrieval.scoring import score_matrices

    torch.set_num_threads(threads)
    cfg = config_with(work, sets)
    scored = load_features(work / "data/features" / split)
    model, meta, seconds = train_once(cfg, work / "data/features", method)

    def score() -> dict:
        i2t, t2i = score_matrices(model, scored, "cpu", progress=False)
        return retrieval_metrics(i2t, scored.caption_image_index, t2i)

    m = score()
    out = {"method": method, "set": sets, "split": split, "params": meta["trainable_params"],
           "best_epoch": meta["best_epoch"], "epochs": cfg.train.epochs, "train_seconds": round(seconds, 1),
           f"{split}_rsum": round(m["rsum"], 1), "r1": [round(m["i2t_r1"], 1), round(m["t2i_r1"], 1)]}
    if model.rerank is not None:
        out["fusion_alpha_shipped"] = model.rerank.alpha
        out["by_alpha"] = {}
        for alpha in alphas:
            model.rerank = replace(model.rerank, alpha=alpha)
            out["by_alpha"][str(alpha)] = round(score()["rsum"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--folder", type=Path, default=None,
                    help=f"real photos in COCO caption format (default: {REAL_FOLDER}/ in the shared folder)")
    ap.add_argument("--work", type=Path, default=None, help="where the features are built and kept "
                    "(default: a temporary folder, deleted at the end)")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs of every arm (default: the params')")
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared)")
    ap.add_argument("--out", type=Path, default=None)
    add_final_flag(ap)
    args = ap.parse_args(argv)
    split = scored_split(args.final)
    folder = need(args.folder or shared_dir() / REAL_FOLDER, "a folder of real photos in COCO caption format")
    profile = overrides(load_overlay(need(PROFILE, "the real-photo params profile")))
    out = args.out or RESULTS / ("real_final.json" if args.final else "real_val.json")
    done = json.loads(out.read_text()) if out.exists() else {"runs": []}
    runs = done["runs"]
    command = "python -m bench.real_val " + " ".join(argv if argv is not None else sys.argv[1:])
    work = args.work or Path(tempfile.mkdtemp(prefix="crossalign-real-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        build_features(work, folder, REPO / "params.yaml")
        for arm in args.arms:
            method, real, sets = ARMS[arm]
            sets = [*(profile if real else []), *sets, *([f"train.epochs={args.epochs}"] if args.epochs else [])]
            sets = last_wins([s for s in sets if reads(method, s)])
            if any(r["arm"] == arm and [s for s in r["set"] if reads(method, s)] == sets and r["split"] == split
                   and r["folder"] == folder.name for r in runs):
                continue
            arm_work = features_work(work, sets)
            build_features(arm_work, folder, REPO / "params.yaml", sets)
            load = os.getloadavg()
            result = measure(arm_work, method, sets, split, args.threads, args.alphas)
            runs.append({"arm": arm, "folder": folder.name, "command": command,
                         "load_average_before": [round(x, 2) for x in load], **result})
            record = {"what": "every method on real photos, params.yaml as shipped vs params-real.yaml and its "
                              f"variants, one seed (0), scored on {split}", "split": split,
                      "machine": f"{platform.machine()} {os.cpu_count()} cores (shared)", "runs": runs}
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(out)
            alphas = "  " + " ".join(f"a{a}:{v}" for a, v in result["by_alpha"].items()) if "by_alpha" in result else ""
            print(f"{arm:<40} {split} RSUM {result[f'{split}_rsum']:6.1f}  best epoch {result['best_epoch']}/"
                  f"{result['epochs']}  {result['train_seconds']:.0f} s{alphas}", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    entry(main)
