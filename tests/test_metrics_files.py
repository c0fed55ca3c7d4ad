"""Metrics files hold numbers only (and the champion's name), and ``dvc metrics show`` of the
default run, and of real captions at COCO 5K, fits 140 columns.

The metrics files are built by the stages' own writers (``evaluation.metrics_summary``,
``selection.selection_metrics``, ``io.write_json``) from fabricated results shaped like the
default synthetic run (four methods, three binding swap kinds, the caption-swap probe, one seed)
and like real captions (no twins, four caption-swap kinds, 1K folds), with the widest values
those keys can take; the width is measured on the real ``dvc metrics show`` output.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from crossalign.evaluate import stage as evaluation
from crossalign.select import stage as selection
from crossalign.config import METHOD_NAMES
from crossalign.io import write_json

WIDTH = 140  # 120 before the champion's name joined the table: "cross_attention" adds 17
SWAPS = ("colour", "position", "size")  # the synthetic set's binding twins


def fabricated_results(method: str, rsum: float = 599.99, recall: float = 100.0, five_k: bool = False) -> dict:
    """``eval/<m>/results.json`` as evaluate writes it, with long values (full float precision)."""
    split = {"i2t_r1": recall - 1 / 3, "i2t_r5": recall, "i2t_r10": recall, "i2t_medr": 1.0,
             "t2i_r1": recall - 2 / 3, "t2i_r5": recall, "t2i_r10": recall, "t2i_medr": 1.0,
             "rsum": rsum - 1 / 7, "n_images": 250.0, "n_captions": 1250.0}
    probe = {"i2t": 100 - 1 / 3, "t2i": 100 - 1 / 7, "mean": 100 - 5 / 21, "pairs": 84.0, "i2t_comparisons": 4200.0,
             "t2i_comparisons": 840.0, "ci95": {d: [100 - 2 / 3, 100 - 1 / 9] for d in ("i2t", "t2i", "mean")}}
    test = {**split, "binding_probe": {"chance": 50.0, "overall": probe, "per_swap": {k: dict(probe) for k in SWAPS}},
            "swap_probe": swap_probe()}
    if five_k:
        test["1k"] = dict(split)
    out = {"method": method, "protocol": "embedding similarity; COCO full split; i2t hit when any caption is in "
                                         "the top K; ties count against the query",
           "seeds": [0], "scores_seed": 0, "weights_sha256": {"0": "ab" * 32},
           "val": {**split, "binding_probe": {"chance": 50.0, "overall": dict(probe),
                                              "per_swap": {k: dict(probe) for k in SWAPS}},
                   "swap_probe": swap_probe()}, "test": test}
    if method == "joint":  # the fusion alpha chosen on val: results.json only
        out["fusion"] = {"grid": [0.0, 0.25, 0.5, 0.75, 1.0], "alpha": 0.75,
                         "val_rsum": {"0": 500 - 1 / 3, "0.75": 599.99}, "per_seed": {}}
    return out


def swap_probe() -> dict:
    """The caption-swap probe's record (crossalign.evaluate.swap) with long values; number absent."""
    cell = {"i2t": 100 - 1 / 3, "ci95": [100 - 2 / 3, 100 - 1 / 9], "images": 250, "pairs": 1250, "comparisons": 1250}
    return {"chance": 50.0, "unit": "image", "resamples": 2000, "overall": dict(cell),
            "per_kind": {"colour": dict(cell), "size": dict(cell), "number": {"absent": True, "images": 0, "pairs": 0},
                         "position": dict(cell)}}


def real_data_results(method: str) -> dict:
    """The same on real captions at COCO 5K: no binding twins (no twin probe), every swap kind present."""
    out = fabricated_results(method, five_k=True)
    for split in ("val", "test"):
        del out[split]["binding_probe"]
        out[split]["swap_probe"]["per_kind"]["number"] = dict(out[split]["swap_probe"]["per_kind"]["colour"])
    return out


def numeric_leaves(obj) -> list:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numeric_leaves(v)]
    return [obj]


def test_summary_is_flat_rounded_numbers_with_hand_values():
    results = fabricated_results("joint", rsum=421.0, recall=50.0)
    results["test"]["binding_probe"]["per_swap"]["size"] = {"i2t": 60.0, "t2i": 41.0}
    results["val"]["binding_probe"]["overall"] = {"i2t": 70.0, "t2i": 61.5}
    results["test"]["swap_probe"]["overall"]["i2t"] = 62.504
    summary = evaluation.metrics_summary(results)
    assert summary == {"val_rsum": 420.86, "val_bind": 65.75, "test_rsum": 420.86,
                       "bind": 99.76, "bind_lo": 99.33, "colour": 99.76, "position": 99.76,
                       "size": 50.5, "swap": 62.5}
    # no twins (real captions): the caption-swap probe's present kinds take the per-kind keys
    real = real_data_results("joint")
    real["test"]["swap_probe"]["per_kind"]["size"]["i2t"] = 40.0
    del real["test"]["swap_probe"]["per_kind"]["number"]["i2t"]
    real["test"]["swap_probe"]["per_kind"]["number"]["absent"] = True
    assert evaluation.metrics_summary(real) == {"val_rsum": 599.85, "test_rsum": 599.85, "test_rsum_1k": 599.85,
                                                "swap": 99.67, "colour": 99.67, "position": 99.67, "size": 40.0}
    assert all(type(v) is float for v in numeric_leaves(summary))
    assert evaluation.metrics_summary(fabricated_results("joint", five_k=True))["test_rsum_1k"] == 599.85
    assert selection.selection_metrics(results) == {"val_rsum": 420.86, "test_rsum": 420.86}


@pytest.mark.skipif(shutil.which("git") is None, reason="dvc metrics show needs git here")
@pytest.mark.parametrize("results", [fabricated_results, real_data_results], ids=["synthetic", "real-5k"])
def test_dvc_metrics_show_fits_140_columns_and_names_the_champion(tmp_path, results):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    files = [f"metrics/{m}.json" for m in METHOD_NAMES] + ["metrics/selection.json"]
    (repo / "dvc.yaml").write_text("metrics:\n" + "".join(f"  - {f}\n" for f in files))
    for method in METHOD_NAMES:
        write_json(repo / "metrics" / f"{method}.json", evaluation.metrics_summary(results(method)))
    write_json(repo / "metrics" / "selection.json",
               selection.selection_file("cross_attention", selection.selection_metrics(results("joint"))))
    for f in files:  # numbers only (the champion's name aside): no protocol, seeds, run ids
        values = json.loads((repo / f).read_text())
        values.pop("champion", None) if f.endswith("selection.json") else None
        assert all(isinstance(v, (int, float)) for v in numeric_leaves(values)), f

    env = {"DVC_NO_ANALYTICS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "400"}
    out = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show"], cwd=repo, env=env,
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 1 + len(files), out  # header + one row per file: nothing wrapped
    assert all(f in out for f in files) and "599.85" in out
    champion_column = lines[0].split().index("champion")  # the champion is named on the selection row
    assert next(ln for ln in lines if ln.startswith("metrics/selection.json")).split()[champion_column] == "cross_attention"
    assert max(map(len, lines)) <= WIDTH, out
