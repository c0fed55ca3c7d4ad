"""Honest intervals: the bootstrap resamples test images (captions travel with them), both
directions from one resample, seeds too; the seed std uses ddof=1."""
from __future__ import annotations

import numpy as np
import pytest

from crossalign.evaluate import stage as evaluation
from crossalign.select import stage as selection
from crossalign.io import write_json

Z = 1.959964  # two-sided 95 % normal quantile


def _hits(per_image: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One seed whose every K and every caption of an image share that image's 0/1 outcome."""
    i2t = np.repeat(per_image[:, None], 3, axis=1)[None]  # (1, N, 3)
    t2i = np.repeat(per_image[caption_image][:, None], 3, axis=1)[None]  # (1, M, 3)
    return i2t.astype(float), t2i.astype(float)


def _width(g: dict) -> float:
    return g["ci95"][1] - g["ci95"][0]


def test_ci_width_is_the_image_level_analytic_one():
    rng = np.random.default_rng(0)
    n, per = 400, 5
    caption_image = np.repeat(np.arange(n), per)  # (M,) five captions per image
    base = (rng.random(n) < 0.5).astype(float)
    better = np.maximum(base, rng.random(n) < 0.3)  # the same images, some turned into hits: paired
    g = selection.paired_bootstrap(_hits(better, caption_image), _hits(base, caption_image), caption_image, 4000)

    d = better - base  # (N,) per-image difference, shared by all its captions
    image_level = 2 * Z * 100 * d.std() / np.sqrt(n)  # normal approximation, the unit is the image
    caption_level = image_level / np.sqrt(per)  # what resampling the 2,000 captions independently gives
    unpaired = 2 * Z * 100 * np.sqrt((better.var() + base.var()) / n)
    assert g["t2i_r1"]["delta"] == pytest.approx(100 * d.mean())
    for key in ("i2t_r1", "t2i_r1"):
        assert _width(g[key]) == pytest.approx(image_level, rel=0.1), key
        assert _width(g[key]) > 1.8 * caption_level and _width(g[key]) < 0.7 * unpaired
    # i2t and t2i from the same resample: the six recalls move together, RSUM spreads 6x
    assert _width(g["rsum"]) == pytest.approx(6 * image_level, rel=0.1)
    assert g["rsum"]["significant"] and g["rsum"]["ci95"][0] > 0


def test_unequal_caption_counts_weight_t2i_by_captions():
    caption_image = np.array([0, 1, 1, 1])  # image 0: one caption, image 1: three
    method = (np.zeros((1, 2, 3)), np.array([1.0, 0, 0, 0])[None, :, None].repeat(3, 2))
    base = (np.zeros((1, 2, 3)), np.zeros((1, 4, 3)))
    g = selection.paired_bootstrap(method, base, caption_image, 2000)
    assert g["t2i_r1"]["delta"] == pytest.approx(25.0)  # 1 hit of 4 captions
    # resamples: {0,0} -> 100 %, {1,1} -> 0 %, {0,1} -> 25 %: the interval spans both ends
    assert g["t2i_r1"]["ci95"] == [0.0, 100.0] and not g["t2i_r1"]["significant"]


def test_seeds_are_resampled_before_images():
    n = 50
    caption_image = np.repeat(np.arange(n), 2)
    # seed 0 finds everything, seed 1 nothing: the images agree within a seed, the seeds do not
    method = (np.stack([np.ones((n, 3)), np.zeros((n, 3))]), np.stack([np.ones((2 * n, 3)), np.zeros((2 * n, 3))]))
    base = (np.zeros((1, n, 3)), np.zeros((1, 2 * n, 3)))
    g = selection.paired_bootstrap(method, base, caption_image, 2000)
    assert g["i2t_r1"]["delta"] == pytest.approx(50.0)
    # seed resamples (both, one twice, the other twice) give 50, 100, 0 %: P(0) = 1/4 > 2.5 %
    assert g["i2t_r1"]["ci95"] == [0.0, 100.0]
    assert not g["i2t_r1"]["significant"]  # significant only when the CI excludes 0


def test_bad_caption_maps_are_refused():
    base = (np.zeros((1, 3, 3)), np.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match=r"images \[2\] have no caption"):
        selection.paired_bootstrap(base, base, np.array([0, 0, 1, 1]), 10)
    with pytest.raises(ValueError, match="must map each of the 4 test captions"):
        selection.paired_bootstrap(base, base, np.array([0, 1, 2, 3]), 10)
    with pytest.raises(ValueError, match="test queries differ"):
        selection.paired_bootstrap(base, (np.zeros((1, 2, 3)), np.zeros((1, 4, 3))), np.array([0, 0, 1, 2]), 10)


def test_caption_images_reads_the_test_index(tmp_path):
    path = tmp_path / "eval" / "test_index.json"
    write_json(path, {"image_ids": [30, 10, 20], "caption_image_ids": [10, 10, 20, 30, 30]})
    np.testing.assert_array_equal(selection.caption_images(tmp_path), [1, 1, 2, 0, 0])
    write_json(path, {"image_ids": [30, 10], "caption_image_ids": [10, 99]})
    with pytest.raises(ValueError, match=r"test_index.json: caption_image_ids\[1\] = 99 is not in image_ids"):
        selection.caption_images(tmp_path)
    write_json(path, {"image_ids": [30, 10]})
    with pytest.raises(ValueError, match="missing key 'caption_image_ids'"):
        selection.caption_images(tmp_path)


def test_seed_std_is_the_sample_std():
    mean, std = evaluation._mean_std([{"rsum": 100.0, "note": None}, {"rsum": 104.0, "note": None}])
    assert mean["rsum"] == 102.0
    assert std["rsum"] == pytest.approx(np.sqrt(8.0))  # ((2^2 + 2^2) / (2 - 1)) ** 0.5, not 2.0
    assert std["note"] is None
    assert evaluation._mean_std([3.0]) == (3.0, None)  # one seed: no spread to report
