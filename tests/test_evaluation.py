"""evaluate@<method> on tiny features with real (randomly initialised) method models."""
from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from conftest import tiny_config
from crossalign import evaluation, registry
from crossalign.io import load_features, read_json, write_json
from crossalign.methods import load_aligner
from crossalign.retrieval import METRIC_KEYS, retrieval_metrics, score_matrices
from eval_helpers import run_of, save_model, write_split_features

torch.set_num_threads(1)


@pytest.mark.parametrize("method, protocol", [("contrastive", "embedding similarity"),
                                              ("cross_attention", "exact all-pairs (blocks 8x16)"),
                                              ("joint", "shortlist k=4 re-rank alpha=0.5"),
                                              ("concat_mlp", "exact all-pairs (blocks 8x16)")])
def test_evaluate_writes_metrics_scores_ranks(tmp_path, method, protocol):
    cfg = tiny_config(tmp_path)
    write_split_features(tmp_path)
    path = save_model(cfg, tmp_path, method, 0, mlflow_run=False)
    result = evaluation.run(cfg, method, tmp_path)

    assert read_json(evaluation.results_path(tmp_path, method)) == result and result["method"] == method
    assert read_json(tmp_path / "metrics" / f"{method}.json") == evaluation.metrics_summary(result)
    assert not (tmp_path / "mlruns").exists()  # trained without tracking: no store is created
    assert result["protocol"].startswith(protocol) and "full split" in result["protocol"]
    for split in ("val", "test"):
        assert set(METRIC_KEYS) <= set(result[split])
    # the written numbers are the pure metrics of the method's own score matrices
    model, _ = load_aligner(path)
    test = load_features(tmp_path / "data" / "features" / "test")
    i2t, t2i = score_matrices(model, test, "cpu", 8, 16)
    expected = retrieval_metrics(i2t, test.caption_image_index, t2i)
    assert {k: result["test"][k] for k in expected} == pytest.approx(expected)
    scores = np.load(tmp_path / "eval" / method / "test_scores.npy")
    assert scores.dtype == np.float32 and scores.shape == (16, 32)
    np.testing.assert_allclose(scores, i2t, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "eval" / method / "test_scores_t2i.npy").exists() == (method == "joint")
    ranks = np.load(tmp_path / "eval" / method / "ranks" / "seed-0" / "test_t2i.npy")
    assert ranks.shape == (32,) and result["test"]["t2i_r1"] == pytest.approx(100 * (ranks < 1).mean())
    probe = result["test"]["binding_probe"]
    assert probe["overall"]["pairs"] == 8 and set(probe["per_swap"]) == {"colour", "position"}
    assert 0 <= probe["overall"]["i2t"] <= 100


def test_several_seeds_mean_std_and_mlflow_logging(tmp_path):
    cfg = tiny_config(tmp_path, train={"seeds": [0, 1]})
    write_split_features(tmp_path)
    for seed in (0, 1):
        save_model(cfg, tmp_path, "contrastive", seed)
    result = evaluation.run(cfg, "contrastive", tmp_path)
    per = result["test"]["per_seed"]
    assert set(per) == {"0", "1"}
    assert result["test"]["rsum"] == pytest.approx((per["0"]["rsum"] + per["1"]["rsum"]) / 2)
    assert result["test"]["std"]["rsum"] == pytest.approx(abs(per["0"]["rsum"] - per["1"]["rsum"]) / 2 ** 0.5)  # ddof=1
    best = max((0, 1), key=lambda s: result["val"]["per_seed"][str(s)]["rsum"])
    assert result["scores_seed"] == best
    with registry.using(cfg, tmp_path) as client:
        run = client.get_run(run_of(cfg, tmp_path, "contrastive", 1))
    assert run.data.metrics["eval_test_rsum"] == pytest.approx(per["1"]["rsum"])
    assert mlflow.get_tracking_uri() != registry.tracking_uri(cfg, tmp_path)  # global URI restored


