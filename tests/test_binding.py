"""The binding probe (crossalign.evaluate.binding): tallies and CIs computed by hand, the pair as the
bootstrap unit, and the premise that no test twin pair was seen in training, derived from the
generator's own image records."""
from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest

from crossalign.evaluate import binding
from crossalign.features import leaks
from crossalign.features import stage as features
from crossalign.config import SyntheticParams
from crossalign.data import synthetic

Z = 1.959964  # two-sided 95 % normal quantile


def test_pair_tallies_by_hand():
    # rows: images 0, 1; columns: caption 0 (of image 0), caption 1 (of image 1)
    scores = np.array([[0.9, 0.2],
                       [0.5, 0.5]])
    kinds, tallies = binding.pair_tallies(scores, scores, np.array([0, 1]),
                                          [{"image": 0, "twin": 1, "swap": "colour"},
                                           {"image": 1, "twin": 0, "swap": "colour"}])  # one pair, listed twice
    # x=0: i2t 0.9 > 0.2 win, t2i 0.9 > 0.5 win; x=1: i2t 0.5 == 0.5 tie (0.5), t2i 0.5 > 0.2 win
    assert kinds == ["colour"]
    np.testing.assert_array_equal(tallies, [[1.5, 2, 2, 2]])
    probe = binding.binding_probe(scores, scores, np.array([0, 1]), [{"image": 0, "twin": 1, "swap": "colour"}])
    colour = probe["per_swap"]["colour"]
    assert (colour["i2t"], colour["t2i"], colour["mean"], colour["pairs"]) == (75.0, 100.0, 87.5, 1)
    assert colour["ci95"]["mean"] == [87.5, 87.5]  # one pair: every resample is that pair
    assert probe["chance"] == 50.0 and probe["overall"]["i2t"] == 75.0


def test_interval_by_hand():
    # pair 0: i2t 3/4, t2i 1/4; pair 1: i2t 1/4, t2i 3/4; the four resamples of two pairs
    tallies = np.array([[3, 4, 1, 4], [1, 4, 3, 4]], float)
    index = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    ci = binding.interval(tallies, index)
    # i2t draws 75, 50, 50, 25 -> sorted 25 50 50 75; 2.5th pct at 0.075 of the way: 25 + 0.075*25
    assert ci["i2t"] == pytest.approx([26.875, 73.125])
    assert ci["t2i"] == pytest.approx([26.875, 73.125])
    assert ci["mean"] == pytest.approx([50.0, 50.0])  # directions move together within a draw
    # pooled, not averaged: 3 wins of 4 and 0 of 1 -> 3/5 = 60 %, not (75 + 0)/2
    uneven = np.array([[3, 4, 3, 4], [0, 1, 0, 1]], float)
    assert binding.interval(uneven, np.array([[0, 1]]))["i2t"] == pytest.approx([60.0, 60.0])


def test_bootstrap_matches_the_binomial_width_when_pairs_are_independent_coins():
    rng = np.random.default_rng(3)
    n, p = 400, 0.7
    wins = (rng.random(n) < p).astype(float)
    tallies = np.stack([wins, np.ones(n), wins, np.ones(n)], axis=1)  # (P, 4) one comparison per pair
    s = binding.summarise(tallies)
    rate = 100 * wins.mean()
    half = 100 * Z * np.sqrt(wins.mean() * (1 - wins.mean()) / n)  # normal approximation
    lo, hi = s["ci95"]["i2t"]
    assert s["i2t"] == pytest.approx(rate)
    assert (hi - lo) == pytest.approx(2 * half, rel=0.15)
    assert lo < rate < hi and abs((lo + hi) / 2 - rate) < 1.0
    assert binding.summarise(tallies) == s  # fixed seed: same scores, same interval


def test_pairs_not_comparisons_are_the_unit():
    """Many comparisons inside few pairs must not shrink the CI: 10 pairs x 100 identical
    comparisons is as uncertain as 10 pairs x 1."""
    wins = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], float)
    one = binding.summarise(np.stack([wins, np.ones(10), wins, np.ones(10)], 1))
    many = binding.summarise(np.stack([100 * wins, 100 * np.ones(10), 100 * wins, 100 * np.ones(10)], 1))
    assert one["ci95"] == many["ci95"] and one["ci95"]["i2t"][1] - one["ci95"]["i2t"][0] > 40


def test_probe_rejects_bad_twins():
    scores = np.zeros((2, 2))
    with pytest.raises(ValueError, match="twins\\[0\\]"):
        binding.binding_probe(scores, scores, np.array([0, 1]), [{"image": 0}])
    with pytest.raises(ValueError, match="no twin pair"):
        binding.binding_probe(scores, scores, np.array([0, 1]), [{"image": 0, "twin": 0, "swap": "size"}])


# ------------------------------------------------------------------ twins never seen in training
@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, list[dict]]:
    """The image records of a small synthetic set made by the real generator (its split plan)."""
    out = tmp_path_factory.mktemp("synthetic")
    p = SyntheticParams(n_train=60, n_val=12, n_test=24, image_size=64, workers=1)
    synthetic.generate(p, seed=0, out=out)
    return {s: json.loads((out / "annotations" / f"captions_{s}.json").read_text())["images"] for s in synthetic.SPLITS}


def _test_twins(records: list[dict]) -> list[dict]:
    return features.twin_rows(records, np.array([r["id"] for r in records]))


def test_probe_twins_were_never_seen_in_training(generated):
    twins = _test_twins(generated["test"])
    assert len(twins) >= 12 and {t["swap"] for t in twins} == {"colour", "size", "position"}
    assert leaks.twin_leaks(generated["test"], twins, generated["train"]) == []
    # the scene key is what a swap keeps: both twins of a pair share it, other scenes do not
    keys = [leaks.scene_key(r) for r in generated["test"]]
    for t in twins:
        same = [r for r in range(len(keys)) if leaks.same_scene(keys[t["image"]], keys[r])]
        assert same == sorted((t["image"], t["twin"])), t


def test_twin_leaks_catches_a_leaking_splitter(generated):
    test, train = generated["test"], deepcopy(generated["train"])
    twins = _test_twins(test)
    a = twins[0]["image"]
    # a splitter that put the pair's scene in train too (the twin partner, under a new id) ...
    partner = deepcopy(test[twins[0]["twin"]])
    partner["id"] += 10_000
    found = leaks.twin_leaks(test, twins, train + [partner])
    assert len(found) == 2 and "also a train scene" in found[0]
    # ... or the very image
    found = leaks.twin_leaks(test, twins, train + [test[a]])
    assert any(f"test image {test[a]['id']} " in x and "is in train" in x for x in found)


def test_features_stage_refuses_a_leaking_test_index(tmp_path: Path):
    from test_features import make_prepared

    make_prepared(tmp_path, "train", 4, seed=0)
    test_dir = make_prepared(tmp_path, "test", 4, seed=1)
    scene = {"objects": [{"colour": "red", "shape": "circle", "bbox": [0, 0, 10, 10]}]}
    for d in (tmp_path / "data" / "prepared" / "train", test_dir):
        records = json.loads((d / "images.json").read_text())
        records[0].update(scene)
        (d / "images.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="twin pair .* also a train scene"):
        features.write_test_index(test_dir, tmp_path / "eval" / "test_index.json")
    assert not (tmp_path / "eval" / "test_index.json").exists()
