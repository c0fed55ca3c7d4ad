"""What the distributed mode accepts from outside, checked before anything is written, checked out
or handed to DVC.

A ``run-stage`` flow run (flows/stage_run.py) is started by whoever can reach the Prefect API; its
parameters, the checkpoint manifests it reads from the DVC remote and the results workers hand back
as artifacts (flows/dispatch.py) are all input from outside this host. Every value is held to what
the project itself declares:

- ``params_yaml``: a valid crossalign configuration (:mod:`crossalign.config`: methods and controls
  only from the registry, every key and value typed) under both YAML readers that see it — PyYAML,
  which the stages use, and DVC's own, which substitutes ``${...}`` into ``dvc.yaml``;
- a stage name: one of the stages ``dvc.yaml`` declares, its ``foreach`` expanded against those
  params (:func:`declared_stages`);
- a commit: 40 lowercase hex digits; a comparison id: a UUID;
- a ``dvc.lock`` entry: the command ``dvc.yaml`` declares for that stage, outs only among its
  declared outs, every path relative and inside the project;
- a manifest ``{path: md5}``: every path a relative POSIX path (no absolute path, no ``..``, no
  ``.git`` / ``.dvc``) inside one of the outs it may carry, that resolves inside the clone (a
  symlink on the way out of it is refused), every md5 32 hex digits.

A refusal raises :class:`Refused` naming the value, where it came from and what is allowed.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from crossalign import config

COMMIT = re.compile(r"[0-9a-f]{40}")
MD5 = re.compile(r"[0-9a-f]{32}")
OUT_MD5 = re.compile(r"[0-9a-f]{32}(\.dir)?")     # a directory out's hash ends in .dir
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+@-]*")
PRIVATE_PARTS = {".git", ".dvc"}                  # git and DVC's own state: never written from outside
LOCK_KEYS = {"cmd", "deps", "params", "outs"}
_INTERP = re.compile(r"\$\{\s*([^}]*?)\s*\}")


class Refused(ValueError):
    """A value from outside this host (flow-run parameter, manifest, artifact) that is not allowed."""


@dataclass(frozen=True)
class DeclaredOut:
    path: str
    cache: bool
    persist: bool


@dataclass(frozen=True)
class DeclaredStage:
    """A stage as ``dvc.yaml`` declares it, ``${...}`` substituted."""

    name: str
    cmd: str | list[str]
    outs: tuple[DeclaredOut, ...]


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_commit(commit: Any) -> str:
    if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
        raise Refused(f"commit {_short(commit)}: expected a full commit id, 40 lowercase hex digits")
    return commit


def check_flow_run_id(value: Any, what: str = "comparison") -> str | None:
    """``None`` or a flow run id (a UUID, as Prefect writes it)."""
    if value is None:
        return None
    try:
        if isinstance(value, str) and str(uuid.UUID(value)) == value.lower():
            return value
    except ValueError:
        pass
    raise Refused(f"{what} {_short(value)}: expected a flow run id (a UUID) or nothing")


def parse_params(params_yaml: Any, source: str = "params_yaml") -> dict[str, Any]:
    """The params as DVC will read them, once the text is a valid crossalign configuration under
    both PyYAML (what the stages load) and DVC's YAML reader (what ``${...}`` in dvc.yaml reads)."""
    from dvc.utils.serialize import parse_yaml

    if not isinstance(params_yaml, str):
        raise Refused(f"{source}: expected the text of params.yaml, got {type(params_yaml).__name__}")
    try:
        seen_by_stages = yaml.safe_load(params_yaml)
        seen_by_dvc = parse_yaml(params_yaml, "params.yaml")
    except Exception as err:  # noqa: BLE001 - either reader's error: the text is not YAML
        raise Refused(f"{source}: not valid YAML: {err}") from None
    try:
        config.from_dict(seen_by_stages, source)
        config.from_dict(seen_by_dvc, f"{source} (as DVC reads it)")
    except config.ConfigError as err:
        raise Refused(str(err)) from None
    return seen_by_dvc


def _lookup(ctx: dict[str, Any], key: str, where: str) -> Any:
    node: Any = ctx
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise Refused(f"dvc.yaml {where}: ${{{key}}} is not in params.yaml")
        node = node[part]
    return node


