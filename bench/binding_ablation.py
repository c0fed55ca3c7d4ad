"""Binding ablation (issue 13): which ingredient buys what, per method.

Trains and evaluates each method on the default features (``data/features``, written by the
``features`` stage with its binding negatives) under ingredient settings of the issue-13 params:

- ``methods.image_positions``: ``none`` vs the "on" value (params.yaml's if not none, else sincos);
- ``train.twin_negatives``: false vs true;
- ``train.caption_negatives``: 0 vs k (params.yaml's if > 0, else 1; at most features.perturbations).

Settings (``--grid``): ``steps`` (default) = all off, all on, then each ingredient alone; ``full`` =
all 8 combinations. Every run uses params.yaml otherwise (default epochs, early stopping on val),
one seed (``train.seeds: [0]``), through the real code: ``crossalign.train.stage.run`` into a scratch
root whose ``data/features`` links to the real one, then ``crossalign.evaluate.stage.evaluate_model`` on
**val** and the binding probe (``crossalign.evaluate.binding``, 95 % CIs over twin pairs) on the val twins of
``eval/val_index.json``: the ablation informs choices, so it reads train and val only. ``--final``
scores test (``eval/test_index.json``) instead, for the configuration already chosen on val, and
says so ("FINAL: test split").

    python -m bench.binding_ablation                       # all methods, steps grid, 1 thread
    python -m bench.binding_ablation --methods joint --grid full
    python -m bench.binding_ablation --methods joint --final   # test numbers of the chosen recipe

Writes ``bench/results/binding_ablation.json`` after every run (a run already there with the same
split, settings and params is skipped, so an interrupted bench resumes) and prints the markdown
table of the scored split (a run without a ``split`` key predates the val/test distinction and
was scored on test).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import entry
from bench.splits import add_final_flag, index_path, scored_split

OUT = Path(__file__).resolve().parent / "results" / "binding_ablation.json"
INGREDIENTS = ("positions", "twin", "caption")


def settings(grid: str) -> list[dict[str, bool]]:
    """Ingredient on/off settings in run order (the most informative first)."""
    off = dict.fromkeys(INGREDIENTS, False)
    if grid == "full":
        return [{k: bool(i >> j & 1) for j, k in enumerate(INGREDIENTS)} for i in range(2 ** len(INGREDIENTS))]
    return [off, dict.fromkeys(INGREDIENTS, True)] + [{**off, k: True} for k in INGREDIENTS]


def label(setting: dict[str, bool]) -> str:
    on = [k for k in INGREDIENTS if setting[k]]
    return "none" if not on else "all" if len(on) == len(INGREDIENTS) else "+" + "+".join(on)


def on_values(raw: dict) -> dict:
    """The "on" value of each ingredient: params.yaml's where it is on, else a plain default."""
    positions = raw.get("methods", {}).get("image_positions", "sincos")
    k = int(raw.get("train", {}).get("caption_negatives", 0) or 0)
    limit = int(raw.get("features", {}).get("perturbations", 1))
    return {"positions": positions if positions != "none" else "sincos",
            "caption": max(1, min(k, limit)) if k > 0 else min(1, limit)}


def overrides(setting: dict[str, bool], on: dict, threads: int, device: str) -> dict:
    return {"methods": {"image_positions": on["positions"] if setting["positions"] else "none"},
            "train": {"twin_negatives": setting["twin"], "caption_negatives": on["caption"] if setting["caption"] else 0,
                      "seeds": [0], "threads": threads, "device": device},
            "evaluate": {"device": device}}


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def probe_row(probe: dict) -> dict:
    """The probe numbers the table shows: per kind and overall, mean with its CI, i2t, t2i, pairs."""
    cells = {"overall": probe["overall"], **probe["per_swap"]}
    return {k: {"mean": c["mean"], "ci95": c["ci95"]["mean"], "i2t": c["i2t"], "t2i": c["t2i"], "pairs": c["pairs"]}
            for k, c in cells.items()}


def run_split(run: dict) -> str:
    """The split a stored run was scored on (runs from before the distinction: test)."""
    return run.get("split", "test")


