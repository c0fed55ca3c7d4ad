"""End to end: `dvc repro` of the real DAG on a tiny synthetic config, in a copy of the repo.

Checks the DVC contract: a second `dvc repro` does nothing, and changing one param
reruns exactly the stages that read it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def copy_repo(dest: Path) -> Path:
    """A git+DVC repo holding the working tree's tracked and new files (not outputs)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/", "models/", "eval/", "metrics/", "plots/",
                                                  "reports/", "mlruns/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    _run(["git", "init", "-q"], dest)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], dest)
    return dest


def tiny_params(dest: Path, **overrides) -> None:
    cfg = tiny_config(dest, **overrides)
    raw = cfg.model_dump(mode="json")
    raw["tracking"] = {**raw["tracking"], "tracking_uri": "sqlite:///mlruns/mlflow.db",
                       "artifact_location": "mlruns/artifacts"}
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def stages_run(proc: subprocess.CompletedProcess) -> set[str]:
    return {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_tiny_pipeline(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    tiny_params(repo)
    first = _run(["dvc", "repro"], repo)
    methods = ["concat_mlp", "cross_attention", "contrastive", "joint"]
    expected = ({"data", "preprocess", "features", "evaluate_control@contrastive+cross_attention", "select"}
                | {f"{s}@{m}" for s in ("tune", "train", "evaluate") for m in methods})
    assert stages_run(first) == expected

    selection = json.loads((repo / "reports" / "selection.json").read_text())
    assert selection["champion"] in methods
    for m in methods:
        results = json.loads((repo / "eval" / m / "results.json").read_text())
        metrics = json.loads((repo / "metrics" / f"{m}.json").read_text())
        assert results["method"] == m and metrics["test_rsum"] == round(results["test"]["rsum"], 2)
    assert (repo / "reports" / "comparison.md").exists()
    shown = _run(["dvc", "metrics", "show"], repo).stdout.splitlines()
    assert len(shown) == 6 and max(map(len, shown)) <= 140, shown  # header + 5 files, one table
    assert selection["champion"] in next(ln for ln in shown if ln.startswith("metrics/selection.json")).split()

    again = _run(["dvc", "repro"], repo)
    assert stages_run(again) == set()
    assert "up to date" in again.stdout

    # one method's param -> that method's tune/train/evaluate, the control it is part of, and select
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["methods"]["contrastive"]["temperature"] = 0.07
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_run(["dvc", "status", "--json"], repo).stdout)
    assert set(status) == {"tune@contrastive", "train@contrastive"}
    third = _run(["dvc", "repro"], repo)
    assert stages_run(third) == {"tune@contrastive", "train@contrastive", "evaluate@contrastive",
                                 "evaluate_control@contrastive+cross_attention", "select"}

    # a preprocess param -> preprocess and everything downstream, not data
    params["preprocess"]["resize"] = "center_crop"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(_run(["dvc", "status", "--json"], repo).stdout)
    assert set(status) == {"preprocess"}
