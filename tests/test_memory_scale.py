"""Peak memory of train and evaluate does not follow the split's size.

Each stage runs in a fresh subprocess that reports its own peak RSS (``ru_maxrss``); the same
stage on a fabricated split 4x larger must peak within a stated margin of the small one. Without
streaming (the split loaded, widened to float32 or left mapped) the difference is the split's
growth, several times the margin.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import REPO
from crossalign.io import FeatureWriter, atomic_dir

CHILD = """
import json, resource, sys
from pathlib import Path
import torch
from crossalign import config
from crossalign.evaluate import stage as evaluation
from crossalign.train import stage as training
from crossalign.io import load_features
from crossalign.methods import build_aligner
torch.set_num_threads(1)
stage, root, raw = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
cfg = config.from_dict(raw)
if stage == "train":
    training.run(cfg, root, "joint", log=lambda *a: None, max_steps=3)
else:
    split = load_features(root / "data" / "features" / "test")
    torch.manual_seed(0)
    model = build_aligner(cfg, "joint", split.image_dim, split.text_dim)
    evaluation.evaluate_model(model, split, cfg, torch.device("cpu"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
"""
CONFIG = {"methods": {"embed_dim": 16, "joint": {"heads": 2, "hard_k": 4, "shortlist_k": 4}},
          "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "threads": 1, "val_images": 20,
                    "placement": "stream", "seeds": [0], "twin_negatives": False, "caption_negatives": 0},
          "evaluate": {"device": "cpu", "block_images": 64, "block_texts": 256}}
DIM = 768  # image feature width: a split's bytes are mostly image tokens
MARGIN = 80 << 20  # allowed growth of peak RSS, bytes


def fabricate(path: Path, n: int, regions: int, seed: int, dim: int = DIM) -> int:
    """One split, streamed through FeatureWriter: n images x regions x dim fp16, one 12-token
    caption (dim 32) per image. Returns the image-token bytes."""
    rng = np.random.default_rng(seed)
    lengths = np.full(n, 12)
    with atomic_dir(path) as tmp:
        w = FeatureWriter(tmp, n, regions, dim, lengths, 32)
        for i in range(0, n, 256):
            b = min(256, n - i)
            w.write_images(i, rng.standard_normal((b, regions, dim), np.float32).astype(np.float16),
                           rng.standard_normal((b, dim), np.float32).astype(np.float16))
        w.write_texts(np.arange(n), rng.standard_normal((n, 12, 32), np.float32).astype(np.float16),
                      rng.standard_normal((n, 32), np.float32).astype(np.float16))
        w.close(np.arange(n), np.arange(n), np.arange(n), {})
    return n * regions * dim * 2


def peak_rss(stage: str, root: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, stage, str(root), json.dumps(CONFIG)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


def test_train_peak_memory_flat_when_train_split_grows_4x(tmp_path):
    """train.placement stream: 1,000 -> 4,000 training images (75 -> 301 MB of fp16 tokens; held in
    float32 they would add 450 MB) moves peak RSS by less than MARGIN."""
    sizes = {}
    for n in (1000, 4000):
        root = tmp_path / f"n{n}"
        sizes[n] = fabricate(root / "data" / "features" / "train", n, 49, seed=n)
        fabricate(root / "data" / "features" / "val", 40, 49, seed=1)
    assert sizes[4000] - sizes[1000] > 2.5 * MARGIN  # what holding the split would add, fp16 alone
    small, big = peak_rss("train", tmp_path / "n1000"), peak_rss("train", tmp_path / "n4000")
    assert big - small < MARGIN, f"peak RSS {small / 2**20:.0f} MB -> {big / 2**20:.0f} MB"


def test_evaluate_peak_memory_grows_only_by_the_score_matrices(tmp_path):
    """evaluate_model (joint: tokens read, similarity + re-rank) on 500 -> 2,000 images with one
    caption each and 49 x 2048 fp16 tokens per image (49 -> 196 MB of tokens, read batch by batch
    with their pages dropped). Allowed growth: what must grow -- three float32 [N, M] matrices
    (similarity, i2t, t2i) and the image states (N x 49 x 16 x 4 floats) -- plus 40 MB."""
    sizes = {}
    for n in (500, 2000):
        sizes[n] = fabricate(tmp_path / f"n{n}" / "data" / "features" / "test", n, 49, seed=n, dim=2048)
    must = 3 * 4 * (2000 ** 2 - 500 ** 2) + 4 * 4 * 49 * 16 * (2000 - 500)
    allowed = must + (40 << 20)
    assert sizes[2000] - sizes[500] > 2 * allowed - must  # mapped token pages alone would break it
    small, big = peak_rss("evaluate", tmp_path / "n500"), peak_rss("evaluate", tmp_path / "n2000")
    assert big - small < allowed, (f"peak RSS {small / 2**20:.0f} MB -> {big / 2**20:.0f} MB "
                                   f"(allowed growth {allowed / 2**20:.0f} MB)")
