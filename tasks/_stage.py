"""What every stage entry point shares: ``--params`` parsing and config load (the offline,
no-telemetry environment is set by the ``tasks`` package, before any stage imports)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from crossalign import config, interrupt

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)


def stage_main(description: str, run: Callable[[argparse.Namespace, config.Config, Path], object],
               argv: list[str] | None = None,
               add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse ``--params PATH`` (and a stage's own flags), load the typed config, call
    ``run(args, cfg, root)`` with ``root`` = the current directory. A bad config or bad input
    exits 2 with the message alone (no traceback); Ctrl-C exits 130 with one line (checkpoints
    are written atomically after each epoch, so the last one stays whole)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    interrupt.install()
    try:
        cfg = config.load(args.params)
        run(args, cfg, Path.cwd())
        interrupt.check()  # SIGINT whose KeyboardInterrupt was swallowed (e.g. in a GC callback)
    except (config.ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {stage_name(run, args)} stopped by Ctrl-C; what it finished is kept (training "
              "resumes from its last epoch checkpoint): run the pipeline again to go on", file=sys.stderr)
        return INTERRUPTED
    return 0


def stage_name(run: Callable, args: argparse.Namespace) -> str:
    """``train@joint`` for ``tasks.train --method joint``: the stage's name in dvc.yaml."""
    module = sys.modules.get(run.__module__)  # "__main__" under `python -m tasks.train`: its spec names it
    spec = getattr(module, "__spec__", None)
    name = (spec.name if spec is not None else run.__module__).rpartition(".")[2]
    item = getattr(args, "method", None) or getattr(args, "control", None)
    return f"{name}@{item}" if item else name
