"""Which split a bench script scores: val by default, test only behind ``--final``.

Every choice a bench script informs (a recipe, an ingredient, a knob) reads train and val only:
val has its own binding twins (``eval/val_index.json``, written by the features stage beside
``eval/test_index.json``). A test number is printed only for the final, already-chosen
configuration, when the caller says so with ``--final``; the output then says so too.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

FINAL_BANNER = "FINAL: test split (the configuration was chosen on val; test numbers are reported, not used to choose)"


def add_final_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--final", action="store_true",
                        help="score the TEST split: only for the final configuration, already chosen on val "
                             "(without it every number is a val number)")


def scored_split(final: bool, say: Callable[[str], None] = print) -> str:
    """``"test"`` under ``--final`` (announced by :data:`FINAL_BANNER`), else ``"val"``."""
    if final:
        say(FINAL_BANNER)
        return "test"
    return "val"


def index_path(root: str | Path, split: str) -> Path:
    """``eval/<split>_index.json``: ids, captions and binding twins of ``split`` (val or test)."""
    if split not in ("val", "test"):
        raise ValueError(f"split {split!r}: expected val or test")
    return Path(root) / "eval" / f"{split}_index.json"
