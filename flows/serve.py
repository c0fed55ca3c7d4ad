"""Serve ``compare-aligners`` on a cron schedule from this process (no work pool needed).

    python -m flows.serve [--cron "0 2 * * *"] [--name nightly] [--root .]

Creates (or updates) the deployment ``compare-aligners/<name>`` on the Prefect server that
``PREFECT_API_URL`` names, and runs its scheduled and manually triggered runs until stopped. The
work-pool route for several hosts is ``prefect.yaml`` (docs/scale-out.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from flows.compare import compare_aligners

DEFAULT_CRON = "0 2 * * *"   # nightly, 02:00 UTC, as prefect.yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the compare-aligners flow on a cron schedule.")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default: {DEFAULT_CRON!r}, UTC)")
    parser.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    parser.add_argument("--root", default=".", help="DVC project the runs work in (default: .)")
    args = parser.parse_args(argv)
    compare_aligners.serve(name=args.name, cron=args.cron, tags=["crossalign"],
                           parameters={"root": str(Path(args.root).resolve())},
                           description="Train, evaluate and select crossalign's aligners (the DVC DAG of dvc.yaml).")


if __name__ == "__main__":
    main()
