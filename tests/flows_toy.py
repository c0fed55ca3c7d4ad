"""A toy DVC project with crossalign's DAG shape, for the flow tests (tests/test_flows*.py).

``data -> features -> train@<m> -> evaluate@<m> -> select`` (foreach over ``train.methods`` of a
valid crossalign params.yaml); each command is a line of ``toy.py``, instant, and logs what it did
to ``toy-log.jsonl`` (step, item, start/end time, CUDA_VISIBLE_DEVICES). Knobs, from the environment:
``TOY_FAIL=m1,m2`` makes those methods' training fail; ``TOY_FLAKY=<path>`` makes ``data`` fail
once (until the file exists); ``TOY_SLEEP=s`` makes training take ``s`` seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import dump_params
from crossalign import config

TOY_PY = '''\
import json, os, sys, time
from pathlib import Path
import yaml
step, item = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
params = yaml.safe_load(open("params.yaml"))
start = time.time()
def write(path, text):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
if step == "data":
    flaky = os.environ.get("TOY_FLAKY")
    if flaky and not Path(flaky).exists():
        Path(flaky).write_text("failed once")
        sys.exit("error: download interrupted")
    write("raw/data.txt", params["data"]["dataset"])
elif step == "features":
    write("feats/f.txt", Path("raw/data.txt").read_text() + " features")
elif step == "train":
    if item in os.environ.get("TOY_FAIL", "").split(","):
        sys.exit(f"error: training {item} diverged")
    time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
    write(f"models/{item}/w.txt", f"{item} epochs={params['train']['epochs']}")
elif step == "evaluate":
    write(f"eval/{item}/ranks.txt", Path(f"models/{item}/w.txt").read_text())
    write(f"metrics/{item}.json", json.dumps({"method": item, "val": {"rsum": len(item)}}))
elif step == "select":
    methods = params["train"]["methods"]
    missing = [m for m in methods if not Path(f"metrics/{m}.json").exists()]
    if missing:
        sys.exit(f"error: cannot select a champion: missing methods {missing}")
    board = sorted((json.loads(Path(f"metrics/{m}.json").read_text()) for m in methods),
                   key=lambda r: -r["val"]["rsum"])
    write("reports/selection.json", json.dumps({"champion": board[0]["method"], "metric": "rsum",
                                                "leaderboard": board}))
    write("metrics/selection.json", json.dumps({"val_rsum": board[0]["val"]["rsum"]}))
    write("reports/comparison.md", "# Comparison\\n\\nchampion: " + board[0]["method"] + "\\n")
with open("toy-log.jsonl", "a") as fh:
    fh.write(json.dumps({"step": step, "item": item, "start": start, "end": time.time(),
                         "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
'''

DVC_YAML = """\
stages:
  data:
    cmd: python toy.py data
    deps:
      - toy.py
    params:
      - data.dataset
    outs:
      - raw
  features:
    cmd: python toy.py features
    deps:
      - toy.py
      - raw
    outs:
      - feats
  train:
    foreach: ${train.methods}
    do:
      cmd: python toy.py train ${item}
      deps:
        - toy.py
        - feats
      params:
        - train.epochs
      outs:
        - models/${item}
  evaluate:
    foreach: ${train.methods}
    do:
      cmd: python toy.py evaluate ${item}
      deps:
        - toy.py
        - models/${item}
      outs:
        - eval/${item}
      metrics:
        - metrics/${item}.json:
            cache: false
  select:
    cmd: python toy.py select
    deps:
      - toy.py
      - eval
    params:
      - train.methods
    metrics:
      - metrics/selection.json:
          cache: false
    outs:
      - reports:
          cache: false
"""

METHODS = ["concat_mlp", "contrastive", "joint"]


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``root`` with this venv first on PATH (stage commands say ``python``)."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=root, env=env,
                          capture_output=True, text=True, check=True)


def make_toy_project(root: Path, methods: list[str] = METHODS) -> Path:
    """Write the toy project into ``root`` (``dvc init --no-scm``) and return it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "toy.py").write_text(TOY_PY)
    (root / "dvc.yaml").write_text(DVC_YAML)
    cfg = config.from_dict({"train": {"methods": methods, "epochs": 1}})
    (root / "params.yaml").write_text("# toy params: a valid crossalign config\n" + dump_params(cfg))
    dvc(root, "init", "--no-scm", "-q")
    return root


def toy_log(root: Path) -> list[dict]:
    """What the toy commands did, in order (``[]`` when nothing ran)."""
    path = root / "toy-log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
