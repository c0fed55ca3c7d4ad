"""DVC outs are functions of their inputs: no MLflow run ids or wall seconds in them; evaluate
and select find a seed's run by its tags (method, seed, sha256 of the saved weights)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from conftest import tiny_config
from crossalign.evaluate import stage as evaluation
from crossalign.tracking import registry
from crossalign.select import stage as selection
from crossalign.tracking import runs as tracking
from crossalign.train import tracker
from crossalign.train import stage as training
from crossalign.io import read_json
from eval_helpers import run_of, save_model, write_split_features

torch.set_num_threads(1)


def quiet(*_):
    pass


def _outs(root: Path, method: str) -> dict[str, bytes]:
    """Every file of train@<method>'s cached out and its plots CSV, by path."""
    final = root / "models" / method / "final"
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(final.rglob("*")) if p.is_file()}
    files[f"plots/train/{method}.csv"] = (root / "plots" / "train" / f"{method}.csv").read_bytes()
    return files


def test_two_tracked_trainings_give_identical_outs_and_distinct_runs(tmp_path, tiny_features):
    write_split_features(tmp_path)  # val/test features and the test index (train from tiny_features)
    cfg = tiny_config(tmp_path, train={"epochs": 2, "device": "cpu", "threads": 1})
    training.run(cfg, tmp_path, "contrastive", tracker_factory=tracker.MlflowTracker, log=quiet)
    first = _outs(tmp_path, "contrastive")
    shutil.rmtree(tmp_path / "models")  # no checkpoint to resume: a second training from scratch
    training.run(cfg, tmp_path, "contrastive", tracker_factory=tracker.MlflowTracker, log=quiet)
    second = _outs(tmp_path, "contrastive")

    assert first.keys() == second.keys() and first == second  # byte-identical
    meta = json.loads(first["models/contrastive/final/seed-0/model.json"])
    assert not [k for k in meta if "mlflow" in k or "registered" in k]
    header = first["plots/train/contrastive.csv"].decode().splitlines()[0].split(",")
    assert "epoch_seconds" not in header and {"epoch", "seed", "train_loss", "val_rsum"} <= set(header)

    client = MlflowClient(cfg.tracking.tracking_uri)
    exp_id = tracking.setup(cfg, tmp_path)
    runs = client.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_METHOD}` = 'contrastive'")
    sha = tracking.weights_sha256(tmp_path / "models" / "contrastive" / "final" / "seed-0" / "model.safetensors")
    assert len({r.info.run_id for r in runs}) == 2  # two runs ...
    assert {r.data.tags[tracking.TAG_WEIGHTS] for r in runs} == {sha}  # ... of the same weights
    assert all("epoch/seconds" in r.data.metrics for r in runs)  # the timings went to MLflow

    # evaluate logs to the newest of them; the shared runs-table view names metrics the run has
    evaluation.run(cfg, "contrastive", tmp_path)
    newest = max(runs, key=lambda r: r.info.start_time).info.run_id
    logged = client.get_run(newest).data.metrics
    assert logged["eval_test_rsum"] == pytest.approx(read_json(evaluation.results_path(tmp_path, "contrastive"))
                                                     ["test"]["rsum"])
    view = json.loads(client.get_experiment(exp_id).tags[tracking.SHARED_VIEW_PREFIX + tracking.SHARED_VIEW_KEY])
    columns = [c[len("metrics.`"):-1] for c in view["selectedColumns"] if c.startswith("metrics.`")]
    assert columns and set(columns) <= set(logged)


def test_select_registers_the_run_that_produced_the_weights_not_a_newer_one(tmp_path):
    methods = ["concat_mlp", "contrastive"]
    cfg = tiny_config(tmp_path, train={"methods": methods}, select={"gallery": 0, "bootstrap": 20})
    write_split_features(tmp_path)
    for m in methods:
        save_model(cfg, tmp_path, m, 0, init_seed=1)
    produced = {m: run_of(cfg, tmp_path, m, 0) for m in methods}
    save_model(cfg, tmp_path, "contrastive", 0, init_seed=2)  # a newer run of the same method and seed ...
    stale = run_of(cfg, tmp_path, "contrastive", 0)
    save_model(cfg, tmp_path, "contrastive", 0, init_seed=1, mlflow_run=False)  # ... whose weights are not on disk
    assert stale != produced["contrastive"] and run_of(cfg, tmp_path, "contrastive", 0) == produced["contrastive"]

    for m in methods:
        evaluation.run(cfg, m, tmp_path)
    out = selection.run(cfg, tmp_path)
    with registry.using(cfg, tmp_path) as client:
        for m in methods:
            version = client.get_model_version(cfg.tracking.registered_model, out["registry"]["versions"][m])
            assert version.run_id == produced[m]
        assert "eval_test_rsum" in client.get_run(produced["contrastive"]).data.metrics
        assert "eval_test_rsum" not in client.get_run(stale).data.metrics
        results = read_json(evaluation.results_path(tmp_path, "contrastive"))
        version = client.get_model_version(cfg.tracking.registered_model, out["registry"]["versions"]["contrastive"])
        sha = results["weights_sha256"]["0"]
        assert version.description == (f"contrastive seed 0: val RSUM {results['val']['rsum']:.1f} (selection), "
                                       f"test RSUM {results['test']['rsum']:.1f}; weights sha256 {sha[:12]}")
    assert out["registry"]["run_ids"] == produced
    facts = read_json(tmp_path / "reports" / "selection.json")
    assert facts["champion"] == out["champion"] and "registry" not in facts
    assert not [k for k in json.dumps(facts).split('"') if k in set(produced.values()) | {stale}]  # no run ids


def test_checkpoint_holds_no_run_id_and_a_resumed_training_reopens_its_run(tmp_path, tiny_features, monkeypatch):
    write_split_features(tmp_path)
    cfg = tiny_config(tmp_path, train={"epochs": 3, "patience": 5, "device": "cpu", "threads": 1})
    real, calls = training.validation_metrics, []

    def dies_in_epoch_2(*args, **kwargs):  # the training is stopped after epoch 1's checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "validation_metrics", dies_in_epoch_2)
    with pytest.raises(RuntimeError, match="killed"):
        training.run(cfg, tmp_path, "contrastive", tracker_factory=tracker.MlflowTracker, log=quiet)
    ckpt = tmp_path / "models" / "contrastive" / "checkpoints" / "seed-0"
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp_id = tracking.setup(cfg, tmp_path)
    (first,) = client.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_METHOD}` = 'contrastive'")
    state_text = "".join(p.read_text() for p in ckpt.glob("*.json"))
    assert '"epoch": 1' in state_text and first.info.run_id not in state_text and "run_id" not in state_text

    training.run(cfg, tmp_path, "contrastive", tracker_factory=tracker.MlflowTracker, log=quiet)  # resumes
    runs = client.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_METHOD}` = 'contrastive'")
    assert [r.info.run_id for r in runs] == [first.info.run_id] and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(first.info.run_id, "epoch/val_rsum")
    assert sorted(m.step for m in history) == [1, 2, 3]  # one run holds the whole history
    # a finished run is never reopened: training the same config afresh starts a new one
    shutil.rmtree(tmp_path / "models")
    training.run(cfg, tmp_path, "contrastive", tracker_factory=tracker.MlflowTracker, log=quiet)
    assert len(client.search_runs([exp_id], filter_string=f"tags.`{tracking.TAG_METHOD}` = 'contrastive'")) == 2
