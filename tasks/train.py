"""``train@<method>``: train one method on the cached features (``python -m tasks.train --method M``).

Reads data/features/{train,val} and tuned/<M>.json (the values tune@<M> chose, applied over
params.yaml; absent or ``tune.trials: 0``: params.yaml values); writes models/<M>/final/seed-<s>/, models/<M>/checkpoints/
(persistent, resumable) and plots/train/<M>.csv; one MLflow run per seed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crossalign import config
from crossalign.train import stage as training
from crossalign.train import tuning
from crossalign.config import METHOD_NAMES
from crossalign.train.tracker import MlflowTracker
from tasks._stage import stage_main


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=METHOD_NAMES, help="method to train")
    parser.add_argument("--no-tracking", action="store_true", help="train without MLflow")
    parser.add_argument("--tuned", default=None, help="tuned values (default: tuned/<method>.json if present)")


def _run(args: argparse.Namespace, cfg: config.Config, root: Path) -> None:
    factory = None if args.no_tracking else MlflowTracker
    cfg, applied = tuning.apply_tuned(cfg, root, args.method, args.tuned)
    print(f"{args.method}: {applied}")
    for result in training.run(cfg, root, args.method, tracker_factory=factory):
        print(f"{args.method} seed {result['seed']}: best epoch {result['best_epoch']}, "
              f"val rsum {result['val_metrics'].get('rsum', float('nan')):.1f}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__.splitlines()[0], _run, argv, _args)


if __name__ == "__main__":
    sys.exit(main())
