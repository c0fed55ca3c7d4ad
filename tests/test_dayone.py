"""Day one, as a new user meets it: `make run` in a clone, then the README's and docs' commands.

One tiny-config `make run` in a git copy of the working tree (its `.venv` a link to this venv),
then: `git status` shows only what the README says `make run` changes; `crossalign search` with
the real offline encoders prints its answer and nothing else; every command the README and docs/
list as runnable here (tests/test_docs.py: RUN_AS_WRITTEN, SERVED) runs exactly as written in a
shell whose PATH lacks `.venv/bin`, without a traceback; `.venv/bin/dvc repro -s <stage>` works with
that PATH; a params typo (`train.epoch: 3`) removes no output through `make run` or
`crossalign check && dvc repro`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from servers import http_status, stop, wait_until
from test_docs import RUN_AS_WRITTEN, SERVED
from test_pipeline import copy_repo, tiny_params

pytestmark = pytest.mark.slow

VENV = Path(sys.prefix)
BARE_PATH = "/usr/bin:/bin"  # no .venv/bin, no python: what a shell that never activated the venv has
# what the README (section "run") says `make run` rewrites; nothing else may show in `git status`
CHANGED_BY_RUN = ("dvc.lock", "metrics/", "plots/train/", "reports/", "eval/test_index.json",
                  "eval/val_index.json")


def sh(args: list[str], cwd: Path, check: bool = True, path: str = BARE_PATH, timeout: int = 1500
       ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(cwd)}  # the copy's code, not the venv's editable install
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def git_status(repo: Path) -> list[str]:
    out = sh(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout
    return [line[3:] for line in out.splitlines()]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not (VENV / ".installed-stamp").exists() or not (VENV / "bin" / "dvc").exists():
        pytest.skip(f"{VENV} is not a `make install` venv (no .installed-stamp)")
    repo = copy_repo(tmp_path_factory.mktemp("dayone") / "repo")
    for rel in subprocess.run(["git", "ls-files", "*.gitignore"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.split():  # the committed .gitignore files DVC keeps
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    tiny_params(repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny params"], repo)
    (repo / ".venv").symlink_to(VENV)
    os.utime(repo / "pyproject.toml", (0, 0))  # the venv's install stamp is newer: make installs nothing
    assert sh(["make", "-q", "install"], repo, check=False).returncode == 0, "make would reinstall"
    sh(["make", "run"], repo)
    return repo


def test_make_run_leaves_git_status_clean_but_for_its_results(clone: Path) -> None:
    changed = git_status(clone)
    assert changed, "make run wrote no results"
    assert [p for p in changed if not p.startswith(CHANGED_BY_RUN)] == []
    assert not (clone / "mlflow.db").exists()
    status = sh([".venv/bin/dvc", "status"], clone).stdout
    assert "up to date" in status


def test_search_with_the_real_encoders_prints_only_its_answer(clone: Path) -> None:
    proc = sh([".venv/bin/crossalign", "search", "a red circle left of a blue square", "--top", "3"], clone)
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("champion: ") and lines[2].split()[:3] == ["rank", "score", "image_id"]
    paths = [line.split()[3] for line in lines[3:]]
    assert len(paths) == 3 and all((clone / p).is_file() for p in paths), paths
    empty = sh([".venv/bin/crossalign", "search", " "], clone, check=False)
    assert empty.returncode == 2 and "query text is empty" in empty.stderr


def test_documented_commands_run_as_written(clone: Path) -> None:
    """Each command exactly as the docs write it, in ``sh -c``, PATH without ``.venv/bin``."""
    before = git_status(clone)
    for cmd in RUN_AS_WRITTEN:
        proc = sh(["sh", "-c", cmd], clone, check=False)
        assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{cmd}:\n{proc.stderr[-3000:]}"
        assert "command not found" not in proc.stderr and "No module named" not in proc.stderr, cmd
    assert sorted(git_status(clone)) == sorted(before), "a documented command changed tracked files"


SERVED_HEALTH = {"mlflow ui": "http://127.0.0.1:5000/health", "prefect server start": "http://127.0.0.1:4200/api/health"}


def test_documented_servers_start_as_written(clone: Path) -> None:
    env = {**os.environ, "PATH": BARE_PATH, "PYTHONPATH": str(clone)}
    env.pop("VIRTUAL_ENV", None)
    for cmd in SERVED:
        url = next(u for key, u in SERVED_HEALTH.items() if key in cmd)
        if http_status(url, timeout=2) is not None:
            pytest.skip(f"{url} is taken by another process: cannot start `{cmd}` as written")
        log = clone / f"served-{len(cmd)}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["sh", "-c", f"exec {cmd}"], cwd=clone, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: http_status(url, timeout=2) == 200, 240, cmd, proc, log=log, interval=1)
        finally:
            stop(proc)
        text = log.read_text()
        log.unlink()
        assert "Traceback" not in text and "Failed to send telemetry" not in text, text[-3000:]


def test_venv_dvc_runs_a_stage_without_venv_on_path(clone: Path) -> None:
    proc = sh([".venv/bin/dvc", "repro", "-f", "-s", "data"], clone)
    assert "Running stage 'data'" in proc.stdout
    assert "up to date" in sh([".venv/bin/dvc", "status"], clone).stdout  # same bytes, committed


def test_a_params_typo_removes_no_output(clone: Path) -> None:
    params = clone / "params.yaml"
    good = params.read_text()
    assert "  epochs: 2\n" in good
    outs = [clone / "models" / "concat_mlp" / "final", clone / "plots" / "train" / "concat_mlp.csv",
            clone / "metrics" / "concat_mlp.json"]
    assert all(p.exists() for p in outs)
    before = git_status(clone)
    params.write_text(good.replace("  epochs: 2\n", "  epoch: 3\n"))
    try:
        run = sh(["make", "run"], clone, check=False)
        assert run.returncode != 0 and "did you mean `epochs`?" in run.stderr
        assert "Running stage" not in run.stdout
        chained = sh(["sh", "-c", ".venv/bin/crossalign check && .venv/bin/dvc repro"], clone, check=False)
        assert chained.returncode == 2 and "Running stage" not in chained.stdout
        assert all(p.exists() for p in outs)
        assert sorted(git_status(clone)) == sorted(before + ["params.yaml"])
    finally:
        params.write_text(good)
