"""A toy DVC project with crossalign's DAG shape, for the flow tests (tests/test_flows*.py).

``data -> features -> train@<m> -> evaluate@<m> -> select`` (foreach over ``train.methods`` of a
valid crossalign params.yaml); each command is a line of ``toy.py``, instant, and logs what it did
to ``toy-log.jsonl`` (step, item, start/end time, CUDA_VISIBLE_DEVICES). Knobs, from the environment:
``TOY_FAIL=m1,m2`` makes those methods' training fail; ``TOY_FLAKY=<path>`` makes ``data`` fail
once (until the file exists); ``TOY_SLEEP=s`` makes training take ``s`` seconds. ``stress=True``
swaps in commands that burn CPU, sleep at random and check their inputs and outputs.
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

# The same DAG under load (``make_toy_project(..., stress=True)``): each command checks that its
# inputs exist when it starts and when it ends, burns CPU and sleeps for random short times, writes
# its outputs, and checks at the end that they are still there; it logs its start and end time and
# what it found missing to toy-log.jsonl.
STRESS_PY = """\
import json, os, random, sys, time
from pathlib import Path
import yaml
step, item = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
start = time.time()
train = yaml.safe_load(open("params.yaml"))["train"]
methods = train["methods"]
inputs = {"data": [], "features": ["raw/data.txt"], "train": ["feats/f.txt"],
          "evaluate": [f"models/{item}/w.txt"], "select": [f"eval/{m}/ranks.txt" for m in methods]}[step]
outputs = {"data": ["raw/data.txt"], "features": ["feats/f.txt"], "train": [f"models/{item}/w.txt"],
           "evaluate": [f"eval/{item}/ranks.txt", f"metrics/{item}.json"],
           "select": ["reports/selection.json", "metrics/selection.json", "reports/comparison.md"]}[step]
def missing(paths):
    return [p for p in paths if not Path(p).is_file()]
at_start = missing(inputs)
until = time.process_time() + random.uniform(0.02, 0.2)
while time.process_time() < until:  # burn CPU
    sum(i * i for i in range(1000))
time.sleep(random.uniform(0.0, 0.3))
text = " ".join(Path(p).read_text() if Path(p).is_file() else "MISSING" for p in inputs) or step
board = [{"method": m, "val": {"rsum": len(m)}} for m in sorted(methods, key=len, reverse=True)]
for p in outputs:
    Path(p).parent.mkdir(parents=True, exist_ok=True)
    Path(p).write_text(json.dumps({"step": step, "item": item, "epochs": train["epochs"] if step != "data" else None,
                                   "from": text[:200], "champion": board[0]["method"],
                                   "leaderboard": board}))
time.sleep(random.uniform(0.0, 0.2))
at_end, own = missing(inputs), missing(outputs)
with open("toy-log.jsonl", "a") as fh:
    fh.write(json.dumps({"step": step, "item": item, "start": start, "end": time.time(), "pid": os.getpid(),
                         "missing_at_start": at_start, "missing_at_end": at_end, "own_missing": own}) + "\\n")
sys.exit(1 if at_start or at_end or own else 0)
"""


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``root`` with this venv first on PATH (stage commands say ``python``)."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=root, env=env,
                          capture_output=True, text=True, check=True)


def make_toy_project(root: Path, methods: list[str] = METHODS, stress: bool = False) -> Path:
    """Write the toy project into ``root`` (``dvc init --no-scm``) and return it; ``stress``: the
    commands of :data:`STRESS_PY` (random CPU and sleep, their inputs and outputs checked)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "toy.py").write_text(STRESS_PY if stress else TOY_PY)
    (root / "dvc.yaml").write_text(DVC_YAML)
    cfg = config.from_dict({"train": {"methods": methods, "epochs": 1}})
    (root / "params.yaml").write_text("# toy params: a valid crossalign config\n" + dump_params(cfg))
    dvc(root, "init", "--no-scm", "-q")
    return root


def toy_log(root: Path) -> list[dict]:
    """What the toy commands did, in order (``[]`` when nothing ran)."""
    path = root / "toy-log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
