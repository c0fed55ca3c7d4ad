"""The MLflow registry against a real sqlite store in tmp: versions, tags, the champion alias."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import tiny_config
from crossalign.tracking import registry
from crossalign.select import stage as selection
from eval_helpers import run_of, save_model, write_eval_outputs, write_split_features


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store holding a logged model per method (each test registers its own model)."""
    root = tmp_path_factory.mktemp("store")
    cfg = tiny_config(root, train={"methods": ["concat_mlp", "contrastive"]})
    write_split_features(root)
    for m in cfg.train.methods:
        save_model(cfg, root, m, 0)
    return root, {m: run_of(cfg, root, m, 0) for m in cfg.train.methods}


def _project(tmp_path, store, name, copy_models=True):
    root, runs = store
    cfg = tiny_config(root, train={"methods": ["concat_mlp", "contrastive"]},
                      tracking={"registered_model": name}, select={"gallery": 0})
    write_split_features(tmp_path)  # eval/test_index.json + the test features select's cost timing reads
    if copy_models:  # select loads each kept model to time its queries
        shutil.copytree(root / "models", tmp_path / "models")
    return cfg, runs, root


def _evaluated(tmp_path, method, val_rsum, models_root, p_hit=0.5, seed=0):
    """Evaluate outputs of ``method`` whose weights are those saved under ``models_root``."""
    rng = np.random.default_rng(seed)
    write_eval_outputs(tmp_path, method, val_rsum,
                       {0: (np.where(rng.random(16) < p_hit, 0, 9), np.where(rng.random(32) < p_hit, 0, 9))},
                       models_root)


def test_every_method_is_a_tagged_version_and_the_alias_follows_val(tmp_path, store):
    cfg, runs, models = _project(tmp_path, store, "follows-val")
    assert registry.current_champion(cfg, tmp_path) is None
    _evaluated(tmp_path, "concat_mlp", 120.0, models)
    _evaluated(tmp_path, "contrastive", 250.0, models)
    first = selection.run(cfg, tmp_path)
    versions = first["registry"]["versions"]
    assert len(set(versions.values())) == 2
    champ = registry.current_champion(cfg, tmp_path)
    assert str(champ.version) == versions["contrastive"] and champ.run_id == runs["contrastive"]
    assert champ.tags["method"] == "contrastive" and float(champ.tags["val_rsum"]) == 250.0
    assert "test_rsum" in champ.tags and champ.tags["seed"] == "0"

    # a new evaluation makes the baseline the best on val: the alias moves, no duplicate versions
    _evaluated(tmp_path, "concat_mlp", 400.0, models)
    second = selection.run(cfg, tmp_path)
    assert second["registry"]["versions"] == versions
    champ = registry.current_champion(cfg, tmp_path)
    assert str(champ.version) == versions["concat_mlp"] and float(champ.tags["val_rsum"]) == 400.0


def test_failed_evaluation_leaves_the_previous_champion(tmp_path, store):
    cfg, runs, models = _project(tmp_path, store, "failed-eval")
    _evaluated(tmp_path, "concat_mlp", 120.0, models)
    _evaluated(tmp_path, "contrastive", 250.0, models)
    before = selection.run(cfg, tmp_path)["registry"]["champion_version"]
    # contrastive's re-evaluation failed (its metrics are gone) while the baseline now looks best
    (tmp_path / "eval" / "contrastive" / "results.json").unlink()
    _evaluated(tmp_path, "concat_mlp", 999.0, models)
    with pytest.raises(ValueError, match="contrastive"):
        selection.run(cfg, tmp_path)
    assert str(registry.current_champion(cfg, tmp_path).version) == before


def test_unregistrable_model_is_a_clear_error(tmp_path, store):
    cfg, runs, models = _project(tmp_path, store, "unregistrable", copy_models=False)
    _evaluated(tmp_path, "concat_mlp", 120.0, models)
    _evaluated(tmp_path, "contrastive", 250.0, tmp_path)  # weights no run logged
    with pytest.raises(ValueError, match="no MLflow run of contrastive seed 0 with weights sha256 0{12}"):
        selection.run(cfg, tmp_path)
    assert registry.current_champion(cfg, tmp_path) is None


def test_relative_sqlite_uri_resolves_under_root(tmp_path):
    cfg = tiny_config(tmp_path, tracking={"tracking_uri": "sqlite:///mlruns/mlflow.db"})
    assert registry.tracking_uri(cfg, tmp_path) == f"sqlite:///{(tmp_path / 'mlruns' / 'mlflow.db').resolve()}"
    assert registry.champion_uri(cfg) == "models:/crossalign-aligner@champion"
