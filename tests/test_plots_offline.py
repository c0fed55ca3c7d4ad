"""`dvc plots show` renders the training curves offline (scripts/plots_offline.py): the project's
own dvc.yaml plots, opened in headless Chromium with every host unresolvable."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "plots_offline.py"
METHODS = ("concat_mlp", "cross_attention", "contrastive", "joint")

renders = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome"))
    or importlib.util.find_spec("vl_convert") is None,
    reason="needs chromium on PATH (apt-get install chromium) and vl-convert-python")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A DVC repo with the project's dvc.yaml/params.yaml and a training curve per method."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    for name in ("dvc.yaml", "params.yaml", ".dvc/plots/training_curve.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "plots" / "train").mkdir(parents=True)
    for i, m in enumerate(METHODS):
        rows = "".join(f"{e},0,{2.0 / e:.3f},{200 + 30 * e + 10 * i}\n" for e in range(1, 6))
        (tmp_path / "plots" / "train" / f"{m}.csv").write_text("epoch,seed,train_loss,val_rsum\n" + rows)
    return tmp_path


def run_script(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=repo, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@renders
def test_training_curves_render_offline(repo):
    done = run_script(repo, "--check", "--out", "offline")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 of 4 Vega plots drawn with no network" in done.stdout
    page = (repo / "offline" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and 'src="http' not in page
    for m in METHODS:  # each method's plot declares x and y: the validation RSUM per epoch
        assert f"{m}: validation RSUM per epoch" in page
    assert page.count('"field": "val_rsum"') >= len(METHODS) and '"field": "epoch"' in page
    assert (repo / "offline" / "screenshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@renders
def test_the_check_fails_on_dvcs_default_cdn_page(repo):
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", "default"], cwd=repo, capture_output=True)
    done = run_script(repo, "--check-only", "default/index.html")
    assert done.returncode == 1 and "0 of 4 Vega plots drawn" in done.stdout


def test_another_python_runs_the_script_with_the_projects_venv(tmp_path):
    """`python3 scripts/plots_offline.py` with an interpreter that lacks vl-convert-python runs
    itself again with .venv/bin/python instead of saying the package is not installed."""
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in the project")
    others = [p for p in (shutil.which("python3"), "/usr/bin/python3") if p and Path(p).exists()]
    bare = next((p for p in others if subprocess.run([p, "-c", "import vl_convert"], capture_output=True).returncode), None)
    if bare is None:
        pytest.skip("no python3 without vl-convert-python on this machine")
    done = subprocess.run([bare, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "--check-only" in done.stdout
    assert "not installed" not in done.stderr and "Traceback" not in done.stderr
