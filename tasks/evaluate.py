"""``python -m tasks.evaluate --method M``: COCO retrieval metrics of one method (dvc: evaluate@M)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from crossalign import config
from crossalign.evaluate import stage as evaluation
from tasks._stage import stage_main


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=config.METHOD_NAMES, help="method to evaluate")


def _run(args: argparse.Namespace, cfg: config.Config, root: Path) -> None:
    result = evaluation.run(cfg, args.method, root)
    val, test = result["val"], result["test"]
    print(f"{args.method}: val RSUM {val['rsum']:.1f}, test RSUM {test['rsum']:.1f} "
          f"(R@1 i2t {test['i2t_r1']:.1f}, t2i {test['t2i_r1']:.1f}) [{result['protocol']}]")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return stage_main("Evaluate one method on val and test (COCO protocol).", _run, argv, _args)


if __name__ == "__main__":
    sys.exit(main())
