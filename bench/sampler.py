"""Which Optuna sampler makes the most of ``tune.trials`` (3) trials? Measured on val.

For each method and sampler (``tpe`` with ``n_startup_trials`` 10 -- with 3 trials that is random
search draw for draw, tests/test_tuning.py --, ``tpe`` with 1, ``qmc``) and each sampler seed, the
real ``crossalign.train.tuning.tune`` runs on ``data/features`` (train, val) with params.yaml's tune budget
and reports the tuned (best-trial) val RSUM. The spread over sampler seeds is what a user meets: one
seed is one ``make run``. Trial 0 (the params.yaml values) is the same in every study (CPU training
is deterministic at a fixed thread count), so it is trained once and replayed, epoch by epoch,
through the pruner in the other studies: the same numbers, a third less compute.

    python -m bench.sampler --methods contrastive --seeds 0 1 2

Writes ``bench/results/sampler.json`` (the command, the machine, every study's trials) and prints
mean / std / min / max of the tuned val RSUM per method and sampler. Never reads the test split.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "sampler.json"
SAMPLERS = {"tpe-10": {"sampler": "tpe", "n_startup_trials": 10}, "tpe-1": {"sampler": "tpe", "n_startup_trials": 1},
            "qmc": {"sampler": "qmc"}, "random": {"sampler": "random"}}


def replaying(run_trial, cache: dict):
    """``tuning.run_trial`` that trains a value set once and afterwards replays its per-epoch val
    RSUM through the trial's tracker (so the pruner sees what it saw the first time)."""
    def wrapped(cfg, root, method, values, tracker, log=print):
        key = (method, json.dumps(values, sort_keys=True))
        if key in cache:
            curve, value = cache[key]
            for epoch, rsum in enumerate(curve, 1):
                tracker.log_epoch({"val_rsum": rsum}, epoch)
            return value
        curve: list[float] = []
        inner = tracker.log_epoch

        def log_epoch(metrics, epoch):
            curve.append(float(metrics["val_rsum"]))
            inner(metrics, epoch)
        tracker.log_epoch = log_epoch
        value = run_trial(cfg, root, method, values, tracker, log)
        cache[key] = (curve, value)
        return value
    return wrapped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=["contrastive"])
    ap.add_argument("--samplers", nargs="*", default=["tpe-10", "tpe-1", "qmc"], choices=list(SAMPLERS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from crossalign import config
    from crossalign.train import tuning

    base = config.load(args.params)
    tuning.run_trial = replaying(tuning.run_trial, {})
    command = "python -m bench.sampler " + " ".join(argv if argv is not None else sys.argv[1:])
    studies, summary = [], {}
    for method in args.methods:
        for name in args.samplers:
            tuned = []
            for seed in args.seeds:
                cfg = tuning.apply_overrides(base, {**{f"tune.{k}": v for k, v in SAMPLERS[name].items()},
                                                    "tune.seed": seed, "tune.threads": args.threads,
                                                    "train.device": "cpu"}, "bench.sampler")
                start = time.perf_counter()
                record = tuning.tune(cfg, args.root, method, log=lambda s: None)
                tuned.append(record["best"]["val_rsum"])
                studies.append({"method": method, "sampler": name, "seed": seed, "described": record["budget"]["sampler"],
                                "defaults_val_rsum": record["defaults"]["val_rsum"], "tuned_val_rsum": tuned[-1],
                                "best_trial": record["best"]["trial"], "trials": record["trial_log"],
                                "seconds": round(time.perf_counter() - start, 1)})
                print(f"{method:<16} {name:<7} seed {seed}: tuned val RSUM {tuned[-1]:.1f} (trial {record['best']['trial']}; "
                      f"defaults {record['defaults']['val_rsum']:.1f}) {studies[-1]['seconds']:.0f} s", flush=True)
            summary.setdefault(method, {})[name] = {
                "mean": round(statistics.mean(tuned), 1), "std": round(statistics.stdev(tuned), 1) if len(tuned) > 1 else None,
                "min": round(min(tuned), 1), "max": round(max(tuned), 1),
                "gain_over_defaults_mean": round(statistics.mean(tuned) - studies[-1]["defaults_val_rsum"], 1)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"command": command, "machine": f"{platform.machine()} {os.cpu_count()} cores (shared)",
                                            "budget": {"trials": base.tune.trials, "epochs": base.tune.epochs},
                                            "split": "val", "summary": summary, "studies": studies}, indent=1) + "\n")
    for method, rows in summary.items():
        for name, s in rows.items():
            print(f"{method:<16} {name:<7} tuned val RSUM mean {s['mean']:.1f} std {s['std']} "
                  f"[{s['min']:.1f}, {s['max']:.1f}] gain over defaults {s['gain_over_defaults_mean']:+.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
