"""Bit-identical CPU training at the shipped shapes and thread count (2 threads here).

The tiny shapes of tests/test_training.py run every kernel single-threaded, which hid a
multi-threaded one whose summation order varied run to run (the backward of advanced indexing:
``index_put_`` with float atomics, see ``crossalign.methods.common.gather``). These tests use the
default params (embed_dim 64, batch 128, the default methods' dims) and the default feature dims
(49 x 1280 image tokens, 384-d text tokens) with two threads. The SIGKILL is sent by the training
process to itself at a fixed optimiser step, so nothing depends on timing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_tiny_features
from crossalign import config
from crossalign.train import stage as training

THREADS = 2
# default feature dims (efficientnet_lite0 grid tokens, MiniLM tokens); 300 train captions = 3 steps of 128
SHAPES = {"regions": 49, "image_dim": 1280, "text_dim": 384, "max_len": 24, "captions_per_image": 5}
TRAIN = {"epochs": 3, "patience": 3, "device": "cpu", "threads": THREADS}


def default_features(root: Path) -> Path:
    for i, (split, n) in enumerate((("train", 60), ("val", 12))):
        make_tiny_features(root / "data" / "features" / split, n_images=n, seed=i, **SHAPES)
    return root


def default_config() -> config.Config:
    """params.yaml's defaults (all method shapes, batch 128) but 3 epochs on 2 threads."""
    cfg = config.from_dict({"train": TRAIN}, "test_determinism")
    assert cfg.methods.embed_dim == 64 and cfg.train.batch_size == 128  # the shipped shapes
    return cfg


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def weights(root: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(root / "models" / method / "final" / "seed-0" / "model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"weights differ (max abs per tensor): {diff}"


@pytest.mark.parametrize("method", ["cross_attention", "joint", "concat_mlp", "contrastive"])
def test_two_trainings_at_default_shapes_give_identical_weights(tmp_path, threads, method):
    runs = []
    for name in ("a", "b"):
        root = default_features(tmp_path / name)
        training.run(default_config(), root, method, log=lambda *_: None)
        assert torch.get_num_threads() == THREADS
        runs.append(weights(root, method))
    assert_identical(*runs)


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from crossalign import config
    from crossalign.train import stage as training
    root, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    lr_at = training.lr_at
    def lr_or_die(step, *args):  # called once per optimiser step with the global step
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return lr_at(step, *args)
    training.lr_at = lr_or_die
    training.run(config.from_dict({{"train": {train!r}}}, "sigkill"), root, "cross_attention")
""")


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(train=TRAIN))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed, clean = default_features(tmp_path / "killed"), default_features(tmp_path / "clean")
    ckpt = killed / "models" / "cross_attention" / "checkpoints" / "seed-0"
    # steps 0-2 are epoch 1, 3-5 epoch 2: die before step 4, in the middle of epoch 2
    first = subprocess.run([sys.executable, str(script), str(killed), "4"], env=env, capture_output=True, text=True)
    assert first.returncode == -9, first.stderr[-2000:]
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 1
    assert not (killed / "models" / "cross_attention" / "final").exists()
    resumed = subprocess.run([sys.executable, str(script), str(killed), "-1"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch 1" in resumed.stdout
    uninterrupted = subprocess.run([sys.executable, str(script), str(clean), "-1"], env=env, capture_output=True,
                                   text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    assert_identical(weights(killed, "cross_attention"), weights(clean, "cross_attention"))
    metas = [json.loads((r / "models" / "cross_attention" / "final" / "seed-0" / "model.json").read_text())
             for r in (killed, clean)]
    assert metas[0]["val_metrics"] == metas[1]["val_metrics"] and metas[0]["best_epoch"] == metas[1]["best_epoch"]
