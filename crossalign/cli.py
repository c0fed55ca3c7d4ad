"""``crossalign`` console script: check the params, use the registered champion.

    crossalign check                                                   # params.yaml vs the typed config and dvc.yaml
    crossalign search "a red circle left of a blue square" --top 5   # best test images
    crossalign search --image photo.jpg --top 5                        # best test captions
    crossalign overlay params-coco-gpu.yaml --flag=-S                  # -S data.dataset=coco-karpathy -S ...
    crossalign mlflow-server --host 0.0.0.0 --port 5000 --backend-store-uri ... --artifacts-destination ...
    crossalign summary --elapsed 582                                   # where to look after a run (`make run`)

``check`` validates ``params.yaml`` with the typed config (unknown keys get a "did you mean"
suggestion) and checks that every param key a ``dvc.yaml`` stage lists is written in the file:
DVC removes a stage's outputs *before* it notices a missing param, so this runs first (``make
run``, the Prefect flow, and the README's ``crossalign check && dvc repro``).

``overlay`` prints a params overlay (a YAML file with only the keys that differ from
``params.yaml``, e.g. ``params-coco-gpu.yaml``) as the dotted overrides ``dvc exp run -S`` takes, in
the grammar DVC's ``--set-param`` parses (Hydra): lists as ``[a,b]``, strings bare, booleans
``true``/``false``, null as ``null``.

``search`` is :mod:`crossalign.select.search`. Heavy modules (torch, MLflow, transformers) are
imported only when a search runs, so ``--help``, ``check`` and ``overlay`` answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from crossalign import config, offline_defaults
from crossalign.tracking import mlflow_server

QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}  # a query prints its answer only
_VAR = re.compile(r"\$\{\s*([^}]+?)\s*\}")


# ---------------------------------------------------------------------------------------- check
def _lookup(name: str, raw: dict[str, Any], local: dict[str, Any]) -> Any:
    """The value of ``${name}`` in dvc.yaml: a foreach ``item`` / ``key`` (``item.x`` too) or a
    dotted params key; KeyError when there is none."""
    parts = name.split(".")
    node: Any = local if parts[0] in local else raw
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            raise KeyError(name)
        node = node[part]
    return node


def _interpolate(value: Any, raw: dict[str, Any], local: dict[str, Any]) -> Any:
    """dvc.yaml ``${...}`` templating for a string (a lone ``${x}`` keeps x's type)."""
    if not isinstance(value, str):
        return value
    whole = _VAR.fullmatch(value.strip())
    if whole:
        return _lookup(whole.group(1), raw, local)
    return _VAR.sub(lambda m: str(_lookup(m.group(1), raw, local)), value)


def dvc_param_keys(dvc_yaml: Path, raw: dict[str, Any], params_name: str = "params.yaml"
                   ) -> tuple[dict[str, list[str]], list[str]]:
    """The ``params.yaml`` keys each stage of ``dvc_yaml`` lists (``foreach`` expanded against
    ``raw``) -> ({stage: [dotted keys]}, problems such as a ``${key}`` the params lack)."""
    doc = yaml.safe_load(dvc_yaml.read_text()) or {}
    stages, problems = {}, []
    for name, stage in (doc.get("stages") or {}).items():
        variants: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        if isinstance(stage, dict) and "foreach" in stage:
            try:
                items = _interpolate(stage["foreach"], raw, {})
            except KeyError as err:
                problems.append(f"{dvc_yaml}: stage {name}: foreach ${{{err.args[0]}}} is not in {params_name}")
                continue
            pairs = items.items() if isinstance(items, dict) else ((None, i) for i in (items or []))
            for key, item in pairs:
                local = {"item": item} if key is None else {"key": key, "item": item}
                variants.append((f"{name}@{key if key is not None else item}", stage.get("do") or {}, local))
        elif isinstance(stage, dict):
            variants.append((name, stage, {}))
        for stage_name, body, local in variants:
            keys = []
            for entry in body.get("params") or []:
                listed = [entry] if isinstance(entry, str) else entry.get(params_name, []) if isinstance(entry, dict) else []
                for key in listed:
                    try:
                        keys.append(str(_interpolate(key, raw, local)))
                    except KeyError as err:
                        problems.append(f"{dvc_yaml}: stage {stage_name}: param ${{{err.args[0]}}} is not in {params_name}")
            stages[stage_name] = keys
    return stages, problems


def check_project(params: Path, dvc_yaml: Path | None) -> tuple[config.Config | None, list[str], int]:
    """Validate ``params`` with the typed config and, when ``dvc_yaml`` exists, check that every
    param key its stages list is written in ``params`` -> (config or None, problems, keys checked)."""
    problems: list[str] = []
    cfg = None
    try:
        cfg = config.load(params)
    except config.ConfigError as err:
        problems.append(str(err))
    try:
        raw = yaml.safe_load(params.read_text())
    except (OSError, yaml.YAMLError):
        return cfg, problems, 0
    if dvc_yaml is None or not dvc_yaml.exists() or not isinstance(raw, dict):
        return cfg, problems, 0
    stages, dvc_problems = dvc_param_keys(dvc_yaml, raw, params.name)
    problems += dvc_problems
    keys = sorted({k for ks in stages.values() for k in ks})
    missing = config.missing_keys(raw, keys)
    if missing:
        lines = [f"{params}: missing param(s) that {dvc_yaml} stages read (DVC would remove those stages' outputs, then fail):"]
        for key, guess in missing:
            readers = ", ".join(s for s, ks in stages.items() if key in ks)
            lines.append(f"  {key} (read by {readers}){missing_hint(key, guess, params.name)}")
        problems.append("\n".join(lines))
    if cfg is not None:
        problems += [f"{params}: {p}" for p in input_problems(cfg, params.resolve().parent)]
    return cfg, problems, len(keys)


def missing_hint(key: str, guess: str | None, params_name: str) -> str:
    """What to fix for a param key a stage reads but the file lacks, when the file has a key of
    nearly the same spelling (``guess``). Either the file's key is the typo (``methods.cross_atention``
    written for ``methods.cross_attention``), or the stage's key is: it was built from a misspelt
    name in a list the stage's ``foreach`` reads (``train.methods: [cross_atention]``)."""
    if not guess:
        return ""
    *section, name = key.split(".")
    if name in config.allowed_keys(section) or not config.allowed_keys(section):
        return f"; {params_name} has `{guess}` instead: rename it to `{key}`"
    return (f"; `{name}` is not a key of `{'.'.join(section)}` (did you mean `{guess.rpartition('.')[2]}`?): "
            f"fix the list in {params_name} that names it")


def input_problems(cfg: config.Config, root: Path) -> list[str]:
    """Inputs the config names that do not exist, found before any stage runs: ``data.folder``
    of a ``coco-folder``, ``flickr8k`` or ``flickr30k`` dataset (relative to the project root, as
    the data stage reads it)."""
    problems = []
    reads = {"coco-folder": "its COCO caption files and images"}
    reads |= {name: f"the {title} images" for name, title in config.FLICKR_DATASETS.items()}
    if cfg.data.dataset in reads and cfg.data.folder:
        folder = Path(cfg.data.folder)
        where = folder if folder.is_absolute() else root / folder
        if not where.is_dir():
            problems.append(f"data.folder = {cfg.data.folder!r}: {where} is not a folder "
                            f"(data.dataset {cfg.data.dataset} reads {reads[cfg.data.dataset]} there)")
    return problems


def run_check(params: Path, dvc_yaml: Path | None) -> int:
    """``crossalign check``: 0 and one line when all is well, else the problems on stderr and 2."""
    _, problems, n_keys = check_project(params, dvc_yaml)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"Nothing was run: fix {params}, then run the pipeline.", file=sys.stderr)
        return 2
    where = f"; all {n_keys} param keys that {dvc_yaml} reads are present" if n_keys else ""
    print(f"{params}: valid{where}")
    note = profile_note(params, params.resolve().parent / REAL_PROFILE)
    if note:
        print(note)
    return 0


