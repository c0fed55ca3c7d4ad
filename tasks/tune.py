"""``tune@<method>``: equal-budget Optuna search of one method (``python -m tasks.tune --method M``).

Reads data/features/{train,val}; writes tuned/<M>.json (the chosen values, the budget, each
trial's val RSUM and state); trials train in a temporary directory (nothing under models/). The
method's tuning run and one nested run per trial go to MLflow unless ``--no-tracking``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crossalign import config
from crossalign.train import tuning
from crossalign.config import METHOD_NAMES
from tasks._stage import stage_main


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=METHOD_NAMES, help="method to tune")
    parser.add_argument("--no-tracking", action="store_true", help="tune without MLflow")


def _run(args: argparse.Namespace, cfg: config.Config, root: Path) -> None:
    mlflow_log = None if args.no_tracking or cfg.tune.trials == 0 else tuning.MlflowTrialLog(cfg, root, args.method)
    record = None
    try:
        record = tuning.tune(cfg, root, args.method, mlflow_log)
    finally:
        if mlflow_log:
            mlflow_log.end(record)
    path = tuning.write_tuned(root, record)
    if record["tuned"]:
        print(f"{args.method}: defaults val RSUM {record['defaults']['val_rsum']}, best trial "
              f"{record['best']['trial']} val RSUM {record['best']['val_rsum']:.1f} -> {path}")
    else:
        print(f"{args.method}: {record['note']} -> {path}")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__.splitlines()[0], _run, argv, _args)


if __name__ == "__main__":
    sys.exit(main())
