"""No choice reads the test split: tune -> train -> evaluate -> select on a tiny project, run twice,
the second time with the test split's features and captions regenerated (another generator seed,
captions shuffled over the images). Everything chosen must be byte-identical: ``tuned/<m>.json``
(the tuned values and every trial's val RSUM), each trained model's weights, the champion and the
validation ranking that picked it. Only the test numbers may differ (and must: else the test
split was not really replaced)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import make_tiny_features, tiny_config
from crossalign.evaluate import stage as evaluation
from crossalign.select import stage as selection
from crossalign.train import stage as training
from crossalign.train import tuning
from crossalign.io import load_features, read_json, write_json
from crossalign.methods import WEIGHTS
from crossalign.train.tracker import MlflowTracker

METHODS = ["concat_mlp", "contrastive", "cross_attention"]


def _index(root: Path, split: str, shuffle_seed: int | None = None) -> None:
    """eval/<split>_index.json for the split's features (twins: image 2k with 2k+1)."""
    feats = load_features(root / "data" / "features" / split)
    captions = [f"{split} caption {j}" for j in range(feats.n_captions)]
    if shuffle_seed is not None:
        captions = list(np.random.default_rng(shuffle_seed).permutation(captions))
    write_json(root / "eval" / f"{split}_index.json", {
        "image_ids": feats.image_ids.tolist(),
        "caption_image_ids": feats.image_ids[feats.caption_image_index].tolist(),
        "captions": captions,
        "twins": [{"image": 2 * k, "twin": 2 * k + 1, "swap": "colour"} for k in range(feats.n_images // 2)]})


def _project(root: Path, test_seed: int, shuffle: bool) -> None:
    """Tiny train / val (identical in both runs) and a test split made from ``test_seed``; with
    ``shuffle`` the test captions' features are also permuted over the images."""
    make_tiny_features(root / "data" / "features" / "train", n_images=32, seed=0)
    make_tiny_features(root / "data" / "features" / "val", n_images=12, seed=0)
    test = make_tiny_features(root / "data" / "features" / "test", n_images=12, seed=test_seed)
    if shuffle:  # the caption rows' features move to other images: a different test set, same shapes
        order = np.random.default_rng(test_seed).permutation(np.load(test / "text_pooled.npy").shape[0])
        for name in ("text_pooled.npy",):
            np.save(test / name, np.load(test / name)[order])
    _index(root, "val")
    _index(root, "test", shuffle_seed=test_seed if shuffle else None)


def _pipeline(root: Path) -> dict:
    cfg = tiny_config(root, train={"methods": METHODS, "epochs": 2, "seeds": [0]},
                      tune={"trials": 3, "epochs": 2, "threads": 1, "pruner_startup_trials": 1, "warmup_epochs": 1})
    torch.set_num_threads(1)
    for method in METHODS:  # tune@<m>
        tuning.write_tuned(root, tuning.tune(cfg, root, method, log=lambda s: None))
    for method in METHODS:  # train@<m> with the tuned values, tracked (select registers the runs)
        tuned, _ = tuning.apply_tuned(cfg, root, method)
        training.run(tuned, root, method, tracker_factory=MlflowTracker, log=lambda s: None)
    for method in METHODS:  # evaluate@<m>: reads test, and reports it
        evaluation.run(cfg, method, root)
    return selection.run(cfg, root)


def test_nothing_chosen_changes_when_the_test_split_is_replaced(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _project(a, test_seed=5, shuffle=False)
    _project(b, test_seed=6, shuffle=True)
    assert not np.array_equal(np.load(a / "data/features/test/text_pooled.npy"),
                              np.load(b / "data/features/test/text_pooled.npy"))
    sel_a, sel_b = _pipeline(a), _pipeline(b)

    # the test numbers did change: the test split really was another one
    test_a = {r["method"]: r["test"]["rsum"] for r in sel_a["leaderboard"]}
    test_b = {r["method"]: r["test"]["rsum"] for r in sel_b["leaderboard"]}
    assert test_a != test_b
    # ... and nothing chosen did
    for method in METHODS:
        assert (a / "tuned" / f"{method}.json").read_bytes() == (b / "tuned" / f"{method}.json").read_bytes(), method
        weights = Path("models") / method / "final" / "seed-0" / WEIGHTS
        assert (a / weights).read_bytes() == (b / weights).read_bytes(), method
    assert sel_a["champion"] == sel_b["champion"]
    ranking = lambda sel: [(r["method"], r["val_rsum"]) for r in sel["leaderboard"]]  # noqa: E731
    assert ranking(sel_a) == ranking(sel_b)
    assert sel_a["tuning"] == sel_b["tuning"]
    assert read_json(a / "reports" / "selection.json")["champion"] == sel_a["champion"]