def _interpolate(value: Any, ctx: dict[str, Any], where: str) -> Any:
    """``${key}`` substituted in ``value`` (strings, lists, mappings) as DVC does: a string that is
    exactly one ``${key}`` becomes that value, otherwise each is written into the string."""
    if isinstance(value, list):
        return [_interpolate(v, ctx, where) for v in value]
    if isinstance(value, dict):
        return {_interpolate(k, ctx, where): _interpolate(v, ctx, where) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    whole = _INTERP.fullmatch(value)
    if whole:
        return _lookup(ctx, whole.group(1), where)

    def text(match: re.Match) -> str:
        found = _lookup(ctx, match.group(1), where)
        if isinstance(found, bool) or not isinstance(found, (str, int, float)):
            raise Refused(f"dvc.yaml {where}: ${{{match.group(1)}}} is {_short(found)}, not a string or number")
        return str(found)

    return _INTERP.sub(text, value)


def _outs(body: dict[str, Any]) -> tuple[DeclaredOut, ...]:
    found = []
    for kind, cache_default in (("outs", True), ("metrics", True), ("plots", True)):
        for entry in body.get(kind) or []:
            path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            opts = opts or {}
            found.append(DeclaredOut(str(path), bool(opts.get("cache", cache_default)),
                                     bool(opts.get("persist", False))))
    return tuple(found)


def declared_stages(dvc_yaml: str, params: dict[str, Any]) -> dict[str, DeclaredStage]:
    """The stages of ``dvc.yaml`` (its text) with ``foreach`` expanded and ``${...}`` substituted
    from ``params`` (as :func:`parse_params` returns them): the same names, commands and outs as
    DVC's own expansion (tests check). Raises :class:`Refused` for a construct it does not know."""
    doc = yaml.safe_load(dvc_yaml) or {}
    unknown = sorted(set(doc) - {"stages", "plots", "metrics", "params", "artifacts"})
    if unknown:
        raise Refused(f"dvc.yaml: top-level {unknown} cannot be checked (vars are not supported here)")
    stages: dict[str, DeclaredStage] = {}
    for name, body in (doc.get("stages") or {}).items():
        if "foreach" in body:
            items = _interpolate(body["foreach"], params, f"stage {name} foreach")
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise Refused(f"dvc.yaml stage {name}: foreach {_short(items)} is not a list of names")
            for item in items:
                full = f"{name}@{item}"
                do = _interpolate(body["do"], {**params, "item": item}, f"stage {full}")
                stages[full] = DeclaredStage(full, do["cmd"], _outs(do))
        elif "matrix" in body:
            raise Refused(f"dvc.yaml stage {name}: matrix stages cannot be checked here")
        else:
            body = _interpolate(body, params, f"stage {name}")
            stages[name] = DeclaredStage(name, body["cmd"], _outs(body))
    return stages


def check_stage(name: Any, stages: dict[str, DeclaredStage], what: str = "stage") -> str:
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name) or name not in stages:
        raise Refused(f"{what} {_short(name)} is not a stage of dvc.yaml with these params; "
                      f"its stages: {', '.join(stages)}")
    return name


def check_relpath(rel: Any, what: str) -> str:
    """``rel`` as a relative POSIX path in canonical form: no absolute path, no ``..`` or ``.``,
    no empty part, no backslash or control character, no ``.git`` / ``.dvc`` part."""
    why = None
    if not isinstance(rel, str) or not rel:
        why = "not a non-empty string"
    elif any(ord(c) < 32 or c in "\\\x7f" for c in rel):
        why = "holds a backslash or a control character"
    elif rel.startswith("/"):
        why = "is an absolute path"
    elif ".." in rel.split("/"):
        why = "climbs out with '..'"
    elif PurePosixPath(rel).as_posix() != rel or "." in rel.split("/"):
        why = "is not in canonical form (empty or '.' parts, trailing '/')"
    elif PRIVATE_PARTS & set(rel.split("/")):
        why = "names git's or DVC's own files (.git, .dvc)"
    if why:
        raise Refused(f"{what}: path {_short(rel)} {why}; expected a relative path inside the project")
    return rel


