"""MLflow tracking: setup, one run per method with params/metrics/tags/artifacts, a loadable model."""
from __future__ import annotations

import hashlib
import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import tiny_config
from crossalign.tracking import runs as tracking
from crossalign.methods import mlflow_model
from crossalign.train import tracker
from crossalign.train import stage as training
from crossalign.io import load_features
from crossalign.methods import load_aligner
from crossalign.retrieval.scoring import score_matrices

torch.set_num_threads(1)


def test_setup_is_idempotent(tmp_path):
    cfg = tiny_config(tmp_path)
    first = tracking.setup(cfg, tmp_path)
    assert tracking.setup(cfg, tmp_path) == first
    assert (tmp_path / "mlruns" / "mlflow.db").exists()
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_registered_model(cfg.tracking.registered_model).name == cfg.tracking.registered_model


def test_relative_sqlite_uri_is_resolved_against_root(tmp_path):
    assert tracking.resolve_uri("sqlite:///mlruns/mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert tracking.resolve_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert tracking.resolve_uri("http://host:5000", tmp_path) == "http://host:5000"


def test_dvc_feature_hashes_from_lock(tmp_path):
    assert tracking.dvc_feature_hashes(tmp_path) == {}
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  features:\n    cmd: python -m tasks.features\n    outs:\n"
        "    - path: data/features\n      md5: abc.dir\n    - path: eval/test_index.json\n      md5: def\n")
    assert tracking.dvc_feature_hashes(tmp_path) == {"dvc.md5.data/features": "abc.dir"}


def test_training_run_is_tracked_and_the_model_loads_back(tmp_path, tiny_features):
    cfg = tiny_config(tmp_path, train={"epochs": 2, "device": "cpu", "threads": 1})
    result = training.run(cfg, tmp_path, "joint", tracker_factory=tracker.MlflowTracker, log=lambda *a: None)[0]
    final = tmp_path / "models" / "joint" / "final" / "seed-0"
    meta = json.loads((final / "model.json").read_text())
    assert not {k for k in meta if "mlflow" in k or "registered" in k} and "mlflow_run_id" not in result
    assert sorted(p.name for p in final.iterdir()) == ["model.json", "model.safetensors"]  # no PNG left behind
    sha = hashlib.sha256((final / "model.safetensors").read_bytes()).hexdigest()

    client = MlflowClient(cfg.tracking.tracking_uri)
    exp_id = tracking.setup(cfg, tmp_path)
    run = tracking.find_run(client, exp_id, "joint", 0, sha)
    run_id = run.info.run_id
    assert run.info.run_name == "joint" and run.info.status == "FINISHED"
    assert run.data.params["methods.embed_dim"] == "16" and run.data.params["train.epochs"] == "2"
    assert run.data.tags[tracking.TAG_METHOD] == "joint" and run.data.tags[tracking.TAG_SEED] == "0"
    assert run.data.tags[tracking.TAG_WEIGHTS] == sha and "git_commit" in run.data.tags
    assert tracking.find_run(client, exp_id, "joint", 1, sha) is None
    assert tracking.find_run(client, exp_id, "joint", 0, "0" * 64) is None
    # per-epoch history under epoch/, the kept epoch's values as best_*
    history = client.get_metric_history(run_id, "epoch/val_rsum")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([r["val_rsum"] for r in result["history"]])
    assert {"epoch/train_loss", "epoch/itc_loss", "epoch/itm_loss", "epoch/lr", "epoch/val_i2t_r1",
            "epoch/seconds"} <= set(run.data.metrics)
    assert not {k for k in run.data.metrics if k.startswith("val_")}  # no ambiguous last-epoch value
    assert run.data.metrics["best_epoch"] == meta["best_epoch"]
    assert run.data.metrics["best_val_rsum"] == pytest.approx(meta["val_metrics"]["rsum"])
    assert run.data.metrics["best_val_rsum"] == pytest.approx(max(m.value for m in history))
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoint", "loss_curve.png"} <= artifacts
    assert "state.json" in {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "checkpoint")}

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    logged = mlflow_model.load_logged_aligner(f"runs:/{run_id}/model")
    local, _ = load_aligner(final)
    split = load_features(tmp_path / "data" / "features" / "val")
    for a, b in zip(score_matrices(logged, split), score_matrices(local, split)):
        np.testing.assert_array_equal(a, b)
    version = run.data.tags["registered_version"]
    mv = client.get_model_version(cfg.tracking.registered_model, version)
    assert mv.run_id == run_id
    assert mv.description == (f"joint seed 0: val RSUM {meta['val_metrics']['rsum']:.1f} at epoch "
                              f"{meta['best_epoch']}; weights sha256 {sha[:12]}")
    by_name = mlflow_model.load_logged_aligner(f"models:/{cfg.tracking.registered_model}/{version}")
    assert type(by_name).__name__ == "Joint"


def test_best_epoch_metrics_are_the_first_best_epoch():
    history = [{"epoch": 1, "val_rsum": 10.0, "val_i2t_r1": 1.0, "train_loss": 3.0},
               {"epoch": 2, "val_rsum": 30.0, "val_i2t_r1": 2.0, "train_loss": 2.0},
               {"epoch": 3, "val_rsum": 30.0, "val_i2t_r1": 5.0, "train_loss": 1.0},
               {"epoch": 4, "val_rsum": 20.0, "val_i2t_r1": 9.0, "train_loss": 0.5}]
    assert tracker.best_epoch_metrics(history) == {"best_epoch": 2.0, "best_val_rsum": 30.0, "best_val_i2t_r1": 2.0}
    assert tracker.best_epoch_metrics([]) == {}


def test_failed_training_marks_the_run_failed(tmp_path, tiny_features):
    cfg = tiny_config(tmp_path, train={"epochs": 1, "device": "cpu", "lr": float("inf")})
    with pytest.raises(training.NonFiniteLossError):
        training.run(cfg, tmp_path, "contrastive", tracker_factory=tracker.MlflowTracker, log=lambda *a: None)
    runs = MlflowClient(cfg.tracking.tracking_uri).search_runs([tracking.setup(cfg, tmp_path)])
    assert [r.info.status for r in runs] == ["FAILED"]