def run_one(raw: dict, method: str, root: Path, scratch: Path, log, split: str = "val") -> dict:
    """Train ``method`` with params ``raw`` on root's features; evaluate on ``split`` (val unless
    the caller passed ``--final``) with the binding probe on that split's twins."""
    import numpy as np
    import torch

    from crossalign import config
    from crossalign.train import stage as training
    from crossalign.evaluate.binding import binding_probe
    from crossalign.device import resolve_device
    from crossalign.evaluate.stage import evaluate_model
    from crossalign.io import load_features, read_json
    from crossalign.methods import load_aligner

    cfg = config.from_dict(raw, "bench.binding_ablation")
    work = scratch / method
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    os.symlink((root / "data" / "features").resolve(), work / "data" / "features")
    start = time.perf_counter()
    meta = training.run(cfg, work, method, log=log)[0]
    train_s = time.perf_counter() - start
    model, _ = load_aligner(work / "models" / method / "final" / "seed-0")
    device = resolve_device(cfg.evaluate.device, "evaluate.device")
    scored = load_features(root / "data" / "features" / split)
    twins = read_json(index_path(root, split)).get("twins") or []
    start = time.perf_counter()
    metrics, i2t, t2i, *_ = evaluate_model(model, scored, cfg, device)
    probe = binding_probe(i2t, t2i, np.asarray(scored.caption_image_index), twins)
    eval_s = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"split": split, "early_stopping_val_rsum": meta["val_metrics"].get("rsum"), f"{split}_rsum": metrics["rsum"],
            "best_epoch": meta["best_epoch"],
            "epochs_run": meta["epochs_run"], "params": meta["trainable_params"], "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1), "probe": probe_row(probe)}


def table(runs: list[dict]) -> str:
    """Markdown: per method and setting, binding per kind and overall (mean of i2t and t2i, 95 % CI
    over twin pairs), and RSUM, all on the split the runs were scored on (one split per table)."""
    splits = {run_split(r) for r in runs} or {"val"}
    if len(splits) > 1:
        raise ValueError(f"one table per split: the runs were scored on {sorted(splits)}")
    split = splits.pop()
    kinds = sorted({k for r in runs for k in r["probe"] if k != "overall"})
    lines = ["| method | positions / twin neg / caption neg | " + " | ".join(kinds)
             + f" | binding [95% CI] | {split} RSUM |", "|---" * (4 + len(kinds)) + "|"]
    for r in runs:
        s = r["setting"]
        what = f"{s['image_positions']} / {'on' if s['twin_negatives'] else 'off'} / {s['caption_negatives']}"
        per = [f"{r['probe'][k]['mean']:.1f}" if k in r["probe"] else "–" for k in kinds]
        o = r["probe"]["overall"]
        lines.append(f"| {r['method']} | {what} | " + " | ".join(per)
                     + f" | {o['mean']:.1f} [{o['ci95'][0]:.1f}, {o['ci95'][1]:.1f}] | {r[f'{split}_rsum']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".", help="project root with data/features and eval/test_index.json")
    ap.add_argument("--methods", nargs="*", default=None, help="default: train.methods")
    ap.add_argument("--grid", choices=("steps", "full"), default="steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    add_final_flag(ap)
    args = ap.parse_args(argv)
    split = scored_split(args.final)
    done = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    if args.table:
        print(table([r for r in done["runs"] if run_split(r) == split]))
        return 0
    import torch

    from crossalign import config
    from crossalign.features import hardneg

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    raw = yaml.safe_load(Path(args.params).read_text())
    on = on_values(raw)
    for name in ("train", split):
        hardneg.load(root / "data" / "features" / name)  # fails early, naming the file, on old features
    if not index_path(root, split).exists():
        print(f"error: {index_path(root, split)} absent: rerun the features stage (it writes the twins of val "
              "and test)", file=sys.stderr)
        return 2
    methods = args.methods or list(raw["train"]["methods"])
    plan = [(s, m) for s in settings(args.grid) for m in methods]
    try:
        for s, _ in plan[:1]:
            config.from_dict(merge(raw, overrides(s, on, args.threads, args.device)), "bench.binding_ablation")
    except config.ConfigError as err:
        print(f"error: {err}\n(the issue-13 params methods.image_positions, train.twin_negatives and "
              "train.caption_negatives come with the methods/training side: merge it first)", file=sys.stderr)
        return 2
    runs = done["runs"]
    with tempfile.TemporaryDirectory(prefix="binding-ablation-") as scratch:
        for s, method in plan:
            cfg_raw = merge(raw, overrides(s, on, args.threads, args.device))
            setting = {"image_positions": cfg_raw["methods"]["image_positions"],
                       "twin_negatives": cfg_raw["train"]["twin_negatives"],
                       "caption_negatives": cfg_raw["train"]["caption_negatives"]}
            params = {k: v for k, v in cfg_raw.items() if k != "tracking"}
            key = {"method": method, "setting": setting, "split": split,
                   "params_sha": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]}
            if any(r["method"] == method and r["setting"] == setting and r.get("params_sha") == key["params_sha"]
                   and run_split(r) == split for r in runs):
                continue
            print(f"== {method} {label(s)} {setting}", flush=True)
            result = run_one(cfg_raw, method, root, Path(scratch), log=lambda msg: print(msg, flush=True), split=split)
            runs.append({**key, "label": label(s), **result})
            record = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "device": args.device,
                      "threads": args.threads, "grid": args.grid, "runs": runs}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(args.out)
            print(table([runs[-1]]).splitlines()[-1], flush=True)
    print(table([r for r in runs if run_split(r) == split]))
    return 0


if __name__ == "__main__":
    entry(main)
