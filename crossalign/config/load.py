"""Loading ``params.yaml`` into the typed tree, and the messages a bad file gets: the dotted key,
the value given (credentials hidden), what is allowed, and for a typo the key it most likely meant."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from crossalign.config.params import Config
from crossalign.config.uris import _shown


class ConfigError(ValueError):
    """A params file that does not describe a valid configuration."""


def allowed_keys(loc: Iterable[Any]) -> list[str]:
    """The keys the section at dotted path ``loc`` accepts (``()`` = the top level); ``[]`` when
    ``loc`` does not lead to a section."""
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def suggest(key: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest in spelling to ``key`` (difflib ratio >= 0.6), or ``None``."""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_key_hint(loc: tuple[Any, ...]) -> str:
    """"did you mean `epochs`?" (or the allowed keys) for an unknown key at dotted path ``loc``."""
    allowed = allowed_keys(loc[:-1])
    guess = suggest(str(loc[-1]), allowed)
    if guess:
        return f"did you mean `{guess}`?"
    return f"allowed: {', '.join(allowed)}" if allowed else "check the spelling against params.yaml"


def missing_keys(raw: dict[str, Any], keys: Iterable[str]) -> list[tuple[str, str | None]]:
    """Which dotted ``keys`` (e.g. ``train.epochs``) the raw params mapping lacks, each with the
    closest existing sibling key (a likely typo) or ``None``. DVC needs every key a stage lists
    to be written out in the params file: a default from this module does not count."""
    out = []
    for key in keys:
        node: Any = raw
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                siblings = list(node) if isinstance(node, dict) else []
                guess = suggest(part, siblings)
                out.append((key, ".".join([*parts[:i], guess]) if guess else None))
                break
            node = node[part]
    return out


def _msg(e: Any) -> str:
    """Pydantic's message without the "Value error, " it puts before our validators' own text."""
    msg = str(e["msg"])
    return msg[len("Value error, "):] if e["type"] == "value_error" and msg.startswith("Value error, ") else msg


def _format_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {_shown(e['input'])}); {unknown_key_hint(tuple(e['loc']))}")
        elif isinstance(e.get("input"), dict):  # a check across several keys of a section
            lines.append(f"  {key}: {_msg(e)}")
        else:
            lines.append(f"  {key} = {_shown(e.get('input'))}: {_msg(e)}")
    return "\n".join(lines)


def from_dict(raw: dict[str, Any] | None, source: str = "<dict>") -> Config:
    """Validate a nested dict into a :class:`Config`; raise :class:`ConfigError` naming the bad keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load(path: str | Path = "params.yaml") -> Config:
    """Load and validate ``params.yaml``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return from_dict(raw, str(path))
