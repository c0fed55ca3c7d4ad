"""reports/: comparison.md and its PNGs from evaluation outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from crossalign import evaluation, report, selection
from crossalign.io import read_json
from eval_helpers import save_model, write_prepared_test, write_split_features

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curves(root, method):
    path = root / "plots" / "train" / f"{method}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("epoch,train_loss,val_rsum\n" + "".join(f"{e},{2.0 / e:.3f},{100 + 20 * e}\n" for e in (1, 2, 3)))


@pytest.fixture
def evaluated(tmp_path):
    cfg = tiny_config(tmp_path, train={"methods": ["concat_mlp", "joint"]})
    write_split_features(tmp_path)
    write_prepared_test(tmp_path)
    for m in cfg.train.methods:
        save_model(cfg, tmp_path, m, 0, mlflow_run=False)
        evaluation.run(cfg, m, tmp_path)
    _curves(tmp_path, "joint")
    metrics, _ = selection.load_metrics(cfg, tmp_path)
    board = selection.leaderboard(metrics)
    sel = {"champion": board[0]["method"], "metric": "val_rsum", "leaderboard": board,
           "gain_over_baseline": selection.gains(cfg, tmp_path, metrics), "missing": [], "registry": None}
    return cfg, tmp_path, sel


def test_report_writes_markdown_and_pngs(evaluated):
    cfg, root, sel = evaluated
    files = report.run(cfg, root, sel)
    names = {f.name for f in files}
    assert names == {report.RECALL_PNG, report.CURVES_PNG, report.T2I_PNG, report.I2T_PNG, "comparison.md"}
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == PNG_MAGIC and f.stat().st_size > 5_000
    md = (root / "reports" / "comparison.md").read_text()
    assert f"Champion: **{sel['champion']}**" in md
    assert "| joint |" in md and "| concat_mlp |" in md
    assert "Gain over concat_mlp" in md and sel["gain_over_baseline"]["joint"]["text"] in md
    assert "Binding probe" in md and "colour i2t/t2i" in md
    assert "no training curve for concat_mlp" in md  # absent curve is said, not hidden
    assert f"![{report.T2I_PNG}]({report.T2I_PNG})" in md
    assert "shortlist k=4 re-rank alpha=0.5" in md


def test_gallery_skipped_without_prepared_images_is_noted(evaluated):
    cfg, root, sel = evaluated
    for f in (root / "data" / "prepared" / "test").iterdir():
        f.unlink()
    files = report.run(cfg, root, sel)
    assert report.T2I_PNG not in {f.name for f in files}
    assert "no retrieval gallery" in (root / "reports" / "comparison.md").read_text()


def test_read_curve_rejects_a_csv_without_epoch(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("step,loss\n1,2\n")
    with pytest.raises(ValueError, match="c.csv: expected a CSV with an 'epoch' column"):
        report.read_curve(path)
    path.write_text("epoch,seed,train_loss,note\n1,0,1.5,x\n2,0,1.0,y\n")
    cols = report.read_curve(path)
    assert set(cols) == {"epoch", "seed", "train_loss"}
    np.testing.assert_allclose(cols["train_loss"], [1.5, 1.0])


def test_scores_that_do_not_fit_the_prepared_split_fail(evaluated):
    cfg, root, sel = evaluated
    np.save(root / "eval" / sel["champion"] / "test_scores.npy", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="test_scores.npy is \\(3, 3\\)"):
        report.run(cfg, root, sel)
    assert read_json(root / "eval" / "joint" / "results.json")["method"] == "joint"