def test_missing_seed_and_mismatched_index_fail_clearly(tmp_path):
    cfg = tiny_config(tmp_path, train={"seeds": [0, 3]})
    write_split_features(tmp_path)
    save_model(cfg, tmp_path, "contrastive", 0, mlflow_run=False)
    with pytest.raises(FileNotFoundError, match="seed-3/model.json.*seed 3"):
        evaluation.run(cfg, "contrastive", tmp_path)
    index = read_json(tmp_path / "eval" / "test_index.json")
    index["image_ids"] = index["image_ids"][::-1]
    write_json(tmp_path / "eval" / "test_index.json", index)
    with pytest.raises(ValueError, match="test_index.json: image_ids"):
        evaluation.run(tiny_config(tmp_path), "contrastive", tmp_path)
    assert not (tmp_path / "metrics" / "contrastive.json").exists()  # nothing half-written


def test_model_without_a_run_is_evaluated_and_not_logged(tmp_path, caplog):
    cfg = tiny_config(tmp_path)
    write_split_features(tmp_path)
    save_model(cfg, tmp_path, "contrastive", 0)  # a run exists, but for other weights
    save_model(cfg, tmp_path, "contrastive", 0, mlflow_run=False, init_seed=7)
    result = evaluation.run(cfg, "contrastive", tmp_path)
    assert "no finished MLflow run with these weights" in caplog.text
    with registry.using(cfg, tmp_path) as client:
        (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert "eval_test_rsum" not in run.data.metrics
    assert read_json(evaluation.results_path(tmp_path, "contrastive")) == result  # the outputs are still written


def test_stage_entry_point_exits_2_with_the_reason(tmp_path, monkeypatch, capsys):
    from crossalign.config import dump_params
    from tasks import evaluate as stage

    (tmp_path / "params.yaml").write_text(dump_params(tiny_config(tmp_path)))
    monkeypatch.chdir(tmp_path)
    assert stage.main(["--method", "joint"]) == 2
    assert "data/features/val" in capsys.readouterr().err


def _fold_alone(split, rows: slice):
    """The fold as its own split: its images and only their captions (rows re-based)."""
    from crossalign.io import FeatureSplit

    cols = np.flatnonzero((split.caption_image_index >= rows.start) & (split.caption_image_index < rows.stop))
    sub = split.select_captions(cols)
    return FeatureSplit(root=split.root, meta=split.meta, image_tokens=split.image_tokens[rows],
                        image_pooled=split.image_pooled[rows], text=sub.text, text_pooled=sub.text_pooled,
                        image_ids=split.image_ids[rows], caption_image_index=sub.caption_image_index - rows.start,
                        caption_ids=sub.caption_ids)


@pytest.mark.parametrize("method", ["joint", "contrastive"])
def test_each_fold_equals_evaluating_that_fold_alone(tmp_path, monkeypatch, method):
    """The 1K numbers are the mean over folds of each fold evaluated as a split of its own. For the
    re-ranking method the shortlists must come from the fold: the old cut of the full matrices (a
    fold re-ranking only its members of the full top-k) gives other numbers here."""
    from conftest import make_tiny_features
    from crossalign import retrieval
    from crossalign.methods import build_aligner

    monkeypatch.setattr(retrieval, "FOLD_IMAGES", 8)  # five folds of 8 images in a 40-image split
    # re-rank by the match score alone over a shortlist of 6 of a fold's 16 captions
    cfg = tiny_config(tmp_path, methods={"embed_dim": 16, "joint": {"heads": 2, "hard_k": 4, "shortlist_k": 6,
                                                                    "fusion_alpha": 1.0}})
    split = load_features(make_tiny_features(tmp_path / "split", n_images=40, seed=3))
    torch.manual_seed(0)
    model = build_aligner(cfg, method, split.image_dim, split.text_dim).eval()
    metrics, *_ = evaluation.evaluate_model(model, split, cfg, torch.device("cpu"))
    folds = retrieval.fold_slices(40)
    alone = [evaluation.evaluate_model(model, _fold_alone(split, rows), cfg, torch.device("cpu"))[0] for rows in folds]
    for key in METRIC_KEYS:
        assert metrics["1k"][key] == pytest.approx(np.mean([a[key] for a in alone])), key
    if method == "joint":  # the old protocol (cut out of the full re-ranked matrices) differs
        i2t, t2i = score_matrices(model, split, "cpu", 8, 16)
        cut = retrieval.coco_metrics(i2t, t2i, split.caption_image_index)[0]["1k"]
        assert cut["rsum"] != pytest.approx(metrics["1k"]["rsum"])
