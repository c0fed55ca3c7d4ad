"""``python -m tasks.data``: write ``data/raw/<dataset>/`` (images + COCO caption files)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from crossalign import config
from crossalign.data import stage as data
from tasks._stage import stage_main


def _run(args: argparse.Namespace, cfg: config.Config, root: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    dest = data.run(cfg, root)
    print(f"data: {cfg.data.dataset} -> {dest.relative_to(root) if dest.is_relative_to(root) else dest} "
          f"in {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__.strip().splitlines()[0], _run, argv)


if __name__ == "__main__":
    sys.exit(main())
