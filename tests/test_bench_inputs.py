"""Every bench/ script that reads an input (the shared COCO sample, params.yaml, the pipeline's
features) ends with one line naming what is missing, exit 2, no traceback, when it is absent."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (module, arguments, what the one line must name); run in an empty folder with CROSSALIGN_SHARED
# pointing nowhere. bench.features (random images without the sample) and bench.evaluate
# (synthetic inputs) read no input and are not listed.
SCRIPTS = [
    ("bench.preprocess", [], "{shared}/coco-sample/annotations/captions_train2017.json is missing"),
    ("bench.scale", ["--cache", "{tmp}/cache"], "{shared}/coco-sample/annotations/captions_train2017.json is missing"),
    ("bench.train", [], "params.yaml"),
    ("bench.placement_speed", [], "params.yaml"),
    ("bench.binding", ["--method", "joint"], "params.yaml"),
    ("bench.binding_ablation", [], "params.yaml"),
    ("bench.cell_probe", [], "data/features/train/meta.json"),
    ("bench.text_probe", [], "data/raw/synthetic/annotations/captions_train.json is missing"),
]


@pytest.mark.parametrize(("module", "args", "named"), SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_missing_input_is_one_line_without_traceback(tmp_path: Path, module: str, args: list[str], named: str):
    shared = tmp_path / "no-shared"
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "CROSSALIGN_SHARED": str(shared),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [a.format(tmp=tmp_path) for a in args]
    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(module + ":") and named.format(shared=shared) in err, err
    assert not (tmp_path / "cache").exists()  # bench.scale checks before it creates anything
