"""Benchmarks, ``python -m bench.<name>`` from the project root (README: benchmarks).

Inputs are the project's own outputs (``params.yaml``, ``data/features``, ...) or the shared
COCO sample, ``coco-sample/`` in the folder named by ``$CROSSALIGN_SHARED`` (default
``../shared`` beside the repository). :func:`entry` runs a script's ``main``: an input that is
missing ends it with one line on stderr naming it, and exit 2 (no traceback). The package sets
the offline, no-telemetry environment defaults before any script imports torch or MLflow.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

from crossalign import offline_defaults

offline_defaults()

REPO = Path(__file__).resolve().parents[1]
SHARED_ENV = "CROSSALIGN_SHARED"


class MissingInput(RuntimeError):
    """An input file or folder of a benchmark does not exist (the message names it)."""


def shared_dir() -> Path:
    """The folder that holds ``coco-sample/``: ``$CROSSALIGN_SHARED``, else ``../shared``."""
    return Path(os.environ.get(SHARED_ENV) or REPO.parent / "shared")


def coco_sample() -> Path:
    """``<shared>/coco-sample``: 80 COCO train2017 images and their captions (may be absent)."""
    return shared_dir() / "coco-sample"


def need(path: Path, what: str) -> Path:
    """``path``, or :class:`MissingInput` naming it and what it is."""
    if not Path(path).exists():
        raise MissingInput(f"{path} is missing: {what}")
    return Path(path)


def need_sample() -> Path:
    """The COCO sample's folder, or :class:`MissingInput` saying where it is looked for."""
    sample = coco_sample()
    need(sample / "annotations" / "captions_train2017.json",
         f"the shared COCO sample (coco-sample/ in {shared_dir()}; set {SHARED_ENV} to the folder that holds it)")
    return sample


def entry(main: Callable[[], object]) -> NoReturn:
    """Run ``main()`` and exit with its code; a missing input (or params file) ends the script
    with one line on stderr and exit 2."""
    from crossalign.config import ConfigError

    prog = f"bench.{Path(sys.argv[0]).stem}"
    try:
        code = main()
    except MissingInput as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as err:
        print(f"{prog}: missing input {err.filename or err}: run it from the project root after "
              "`make run` (it reads the pipeline's outputs)", file=sys.stderr)
        sys.exit(2)
    except ConfigError as err:
        print(f"{prog}: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