REAL_PROFILE = "params-real.yaml"


def profile_note(params: Path, profile: Path) -> str | None:
    """A note when ``params`` runs a dataset of real photos without the keys of the real-photo
    profile (``params-real.yaml``: the recipe chosen on real captions) -> the keys that differ."""
    raw = yaml.safe_load(params.read_text())
    if not profile.is_file() or not isinstance(raw, dict) or raw.get("data", {}).get("dataset") == "synthetic":
        return None
    differ = []
    for item in overrides(load_overlay(profile)):
        key, value = item.split("=", 1)
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None or _override_value(node) != value:
            differ.append(f"{key} ({_override_value(node) if node is not None else 'unset'} -> {value})")
    if not differ:
        return None
    return (f"note: data.dataset {raw['data']['dataset']} holds real photos, but {params} keeps the synthetic "
            f"recipe where {profile.name} (chosen on real captions, docs/real-data.md) differs: "
            + ", ".join(differ) + f". Apply it: dvc exp run $(crossalign overlay {profile.name} --flag=-S)")


# -------------------------------------------------------------------------------------- overlay
def _override_value(value: Any) -> str:
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
            out.append(f"{name}={_override_value(value)}")
    return out


def load_overlay(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of params sections, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------- search
def _quiet() -> None:
    """Silence transformers' "Loading weights" progress bars and info lines, which a query would
    otherwise print besides its answer."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is only needed by HF encoders
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _print(hits: list[dict], text: str | None, image: Path | None) -> None:
    if hits:
        print(f"champion: {hits[0]['method']} (version {hits[0]['version']})")
    print(f"query: {text!r}" if text is not None else f"query image: {image}")
    last = "path (from the project root)" if text is not None else "caption"
    print(f"{'rank':>4}  {'score':>9}  {'image_id':<10}  {last}")
    for h in hits:
        what = h.get("path") if text is not None else h.get("caption")
        print(f"{h['rank']:>4}  {h['score']:9.4f}  {h['image_id']:<10}  {what or ''}")


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(prog="crossalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate params.yaml against the typed config and dvc.yaml (run before `dvc repro`)")
    c.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    c.add_argument("--dvc-yaml", default="dvc.yaml", help="pipeline whose param keys must exist (default: dvc.yaml)")
    s = sub.add_parser("search", help="rank the test split with the registered champion")
    s.add_argument("text", nargs="?", help="a caption to find images for")
    s.add_argument("--image", type=Path, help="an image file to find captions for")
    s.add_argument("--top", type=int, default=5, help="results to print (default 5)")
    s.add_argument("--split", default="test", choices=("train", "val", "test"), help="split searched")
    s.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    o = sub.add_parser("overlay", help="print a params overlay as dotted overrides (for `dvc exp run -S`)")
    o.add_argument("overlay", type=Path, help="YAML file with only the keys that differ from params.yaml")
    o.add_argument("--flag", default="", help="put this flag before each override (e.g. --flag=-S)")
    w = sub.add_parser("summary", help="where to look after a run: the report, the MLflow runs table, the metrics")
    w.add_argument("--elapsed", type=float, help="seconds the run took (printed first)")
    w.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    m = sub.add_parser("mlflow-server", help="run the MLflow tracking server every host logs to (basic-auth)",
                       description=mlflow_server.__doc__.split("\n\n")[0])
    mlflow_server.add_arguments(m)
    args = parser.parse_args(argv)
    if args.command == "check":
        return run_check(Path(args.params), Path(args.dvc_yaml))
    if args.command == "mlflow-server":
        return mlflow_server.run(args)
    if args.command == "overlay":
        try:
            items = overrides(load_overlay(args.overlay))
        except (OSError, ValueError, yaml.YAMLError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(" ".join(f"{args.flag} {o}" if args.flag else o for o in items))
        return 0
    if args.command == "summary":
        from crossalign.select import summary

        try:
            print("\n".join(summary.lines(config.load(args.params), Path.cwd(), args.elapsed)))
        except config.ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if (args.text is None) == (args.image is None):
        s.error("give either a query text or --image PATH")
    if args.text is not None and not args.text.strip():
        s.error("the query text is empty: give a caption to search for")
    if args.image is not None and not args.image.is_file():
        s.error(f"--image {args.image}: no such file")
    if args.top < 1:
        s.error("--top must be >= 1")
    try:
        cfg = config.load(args.params)
        _quiet()
        from crossalign.select import search

        hits = search.search(cfg, Path.cwd(), args.text, args.image, args.top, args.split)
    except search.NoChampion as err:
        print(str(err), file=sys.stderr)
        return 1
    except (config.ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print(hits, args.text, args.image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
