"""tune@<method>: declared search spaces, seeded deterministic search, defaults as trial 0,
pruning, tuned values applied by train, leaderboards of defaults vs tuned."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import make_tiny_features, tiny_config, dump_params
from crossalign import config
from crossalign.train import stage as training
from crossalign.train import tuning
from crossalign.methods import REGISTRY
from crossalign.tracking.runs import resolve_uri

torch.set_num_threads(1)


def features(root: Path) -> Path:
    make_tiny_features(root / "data" / "features" / "train", n_images=32, seed=0)
    make_tiny_features(root / "data" / "features" / "val", n_images=12, seed=0)  # same maps: learnable
    return root


def tune_cfg(tmp_path: Path, **tune) -> config.Config:
    return tiny_config(tmp_path, tune={"trials": 4, "epochs": 2, "pruner_startup_trials": 2, "warmup_epochs": 1,
                                       "sampler": "tpe", "n_startup_trials": 10, **tune})


def test_every_method_declares_a_space_that_holds_its_defaults():
    cfg = config.Config()
    assert set(REGISTRY) == set(config.METHOD_NAMES)
    for name, spec in REGISTRY.items():
        keys = [d.key for d in spec.search_space]
        assert {"train.lr", "train.weight_decay"} <= set(keys), name
        assert any(k.startswith(f"methods.{name}.") for k in keys), name  # the method's own knobs
        for d in spec.search_space:
            value = tuning.get_value(cfg, d.key)  # a key that is not in params fails here
            assert d.low <= value <= d.high, f"{name}: default {d.key}={value} outside [{d.low}, {d.high}]"
            assert isinstance(value, int) == d.integer, d.key


def test_apply_overrides_sets_values_and_names_bad_keys():
    cfg = config.Config()
    out = tuning.apply_overrides(cfg, {"train.lr": 0.002, "methods.contrastive.dropout": 0.25}, "t.json")
    assert out.train.lr == 0.002 and out.methods.contrastive.dropout == 0.25
    assert cfg.train.lr == 0.001 and out.train.epochs == cfg.train.epochs  # a copy; the rest unchanged
    with pytest.raises(config.ConfigError, match=r"t.json.*methods.contrastive.dropuot.*no such params key"):
        tuning.apply_overrides(cfg, {"methods.contrastive.dropuot": 0.2}, "t.json")
    with pytest.raises(config.ConfigError, match=r"(?s)t.json.*methods.contrastive.dropout = 1.5"):
        tuning.apply_overrides(cfg, {"methods.contrastive.dropout": 1.5}, "t.json")


def test_the_sampler_is_named_for_what_it_does():
    tune = lambda **kw: config.TuneParams(**{"trials": 3, **kw})  # noqa: E731
    assert tuning.describe_sampler(tune(sampler="tpe", n_startup_trials=10)) == (
        "TPE (Optuna TPESampler, seed 0, n_startup_trials 10, trial 0 counted: with 3 trials every trial after "
        "trial 0 was random)")
    assert tuning.describe_sampler(tune(sampler="tpe", n_startup_trials=1, seed=4)) == (
        "TPE (Optuna TPESampler, seed 4, n_startup_trials 1, trial 0 counted: trials 1-2 drawn by TPE's model "
        "of the finished trials)")
    assert tuning.describe_sampler(tune(trials=6, sampler="tpe", n_startup_trials=3)) == (
        "TPE (Optuna TPESampler, seed 0, n_startup_trials 3, trial 0 counted: trials 3-5 drawn by TPE's model "
        "of the finished trials, trials 1-2 random)")
    assert tuning.describe_sampler(tune(sampler="random")) == (
        "random search (Optuna RandomSampler, seed 0: trials 1-2 drawn at random)")
    assert tuning.describe_sampler(tune(sampler="qmc", trials=2)) == (
        "quasi-random search (Optuna QMCSampler, scrambled Sobol, seed 0: trial 1 spread over the search space)")
    assert type(tuning.build_sampler(tune(sampler="tpe"))) is optuna.samplers.TPESampler
    assert type(tuning.build_sampler(tune(sampler="random"))) is optuna.samplers.RandomSampler
    assert type(tuning.build_sampler(tune(sampler="qmc"))) is optuna.samplers.QMCSampler


def _drawn(tune: config.TuneParams, method: str = "joint") -> list[dict]:
    """The values the sampler draws for trials 1.. after the enqueued defaults (a stand-in score)."""
    space = REGISTRY[method].search_space
    study = optuna.create_study(direction="maximize", sampler=tuning.build_sampler(tune))
    study.enqueue_trial(tuning.defaults(config.Config(), space))
    study.optimize(lambda tr: sum(float(tuning.suggest(tr, d)) for d in space), n_trials=tune.trials)
    return [t.params for t in study.trials[1:]]


def test_tpe_within_its_start_up_trials_draws_what_random_search_draws():
    """Why the wording matters: TPE with n_startup_trials >= trials is random search, draw for draw."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    random = _drawn(config.TuneParams(trials=3, sampler="random"))
    assert _drawn(config.TuneParams(trials=3, sampler="tpe", n_startup_trials=10)) == random
    assert _drawn(config.TuneParams(trials=3, sampler="tpe", n_startup_trials=1)) != random  # TPE's model drew
    qmc = _drawn(config.TuneParams(trials=3, sampler="qmc"))
    assert qmc != random and qmc == _drawn(config.TuneParams(trials=3, sampler="qmc"))  # seeded
    for values in qmc:
        for d in REGISTRY["joint"].search_space:
            assert d.low <= values[d.key] <= d.high


