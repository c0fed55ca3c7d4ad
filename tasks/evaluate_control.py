"""``evaluate_control``: COCO retrieval metrics of an evaluation-only control
(``python -m tasks.evaluate_control --control contrastive+cross_attention``).

Reads the trained models of the control's two methods (models/<m>/final/seed-<s>/ of every
``train.seeds``), data/features/{val,test}, eval/test_index.json; writes eval/<control>/ and
metrics/<control>.json exactly as evaluate@<method> does (crossalign.evaluate.stage, unchanged).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from crossalign import config
from crossalign.evaluate import ensemble
from crossalign.evaluate import stage as evaluation
from tasks._stage import stage_main


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", required=True, choices=sorted(ensemble.CONTROLS), help="control to evaluate")


def _run(args: argparse.Namespace, cfg: config.Config, root: Path) -> None:
    result = evaluation.run(cfg, args.control, root, loader=ensemble.loader(cfg, root, args.control),
                            metrics_file=False)  # numbers in eval/<control>/results.json and the report
    val, test = result["val"], result["test"]
    print(f"{args.control} (control): val RSUM {val['rsum']:.1f}, test RSUM {test['rsum']:.1f} "
          f"(R@1 i2t {test['i2t_r1']:.1f}, t2i {test['t2i_r1']:.1f}) [{result['protocol']}]")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return stage_main(__doc__.splitlines()[0], _run, argv, _args)


if __name__ == "__main__":
    sys.exit(main())
