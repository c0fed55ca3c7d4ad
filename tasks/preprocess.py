"""``python -m tasks.preprocess``: raw COCO-format data -> ``data/prepared/`` (see crossalign.preprocess.stage)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crossalign.preprocess import stage as preprocess
from crossalign.config import Config
from tasks._stage import stage_main


def _run(args: argparse.Namespace, cfg: Config, root: Path) -> None:
    out = preprocess.run(cfg, root)
    skipped = json.loads((out / "skipped.json").read_text())
    print(f"preprocess: wrote {out}; {len(skipped)} record(s) skipped (listed in {out / 'skipped.json'})")


def main(argv: list[str] | None = None) -> int:
    return stage_main("Decode, resize and tokenise the raw dataset into data/prepared/.", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