def test_tracker_prunes_a_hopeless_trial_only():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    first = study.ask()
    tuning.TrialTracker(first).log_epoch({"val_rsum": 100.0}, 1)  # the startup trial is never pruned
    study.tell(first, 100.0)
    good = tuning.TrialTracker(study.ask())
    good.log_epoch({"val_rsum": 150.0}, 1)
    assert good.last_rsum == 150.0 and good.epochs == 1
    bad = tuning.TrialTracker(study.ask())
    with pytest.raises(optuna.TrialPruned):
        bad.log_epoch({"val_rsum": 40.0}, 1)


def test_tune_is_deterministic_scores_defaults_first_and_leaves_no_models(tmp_path, monkeypatch):
    from tasks import tune as tune_task

    method = "cross_attention"
    a, b = features(tmp_path / "a"), features(tmp_path / "b")
    cfg = tune_cfg(tmp_path / "a")
    record = tuning.tune(cfg, a, method, log=lambda s: None)
    path_a = tuning.write_tuned(a, record)

    # the same search through the stage entry point, with MLflow, in another directory
    cfg_b = tune_cfg(tmp_path / "b")
    (b / "params.yaml").write_text(dump_params(cfg_b))
    monkeypatch.chdir(b)
    assert tune_task.main(["--method", method]) == 0
    text_a, text_b = path_a.read_text(), (b / "tuned" / f"{method}.json").read_text()
    assert text_a == text_b  # a function of its deps: same params + data -> same bytes

    space = REGISTRY[method].search_space
    defaults = {d.key: tuning.get_value(cfg, d.key) for d in space}
    assert record["trial_log"][0]["values"] == defaults and record["defaults"]["values"] == defaults
    assert len(record["trial_log"]) == 4 and record["budget"]["trials"] == 4
    for trial in record["trial_log"]:
        for d in space:
            assert d.low <= trial["values"][d.key] <= d.high
    complete = [t for t in record["trial_log"] if t["state"] == "complete"]
    best = max(complete, key=lambda t: t["val_rsum"])
    assert record["best"]["val_rsum"] == best["val_rsum"] and record["overrides"] == best["values"]
    assert not any(k in text_a for k in ("run_id", "seconds", str(tmp_path)))

    # trial 0's score is what the training loop gives the defaults under the trial protocol
    features(tmp_path / "c")
    direct = training.run(tuning.trial_config(cfg, defaults), tmp_path / "c", method, log=lambda s: None)
    assert record["defaults"]["val_rsum"] == direct[0]["val_metrics"]["rsum"]
    assert record["trial_log"][0]["epochs"] == cfg.tune.epochs == direct[0]["epochs_run"]

    assert record["budget"]["sampler"] == ("TPE (Optuna TPESampler, seed 0, n_startup_trials 10, trial 0 counted: "
                                           "with 4 trials every trial after trial 0 was random)")
    assert record["budget"]["sampler_name"] == "tpe" and record["budget"]["n_startup_trials"] == 10
    assert not (a / "models").exists() and not (b / "models").exists()  # trials train in a temp dir
    client = MlflowClient(resolve_uri(cfg_b.tracking.tracking_uri, b))
    runs = client.search_runs([client.get_experiment_by_name(cfg_b.tracking.experiment).experiment_id])
    parent = [r for r in runs if r.info.run_name == f"tune-{method}"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.tags["sampler"] == "tpe" and parent[0].data.params["tune.n_startup_trials"] == "10"
    assert parent[0].data.tags["sampler_description"] == record["budget"]["sampler"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(int(r.data.tags["trial"]) for r in children) == [0, 1, 2, 3]
    assert {r.data.tags["state"] for r in children} == {t["state"] for t in record["trial_log"]}


def test_zero_trials_keeps_params_and_train_applies_tuned_values(tmp_path):
    cfg = tune_cfg(tmp_path, trials=0)
    record = tuning.tune(cfg, tmp_path, "contrastive")
    assert record["tuned"] is False and record["overrides"] == {} and record["trial_log"] == []
    tuning.write_tuned(tmp_path, record)
    same, note = tuning.apply_tuned(cfg, tmp_path, "contrastive")
    assert same.model_dump() == cfg.model_dump() and "params.yaml values" in note

    tuned = {**record, "tuned": True, "best": {"trial": 2, "values": {}, "val_rsum": 1.0},
             "overrides": {"train.lr": 0.0042, "methods.contrastive.temperature": 0.05}}
    (tmp_path / "tuned" / "contrastive.json").write_text(json.dumps(tuned))
    out, note = tuning.apply_tuned(cfg, tmp_path, "contrastive")
    assert out.train.lr == 0.0042 and out.methods.contrastive.temperature == 0.05 and "trial 2" in note
    with pytest.raises(ValueError, match="tuned for 'contrastive', expected 'joint'"):
        tuning.apply_tuned(cfg, tmp_path, "joint", tmp_path / "tuned" / "contrastive.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tuning.apply_tuned(cfg, tmp_path, "contrastive", tmp_path / "missing.json")


SAMPLER = "quasi-random search (Optuna QMCSampler, scrambled Sobol, seed 0: trials 1-5 spread over the search space)"


def _tuned(root: Path, method: str, default: float, best: float, trials: int = 6) -> None:
    record = {"method": method, "tuned": True, "budget": {"trials": trials, "epochs_per_trial": 3, "sampler": SAMPLER},
              "defaults": {"values": {}, "val_rsum": default}, "best": {"trial": 1, "values": {}, "val_rsum": best},
              "overrides": {}}
    (root / "tuned").mkdir(exist_ok=True)
    (root / "tuned" / f"{method}.json").write_text(json.dumps(record))


def test_leaderboards_rank_defaults_and_tuned_and_flag_a_change(tmp_path):
    _tuned(tmp_path, "contrastive", 300.0, 310.0)
    _tuned(tmp_path, "joint", 290.0, 320.0)
    _tuned(tmp_path, "concat_mlp", 100.0, 150.0)
    out = tuning.leaderboards(tmp_path, ["concat_mlp", "contrastive", "joint"])
    assert [r["method"] for r in out["defaults"]] == ["contrastive", "joint", "concat_mlp"]
    assert [r["method"] for r in out["tuned"]] == ["joint", "contrastive", "concat_mlp"]
    assert out["tuned"][0]["val_rsum"] == 320.0 and out["ranking_changed"] is True
    assert tuning.leaderboards(tmp_path, ["concat_mlp", "contrastive"])["ranking_changed"] is False
    md = "\n".join(tuning.leaderboards_markdown(out))
    assert "| 1 | contrastive | 300.0 | joint | 320.0 |" in md and "ranking **changed**" in md
    assert md.startswith("Validation RSUM under the tuning protocol (6 trials per method, at most 3 epochs each, "
                         "trial 0 = params.yaml values; sampler: quasi-random search (Optuna QMCSampler, scrambled "
                         "Sobol, seed 0: trials 1-5 spread over the search space)).")
    assert "TPE" not in md

    _tuned(tmp_path, "joint", 290.0, 320.0, trials=12)
    with pytest.raises(ValueError, match=r"unequal tuning budgets.*joint\.json"):
        tuning.leaderboards(tmp_path, ["concat_mlp", "contrastive", "joint"])
