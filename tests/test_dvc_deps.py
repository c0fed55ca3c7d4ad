"""Every stage of dvc.yaml lists, as deps, every project module its command imports.

A module a stage imports but does not list can change without DVC noticing: ``dvc status`` calls the
stage's outputs up to date while the code that made them is gone. The imports are derived from the
source (every ``import``/``from`` of ``crossalign``/``tasks``, at any depth, function bodies included,
with the packages' ``__init__.py`` that importing a submodule runs), not from a list kept by hand.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("crossalign", "tasks")


def module_file(name: str) -> Path | None:
    """``crossalign.x.y`` -> crossalign/x/y.py or crossalign/x/y/__init__.py (None if not ours)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _with_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__``, ``a/b/__init__`` and ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(path: Path) -> set[str]:
    """Project modules named by the import statements of one file (submodules of ``from pkg import sub``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if module_file(f"{node.module}.{alias.name}") is not None)
    return {m for name in names for m in _with_parents(name) if module_file(m) is not None}


def closure(module: str) -> set[Path]:
    """Every project file that running ``python -m module`` imports."""
    seen: set[str] = set()
    todo = _with_parents(module)
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name)))
    return {module_file(m).relative_to(ROOT) for m in seen}


def stages() -> dict[str, tuple[str, list[str]]]:
    """stage name -> (cmd, deps) with each ``foreach`` expanded over the params.yaml list it names."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    out = {}
    for name, stage in spec["stages"].items():
        if "foreach" in stage:
            keys = re.fullmatch(r"\$\{(.+)\}", stage["foreach"]).group(1).split(".")  # e.g. train.methods
            items = params
            for key in keys:
                items = items[key]
            for item in items:
                do = stage["do"]
                deps = [str(d).replace("${item}", item) for d in do.get("deps", [])]
                out[f"{name}@{item}"] = (do["cmd"].replace("${item}", item), deps)
        else:
            out[name] = (stage["cmd"], [str(d) for d in stage.get("deps", [])])
    return out


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_deps_cover_every_imported_module(stage: str) -> None:
    cmd, deps = stages()[stage]
    entry = re.search(r"-m\s+tasks\.(\w+)", cmd)
    assert entry, f"dvc.yaml stage {stage}: cmd {cmd!r} does not run a tasks/<stage>.py entry point"
    missing = sorted(str(p) for p in closure(f"tasks.{entry.group(1)}") if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} imports {missing} but does not list them as deps"


def test_closure_follows_from_imports_and_packages() -> None:
    files = {str(p) for p in closure("tasks.evaluate")}
    assert {"tasks/evaluate.py", "tasks/_stage.py", "tasks/__init__.py", "crossalign/__init__.py",
            "crossalign/config/__init__.py", "crossalign/evaluate/stage.py", "crossalign/retrieval/scoring.py"} <= files
    assert "crossalign/methods/joint.py" in files  # via crossalign.methods' __init__, which imports every method
    assert not any(f.startswith("flows/") for f in files)


def test_every_dataset_folder_is_ignored_ahead_so_dvc_leaves_the_gitignore_alone() -> None:
    """DVC appends a stage output's folder to the .gitignore beside it unless git already ignores
    it: the tracked data/raw/.gitignore lists every dataset the data stage can write."""
    import shutil
    import subprocess

    from crossalign import config
    from crossalign.data import stage as data

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and the repository's work tree")
    raw_dir = config.Config().data.raw_dir
    for dataset in data._builders():
        path = f"{raw_dir}/{dataset}"
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not ignored yet: DVC would append it to {raw_dir}/.gitignore"


def test_no_stage_depends_on_an_empty_file() -> None:
    """DVC prints "WARNING: '<dep>' is empty." for an empty dependency file, on every run of the
    stage: every file dvc.yaml lists as a dep (the packages' ``__init__.py`` included) has content."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    deps = {d for stage in doc["stages"].values() for d in (stage.get("do", stage).get("deps") or [])
            if isinstance(d, str) and "${" not in d}
    files = [d for d in deps if (ROOT / d).is_file()]
    assert "tasks/__init__.py" in files and "crossalign/__init__.py" in files
    assert [d for d in files if (ROOT / d).stat().st_size == 0] == []
