"""What every stage entry point shares: ``--params`` parsing and config load (the offline,
no-telemetry environment is set by the ``tasks`` package, before any stage imports)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from crossalign import config


def stage_main(description: str, run: Callable[[argparse.Namespace, config.Config, Path], object],
               argv: list[str] | None = None,
               add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse ``--params PATH`` (and a stage's own flags), load the typed config, call
    ``run(args, cfg, root)`` with ``root`` = the current directory. A bad config or bad input
    exits 2 with the message alone (no traceback)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.params)
        run(args, cfg, Path.cwd())
    except (config.ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
