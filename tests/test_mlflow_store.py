"""The MLflow experiment as a new user meets it, on a real SQLite store in tmp: marked as model
training (the UI opens on runs), a shared runs-table view, and an artifact root that follows
the checkout when the tree is moved or copied."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient

from conftest import tiny_config
from crossalign.tracking import registry
from crossalign.tracking import runs as tracking
from crossalign.methods import mlflow_model
from crossalign.io import load_features
from crossalign.methods import load_aligner
from crossalign.retrieval.scoring import score_matrices
from eval_helpers import run_of, save_model, write_split_features

torch.set_num_threads(1)
RELATIVE = {"tracking_uri": "sqlite:///mlruns/mlflow.db", "artifact_location": "mlruns/artifacts"}


def test_experiment_is_marked_model_training_with_a_runs_view(tmp_path):
    cfg = tiny_config(tmp_path)
    exp_id = tracking.setup(cfg, tmp_path)
    tags = MlflowClient(cfg.tracking.tracking_uri).get_experiment(exp_id).tags
    # the MLflow 3 UI's ExperimentKind for classic ML (its genai_* kinds open the Traces overview)
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.crossalign"])
    # newest first, by start time: the only order in which the UI nests tuning trials under their parent
    assert view["orderByKey"] == "attributes.start_time" and view["orderByAsc"] is False
    assert "metrics.`eval_test_rsum`" in view["selectedColumns"]
    assert "epoch" in tags["mlflow.note.content"]


def _checkout(root: Path):
    cfg = tiny_config(root, tracking=RELATIVE)
    write_split_features(root)
    save_model(cfg, root, "contrastive", 0)
    return cfg


def test_moved_checkout_logs_and_loads_from_the_new_tree(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    cfg = _checkout(old)
    run_id = run_of(cfg, old, "contrastive", 0)
    shutil.move(old, new)  # the whole checkout, mlruns/ included

    assert tracking.follow_checkout(cfg, new)
    assert not tracking.follow_checkout(cfg, new)  # once
    with registry.using(cfg, new) as client:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        assert exp.artifact_location == (new / "mlruns" / "artifacts").resolve().as_uri()
        run = client.get_run(run_id)
        assert run.info.artifact_uri.startswith((new / "mlruns" / "artifacts").resolve().as_uri() + "/")
        where = client.get_model_version_download_uri(cfg.tracking.registered_model, "1")
        assert where.startswith((new / "mlruns" / "artifacts").resolve().as_uri() + "/"), where
        model = mlflow_model.load_logged_aligner(f"models:/{cfg.tracking.registered_model}/1")
        client.log_artifact(run_id, str(new / "eval" / "test_index.json"), "evaluation")
    assert (Path(run.info.artifact_uri[len("file://"):]) / "evaluation" / "test_index.json").exists()
    assert not old.exists()
    split = load_features(new / "data" / "features" / "test")
    local, _ = load_aligner(new / "models" / "contrastive" / "final" / "seed-0")
    for a, b in zip(score_matrices(model, split), score_matrices(local, split)):
        np.testing.assert_array_equal(a, b)


def test_copied_checkout_leaves_the_original_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, copy = tmp_path / "first", tmp_path / "copy"
    first.mkdir()
    cfg = _checkout(first)
    shutil.copytree(first, copy)
    tracking.setup(cfg, copy)  # what any training / evaluate / select call does first
    for root in (first, copy):
        exp = MlflowClient(registry.tracking_uri(cfg, root)).get_experiment_by_name(cfg.tracking.experiment)
        assert exp.artifact_location == (root / "mlruns" / "artifacts").resolve().as_uri()
    # setup after a registry.using() block talks to the project's store only, not MLflow's ./mlflow.db
    assert not (tmp_path / "mlflow.db").exists()


def test_absolute_locations_and_stores_outside_the_checkout_are_not_rewritten(tmp_path):
    cfg = tiny_config(tmp_path)  # absolute store and artifact location: chosen by the user, kept
    exp_id = tracking.setup(cfg, tmp_path)
    assert not tracking.follow_checkout(cfg, tmp_path / "elsewhere")
    store = tmp_path / "shared" / "mlflow.db"  # a relative artifact root, but the store lies outside root
    outside = tiny_config(tmp_path, tracking={"tracking_uri": f"sqlite:///{store}", "artifact_location": "mlruns/a"})
    tracking.setup(outside, tmp_path / "one")
    assert not tracking.follow_checkout(outside, tmp_path / "two")
    location = MlflowClient(f"sqlite:///{store}").get_experiment_by_name("crossalign").artifact_location
    assert location == (tmp_path / "one" / "mlruns" / "a").resolve().as_uri()
    assert MlflowClient(cfg.tracking.tracking_uri).get_experiment(exp_id).artifact_location == \
        (tmp_path / "mlruns" / "artifacts").resolve().as_uri()