def inside_clone(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` once every symlink on the way resolves inside ``root``; :class:`Refused` naming
    the symlink that leads out."""
    base = Path(root).resolve()
    path = base
    for part in PurePosixPath(check_relpath(rel, what)).parts:
        path = path / part
        if path.is_symlink() and not path.resolve().is_relative_to(base):
            raise Refused(f"{what}: path {rel!r} goes through the symlink {path} -> {path.resolve()}, "
                          f"outside the clone {base}")
    if not (base / rel).resolve().is_relative_to(base):  # belt and braces: the whole path resolved
        raise Refused(f"{what}: path {rel!r} resolves to {(base / rel).resolve()}, outside the clone {base}")
    return base / rel


def _under(rel: str, outs: list[str]) -> bool:
    return any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outs)


def check_manifest(manifest: Any, what: str, within: list[str] | None = None,
                   root: Path | None = None) -> dict[str, str]:
    """A side-store manifest ``{relative path: md5}``; with ``within``, every path must lie in one
    of those outs; with ``root``, resolve inside it (:func:`inside_clone`)."""
    if not isinstance(manifest, dict):
        raise Refused(f"{what}: expected a mapping of relative paths to md5s, got {type(manifest).__name__}")
    for rel, md5 in manifest.items():
        check_relpath(rel, what)
        if not isinstance(md5, str) or not MD5.fullmatch(md5):
            raise Refused(f"{what}: {rel!r} has md5 {_short(md5)}; expected 32 lowercase hex digits")
        if within is not None and not _under(rel, within):
            raise Refused(f"{what}: path {rel!r} is not inside an out it may carry "
                          f"({', '.join(within) or 'none'})")
        if root is not None:
            inside_clone(root, rel, what)
    return manifest


def check_lock_entry(name: str, entry: Any, stages: dict[str, DeclaredStage], what: str) -> dict[str, Any]:
    """A ``dvc.lock`` entry of stage ``name``: its declared command, its declared outs, relative paths."""
    stage = stages[name]
    if not isinstance(entry, dict) or not set(entry) <= LOCK_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise Refused(f"{what}: dvc.lock entry of {name} has {keys}; expected keys among {sorted(LOCK_KEYS)}")
    if entry.get("cmd") != stage.cmd:
        raise Refused(f"{what}: dvc.lock entry of {name} has command {_short(entry.get('cmd'))}, "
                      f"dvc.yaml declares {stage.cmd!r}")
    declared = [o.path for o in stage.outs]
    for kind in ("deps", "outs"):
        files = entry.get(kind, [])
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise Refused(f"{what}: dvc.lock entry of {name}: {kind} is not a list of mappings")
        for f in files:
            rel = check_relpath(f.get("path"), f"{what}: {name} {kind}")
            if kind == "outs" and rel not in declared:
                raise Refused(f"{what}: dvc.lock entry of {name} has out {rel!r}; dvc.yaml declares {declared}")
            md5 = f.get("md5")
            if md5 is not None and not (isinstance(md5, str) and OUT_MD5.fullmatch(md5)):
                raise Refused(f"{what}: {name} {kind} {rel!r} has md5 {_short(md5)}")
            bad = [k for k, v in f.items() if not isinstance(v, (str, int, float, bool))
                   or (k in ("size", "nfiles") and (isinstance(v, bool) or not isinstance(v, int)))]
            if bad:
                raise Refused(f"{what}: {name} {kind} {rel!r}: values of {bad} are not plain values")
    if not isinstance(entry.get("params", {}), dict):
        raise Refused(f"{what}: dvc.lock entry of {name}: params is not a mapping")
    return entry


def uncached_outs(stages: dict[str, DeclaredStage], names: list[str]) -> list[str]:
    """The ``cache: false`` outs of ``names``: what a side-store manifest of their results may carry."""
    return [o.path for n in names for o in stages[n].outs if not o.cache]


def persist_outs(stages: dict[str, DeclaredStage], name: str) -> list[str]:
    return [o.path for o in stages[name].outs if o.persist]


def check_result(result: Any, stage: str, stages: dict[str, DeclaredStage], what: str) -> dict[str, Any]:
    """A stage run's result (its artifact, flows/stage_run.py): for ``stage``, a known outcome, a
    lock entry as :func:`check_lock_entry`, side files only in the stage's ``cache: false`` outs."""
    if not isinstance(result, dict):
        raise Refused(f"{what}: expected a mapping, got {type(result).__name__}")
    if result.get("stage") != stage:
        raise Refused(f"{what}: the result is for stage {_short(result.get('stage'))}, not {stage}")
    if result.get("outcome") not in ("ran", "skipped"):
        raise Refused(f"{what}: outcome {_short(result.get('outcome'))}; expected ran or skipped")
    check_lock_entry(stage, result.get("lock"), stages, what)
    check_manifest(result.get("side"), f"{what}: side", within=uncached_outs(stages, [stage]))
    return result
