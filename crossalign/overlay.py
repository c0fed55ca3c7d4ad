"""A params overlay (a YAML file with only the keys that differ from ``params.yaml``) as dotted
``section.key=value`` overrides, e.g. for ``dvc exp run -S`` (see ``params-coco-gpu.yaml``).

    python -m crossalign.overlay params-coco-gpu.yaml --flag=-S   # -S data.dataset=coco-karpathy -S ...

Values are written in the override grammar DVC's ``--set-param`` parses (Hydra): lists as
``[a,b]``, strings bare, booleans ``true``/``false``, null as ``null``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def _value(value: Any) -> str:
    if isinstance(value, str):
        if not value or any(c in value for c in " ,[]{}='\"\\"):
            raise ValueError(f"overlay value {value!r}: use a value without spaces, quotes, brackets or commas")
        return value
    return json.dumps(value, separators=(",", ":"))  # numbers, true/false, null, lists


def overrides(overlay: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested dict -> ['section.key=value', ...] in file order (lists are leaves)."""
    out = []
    for key, value in overlay.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(overrides(value, name + "."))
        else:
            out.append(f"{name}={_value(value)}")
    return out


def load_overlay(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of params sections, got {type(data).__name__}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a params overlay as dotted overrides.")
    parser.add_argument("overlay", type=Path)
    parser.add_argument("--flag", default="", help="put this flag before each override (e.g. --flag=-S)")
    args = parser.parse_args(argv)
    items = overrides(load_overlay(args.overlay))
    print(" ".join(f"{args.flag} {o}" if args.flag else o for o in items))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
