"""``python -m tasks.select``: champion by val RSUM, leaderboard, gains, report, registry alias."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from crossalign import config
from crossalign.select import stage as selection
from tasks._stage import stage_main


def _run(args: argparse.Namespace, cfg: config.Config, root: Path) -> None:
    result = selection.run(cfg, root)
    for row in result["leaderboard"]:
        print(f"{row['method']:>16}  val RSUM {row['val_rsum']:6.1f}  test RSUM {row['test']['rsum']:6.1f}")
    for method, gain in result["gain_over_baseline"].items():
        print(f"{method} vs {gain['baseline']}: {gain['text']}")
    reg = result["registry"]
    print(f"champion: {result['champion']} -> {reg['uri']} (version {reg['champion_version']})")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return stage_main("Select the champion, write the comparison report, move the registry alias.", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
