"""Flow parameters -> ``params.yaml``, so that DVC (which hashes params.yaml) sees them.

A flow parameter left at ``None`` keeps the value in ``params.yaml``; a given one is written into
the file before the DAG is read (``train.methods`` also decides which ``foreach`` stages exist). The
result is validated by the project's typed config first, so an unknown method or dataset fails
before anything runs, with the allowed values.
"""
from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from crossalign import config
from crossalign.io import atomic_file


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: keeps the comments and key order of the committed params.yaml
    yaml.preserve_quotes = True
    yaml.width = 120
    return yaml


def overrides_from(methods: list[str] | None = None, dataset: str | None = None,
                   epochs: int | None = None) -> dict[str, dict[str, Any]]:
    """The flow parameters that were given, as ``{section: {key: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    if methods is not None:
        out.setdefault("train", {})["methods"] = list(methods)
        # a control exists only with both its methods (its dvc stage reads their models)
        out.setdefault("evaluate", {})["controls"] = [c for c, parts in config.CONTROL_PARTS.items()
                                                      if set(parts) <= set(methods)]
    if epochs is not None:
        out.setdefault("train", {})["epochs"] = epochs
    if dataset is not None:
        out.setdefault("data", {})["dataset"] = dataset
    return out


def validate_overrides(root: str | Path, overrides: dict[str, dict[str, Any]]) -> config.Config:
    """The config ``<root>/params.yaml`` with ``overrides`` would give, validated; the file is not
    written. Raises :class:`crossalign.config.ConfigError` as :func:`apply_overrides` does."""
    return apply_overrides(root, overrides, write=False)


def apply_overrides(root: str | Path, overrides: dict[str, dict[str, Any]], write: bool = True) -> config.Config:
    """Write ``overrides`` into ``<root>/params.yaml`` (only when a value changes; never with
    ``write=False``) and return the validated config. Raises :class:`crossalign.config.ConfigError`
    naming the key and the allowed values, leaving the file untouched, when the result is not a
    valid configuration."""
    path = Path(root) / "params.yaml"
    yaml = _yaml()
    try:
        doc = yaml.load(path.read_text())
    except FileNotFoundError:
        raise config.ConfigError(f"{path}: params file not found") from None
    updated = copy.deepcopy(doc)
    changed = False
    for section, values in overrides.items():
        if section not in updated or updated[section] is None:
            updated[section] = {}
        for key, value in values.items():
            if updated[section].get(key) != value:
                updated[section][key] = value
                changed = True
    plain = YAML(typ="safe").load(_dump(yaml, updated))
    cfg = config.from_dict(plain, f"{path} with flow parameters {overrides}")
    if changed and write:
        with atomic_file(path) as fh:
            fh.write(_dump(yaml, updated))
    return cfg


def _dump(yaml: YAML, doc: Any) -> str:
    buf = io.StringIO()
    yaml.dump(doc, buf)
    return buf.getvalue()
