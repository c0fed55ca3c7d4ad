"""Ctrl-C in a real stage process (``python -m tasks.<stage>`` on a tiny project): exit 130, one
line on stderr and no traceback, the last epoch checkpoint still whole (training resumes from it)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import dump_params, make_tiny_features, tiny_config
from crossalign.train import checkpoint
from eval_helpers import IMAGE_DIM, TEXT_DIM, write_split_features

ROOT = Path(__file__).resolve().parents[1]
METHOD = "contrastive"


def tiny_project(root: Path) -> Path:
    """params.yaml (tiny, CPU, MLflow in the project, many epochs) and data/features/{train,val,test}."""
    cfg = tiny_config(root, train={"epochs": 400, "patience": 400, "threads": 1},
                      tune={"trials": 3, "epochs": 400, "threads": 1})
    (root / "params.yaml").write_text(dump_params(cfg))
    make_tiny_features(root / "data" / "features" / "train", n_images=48, image_dim=IMAGE_DIM, text_dim=TEXT_DIM)
    write_split_features(root)
    return root


def wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the stage exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} after {seconds} s")
        time.sleep(0.2)


def interrupt(root: Path, stage: str, ready, what: str) -> tuple[int, str]:
    """Start ``python -m tasks.<stage> --method METHOD`` in ``root``, send SIGINT once ``ready()``;
    -> (exit code, what it wrote to stderr after the signal)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TMPDIR": str(root / "tmp")}
    (root / "tmp").mkdir()
    err_path = root / "stderr.txt"
    with open(err_path, "w") as err, open(root / "stdout.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"tasks.{stage}", "--method", METHOD], cwd=root, env=env,
                                stdout=out, stderr=err)
        wait_for(ready, proc, what)
        time.sleep(0.5)  # inside the epoch loop, not between two checks
        before = err_path.stat().st_size
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    return code, err_path.read_bytes()[before:].decode()


@pytest.mark.slow
def test_ctrl_c_in_training_exits_130_in_one_line_and_keeps_the_checkpoint(tmp_path: Path):
    root = tiny_project(tmp_path)
    ckpt = root / "models" / METHOD / "checkpoints" / "seed-0"
    code, err = interrupt(root, "train", lambda: (ckpt / checkpoint.STATE).exists(), "epoch checkpoint")
    assert code == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"interrupted: train@{METHOD} stopped by Ctrl-C"), err
    state = checkpoint.read_state(ckpt)  # still whole: the next run resumes from it
    assert state is not None and state["epoch"] >= 1
    assert json.loads((ckpt / checkpoint.STATE).read_text())["epoch"] == state["epoch"]


@pytest.mark.slow
def test_ctrl_c_in_tuning_exits_130_in_one_line_and_writes_nothing(tmp_path: Path):
    root = tiny_project(tmp_path)
    trials = lambda: list((root / "tmp").glob(f"crossalign-tune-{METHOD}-*/data/features"))  # noqa: E731
    code, err = interrupt(root, "tune", lambda: bool(trials()), "tuning trial")
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"interrupted: tune@{METHOD} stopped by Ctrl-C"), err
    assert not (root / "tuned" / f"{METHOD}.json").exists()  # no tuning record from a cut-short search
    assert not trials()  # the trial's temporary directory is gone


SWALLOWED = """
import os, signal, sys, time
from pathlib import Path
from tasks._stage import stage_main
from crossalign import io

class Finalised:
    def __del__(self):  # the KeyboardInterrupt raised in here is printed as "Exception ignored" and lost
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)

def run(args, cfg, root):
    Finalised()  # collected at once: SIGINT arrives inside its __del__
    print("after the swallowed interrupt", flush=True)
    io.write_json(root / "out.json", {"written": True})

sys.exit(stage_main("swallowed Ctrl-C", run))
"""


def test_ctrl_c_swallowed_by_a_finaliser_still_stops_the_stage_before_it_writes(tmp_path: Path):
    """SIGINT that lands in a ``__del__`` (or a GC weakref callback) raises a KeyboardInterrupt that
    Python prints and drops; the stage must still exit 130 and commit no output."""
    from conftest import dump_params, tiny_config
    (tmp_path / "params.yaml").write_text(dump_params(tiny_config(tmp_path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SWALLOWED], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert "after the swallowed interrupt" in proc.stdout  # the interpreter swallowed the raise: the code went on
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("interrupted: "), proc.stderr
    assert not (tmp_path / "out.json").exists()
    assert not list(tmp_path.glob(".out.json.tmp-*"))  # no temporary left behind either
