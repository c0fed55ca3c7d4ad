"""costs: parameter counts, serving kind, query latency ranked as evaluation ranks, training
seconds per epoch read back from MLflow; measured numbers stay out of reports/."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_features, tiny_config
from crossalign.select import costs
from crossalign.tracking import registry
from crossalign.io import load_features
from crossalign.methods import WEIGHTS, build_aligner
from crossalign.retrieval.scoring import encode_images, encode_texts, score_states
from crossalign.tracking.runs import weights_sha256
from eval_helpers import run_of, save_model

torch.set_num_threads(1)
METHODS = ("concat_mlp", "cross_attention", "contrastive", "joint")


def test_trainable_params_counts_only_what_trains():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 5, bias=False))
    model[1].weight.requires_grad_(False)
    assert costs.trainable_params(model) == 3 * 2 + 2


@pytest.mark.parametrize("method", METHODS)
def test_rank_images_ranks_as_evaluation_does(tmp_path, method):
    cfg = tiny_config(tmp_path, evaluate={"pair_chunk": 7})  # several re-rank chunks
    make_tiny_features(tmp_path / "test", n_images=12, captions_per_image=2)
    split = load_features(tmp_path / "test")
    torch.manual_seed(0)
    model = build_aligner(cfg, method, split.image_dim, split.text_dim).eval()
    gallery = encode_images(model, split, torch.device("cpu"))
    queries = encode_texts(model, split, torch.device("cpu"))
    _, t2i = score_states(model, gallery, queries, 4, 8, pair_chunk=5)  # (N, M) evaluation's t2i scores
    expected = np.argsort(-t2i, axis=0, kind="stable")[:10].T  # (M, 10)
    got = costs.rank_images(model, gallery, queries, cfg).numpy()
    np.testing.assert_array_equal(got, expected)
    assert costs.serving(model).split(":")[0] == {"contrastive": "yes", "joint": "shortlist"}.get(method, "no")


def test_train_seconds_come_from_the_mlflow_runs(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    make_tiny_features(tmp_path / "data" / "features" / "test", n_images=6, image_dim=12, text_dim=10)
    weights = save_model(cfg, tmp_path, "contrastive", 0) / WEIGHTS
    run_id = run_of(cfg, tmp_path, "contrastive", 0)
    with registry.using(cfg, tmp_path) as client:
        for epoch, seconds in ((1, 2.0), (2, 4.0), (3, 9.0)):
            client.log_metric(run_id, "epoch/seconds", seconds, step=epoch)
    metrics = {"seeds": [0], "weights_sha256": {"0": weights_sha256(weights)}}
    got = costs.train_seconds(cfg, tmp_path, "contrastive", metrics)
    assert got == {"s_per_epoch": 5.0, "epochs": 3, "mlflow_runs": [run_id]}
    assert costs.train_seconds(cfg, tmp_path, "contrastive", {"seeds": [0], "weights_sha256": {"0": "f" * 64}}) is None
    # without the weights' hash: found by the run's method/seed tags
    assert costs.train_seconds(cfg, tmp_path, "contrastive", {"seeds": [0]})["s_per_epoch"] == 5.0
    assert costs.train_seconds(cfg, tmp_path, "joint", {"seeds": [0]}) is None  # no run: said, not invented

    test = load_features(tmp_path / "data" / "features" / "test")
    models = costs.load_models(tmp_path, {"contrastive": {"seeds": [0], "scores_seed": 0}})
    measured = costs.measure(cfg, tmp_path, models, {"contrastive": metrics}, test, torch.device("cpu"))
    lat = measured["contrastive"]["query_latency"]
    assert (lat["1"]["queries"], lat["1000"]["queries"], lat["1000"]["gallery_images"]) == (1, 12, 6)
    assert (lat["1"]["repeats"], lat["1000"]["repeats"]) == (costs.REPEATS[1], costs.REPEATS[1000])
    monkeypatch.setattr(costs, "BUDGET_S", 0.0)  # a slow method: one timed call per count, said so
    slow = costs.query_latency(models["contrastive"], test, torch.device("cpu"), cfg)
    assert (slow["1"]["repeats"], slow["1000"]["repeats"]) == (1, 1)
    files = costs.write(tmp_path, measured, "test machine")
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["costs/costs.json", "costs/costs.md"]
    md = files[1].read_text()
    assert "| contrastive | " in md and "| 5.0 | " in md and "(12 queries)" in md and "test machine" in md
    assert set(costs.mlflow_metrics(measured)) == {"cost_contrastive_train_s_per_epoch", "cost_contrastive_query_1_ms",
                                                   "cost_contrastive_query_1000_ms"}
    with pytest.raises(FileNotFoundError, match="models/joint/final/seed-0/model.json"):
        costs.load_models(tmp_path, {"joint": {"seeds": [0]}})
