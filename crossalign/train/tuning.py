"""Equal-budget hyper-parameter search (``tune@<method>``) and the values ``train@<method>`` uses.

Every method gets the same budget: ``tune.trials`` Optuna trials of at most ``tune.epochs`` epochs
each, over the search space declared beside the method (``MethodSpec.search_space``). Trial 0 is
the params.yaml values (enqueued), so the defaults are scored under the same protocol as the
tuned values; the rest are drawn by the seeded sampler ``tune.sampler`` names: ``tpe`` (Optuna's
``TPESampler``, whose first ``tune.n_startup_trials`` finished trials, trial 0 included, come
before its model: trials numbered below that are drawn at random), ``random`` (``RandomSampler``)
or ``qmc`` (``QMCSampler``, scrambled Sobol). :func:`describe_sampler` says in words which one ran
and how many of the trials were random; ``tuned/<m>.json``, the report and MLflow carry it. A
trial trains on ``train`` (first seed
of ``train.seeds``) in a temporary directory and is scored by its best **validation** RSUM (the
split early stopping reads); a median pruner fed each epoch's val RSUM stops hopeless ones. CPU
training is bit-identical run to run at a fixed thread count (``tests/test_determinism.py``), so
the same inputs and ``tune.threads`` give the same trials and the same ``tuned/<m>.json`` (it holds
no timings or run ids: it is a DVC out).

Trials are logged as nested MLflow runs under the method's tuning run (:class:`MlflowTrialLog`).
:func:`leaderboards` ranks the methods by the defaults' and by the tuned val RSUM.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
import torch

from crossalign import config
from crossalign.train import stage as training
from crossalign.io import read_json, write_json
from crossalign.methods import get_method
from crossalign.methods.base import Dim

TUNED_DIR = "tuned"
STATES = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned",
          optuna.trial.TrialState.FAIL: "failed"}


def tuned_path(root: str | Path, method: str) -> Path:
    return Path(root) / TUNED_DIR / f"{method}.json"


# -------------------------------------------------------------------------------- config values
def get_value(cfg: config.Config, key: str) -> Any:
    """The value of a dotted key (``methods.joint.dropout``) in the typed config."""
    node: Any = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            raise config.ConfigError(f"{key}: no such params key (at {part!r})")
        node = getattr(node, part)
    return node


def apply_overrides(cfg: config.Config, overrides: dict[str, Any], source: str = "<overrides>") -> config.Config:
    """A new validated config with dotted ``overrides`` set; an unknown key or a bad value fails
    naming ``source`` and the key."""
    raw = cfg.model_dump(mode="json")
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise config.ConfigError(f"{source}: override {key!r}: {part!r} is not a params section")
            node = node[part]
        if parts[-1] not in node:
            raise config.ConfigError(f"{source}: override {key!r}: no such params key")
        node[parts[-1]] = value
    return config.from_dict(raw, source)


def defaults(cfg: config.Config, space: tuple[Dim, ...]) -> dict[str, Any]:
    """The params.yaml values of the search dimensions (trial 0)."""
    return {d.key: get_value(cfg, d.key) for d in space}


def describe_space(space: tuple[Dim, ...]) -> dict[str, dict]:
    return {d.key: {"low": d.low, "high": d.high, "log": d.log, "integer": d.integer} for d in space}


def suggest(trial: optuna.Trial, dim: Dim) -> float | int:
    if dim.integer:
        return trial.suggest_int(dim.key, int(dim.low), int(dim.high), log=dim.log)
    return trial.suggest_float(dim.key, dim.low, dim.high, log=dim.log)


OPTUNA_TRIAL_LOG = logging.getLogger("optuna.study._optimize")  # its "Trial N failed ..." warnings


class InterruptedTrial(logging.Filter):
    """Once :attr:`interrupted` is set (a trial ended by Ctrl-C), drops Optuna's "Trial N failed"
    warnings, one of them with the KeyboardInterrupt traceback: the stage reports the
    interruption itself, in one line."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.interrupted


# ------------------------------------------------------------------------------------- sampler
def build_sampler(t: config.TuneParams) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``tune.sampler`` names, seeded by ``tune.seed``."""
    if t.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=t.seed, n_startup_trials=t.n_startup_trials)
    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=t.seed)
    if t.sampler == "qmc":
        with warnings.catch_warnings():  # QMCSampler is marked experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=t.seed)
    raise ValueError(f"tune.sampler {t.sampler!r}: expected tpe, random or qmc")


def describe_sampler(t: config.TuneParams) -> str:
    """What drew the trials, in words: the sampler, its seed and, for TPE, which of the
    ``tune.trials`` trials were random start-up trials (trial 0 is always the params.yaml values)."""
    def span(a: int, b: int) -> str:
        return f"trial {a}" if a == b else f"trials {a}-{b}"

    name = {"tpe": f"TPE (Optuna TPESampler, seed {t.seed}, n_startup_trials {t.n_startup_trials}, trial 0 counted",
            "random": f"random search (Optuna RandomSampler, seed {t.seed}",
            "qmc": f"quasi-random search (Optuna QMCSampler, scrambled Sobol, seed {t.seed}"}[t.sampler]
    if t.trials <= 1:
        return f"{name}: only trial 0, the params.yaml values, ran)"
    drawn = span(1, t.trials - 1)
    if t.sampler == "random":
        return f"{name}: {drawn} drawn at random)"
    if t.sampler == "qmc":
        return f"{name}: {drawn} spread over the search space)"
    n = t.n_startup_trials
    if n >= t.trials:
        return f"{name}: with {t.trials} trials every trial after trial 0 was random)"
    return (f"{name}: {span(n, t.trials - 1)} drawn by TPE's model of the finished trials"
            + (f", {span(1, n - 1)} random)" if n > 1 else ")"))


# -------------------------------------------------------------------------------------- trials
class TrialTracker:
    """The training loop's tracker for one trial: reports each epoch's val RSUM to the trial
    (and the MLflow log) and raises ``optuna.TrialPruned`` when the pruner says so."""

    def __init__(self, trial: optuna.Trial, on_epoch: Callable[[float, int], None] | None = None):
        self.trial, self.on_epoch = trial, on_epoch
        self.last_rsum: float | None = None
        self.epochs = 0

    def start(self, method: str, seed: int, fingerprint: str) -> None:
        return None

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        rsum = float(metrics["val_rsum"])
        self.last_rsum, self.epochs = rsum, epoch
        self.trial.report(rsum, epoch)
        if self.on_epoch:
            self.on_epoch(rsum, epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"val RSUM {rsum:.1f} at epoch {epoch} is below the median of earlier trials")

    def finish(self, final_dir: Path, ckpt_dir: Path, history: list[dict]) -> dict[str, Any]:
        return {}

    def abort(self) -> None:
        pass


def trial_config(cfg: config.Config, values: dict[str, Any]) -> config.Config:
    """The config a trial trains with: the drawn values, ``tune.epochs``, the first seed, ``tune.threads``."""
    t = cfg.tune
    return apply_overrides(cfg, {**values, "train.epochs": t.epochs, "train.patience": min(cfg.train.patience, t.epochs),
                                 "train.seeds": cfg.train.seeds[:1], "train.threads": t.threads}, "tune trial")


def run_trial(cfg: config.Config, root: Path, method: str, values: dict[str, Any], tracker: TrialTracker,
              log: Callable[[str], None] = print) -> float:
    """Train one trial in a temporary directory (features linked from ``root``) -> best val RSUM."""
    tcfg = trial_config(cfg, values)
    with tempfile.TemporaryDirectory(prefix=f"crossalign-tune-{method}-") as tmp:
        (Path(tmp) / "data").mkdir()
        os.symlink((Path(root) / "data" / "features").resolve(), Path(tmp) / "data" / "features")
        results = training.run(tcfg, Path(tmp), method, tracker_factory=lambda _c, _r: tracker, log=log)
    return float(results[0]["val_metrics"]["rsum"])


# ---------------------------------------------------------------------------------------- search
def tune(cfg: config.Config, root: str | Path, method: str, mlflow_log: "MlflowTrialLog | None" = None,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the equal-budget search of ``method`` -> the ``tuned/<m>.json`` record (not written)."""
    root = Path(root)
    space = get_method(method).search_space
    base = defaults(cfg, space)
    t = cfg.tune
    record: dict[str, Any] = {
        "method": method,
        "budget": {"trials": t.trials, "epochs_per_trial": t.epochs, "seed_trained": cfg.train.seeds[0],
                   "sampler": describe_sampler(t),
                   "sampler_name": t.sampler, **({"n_startup_trials": t.n_startup_trials} if t.sampler == "tpe" else {}),
                   "pruner": f"MedianPruner(n_startup_trials={t.pruner_startup_trials}, "
                             f"n_warmup_steps={t.warmup_epochs})",
                   "threads": t.threads, "score": "best validation RSUM over the trial's epochs"},
        "search_space": describe_space(space),
    }
    if t.trials == 0:
        return {**record, "tuned": False, "note": "tune.trials is 0: train uses the params.yaml values",
                "defaults": {"values": base, "val_rsum": None}, "best": None, "overrides": {}, "trial_log": []}
    if not space:
        raise ValueError(f"method {method!r} declares no search_space (crossalign/methods/{method}.py)")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet = InterruptedTrial()
    study = optuna.create_study(direction="maximize", sampler=build_sampler(t),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=t.pruner_startup_trials,
                                                                   n_warmup_steps=t.warmup_epochs))
    study.enqueue_trial(base)  # trial 0: the params.yaml values, scored like every other trial
    epochs_run: dict[int, int] = {}
    last: dict[int, float | None] = {}
    threads = torch.get_num_threads()

    def objective(trial: optuna.Trial) -> float:
        values = {d.key: suggest(trial, d) for d in space}
        run = mlflow_log.trial_start(trial.number, values) if mlflow_log else None
        tracker = TrialTracker(trial, (lambda r, e: mlflow_log.epoch(run, r, e)) if mlflow_log else None)
        state, value = "failed", None
        try:
            value = run_trial(cfg, root, method, values, tracker, log=lambda s: None)
            state = "complete"
            return value
        except optuna.TrialPruned:
            state = "pruned"
            raise
        except KeyboardInterrupt:
            state, quiet.interrupted = "interrupted", True
            raise
        finally:
            epochs_run[trial.number], last[trial.number] = tracker.epochs, tracker.last_rsum
            log(f"[tune {method}] trial {trial.number} {state} after {tracker.epochs} epoch(s): "
                f"val RSUM {value if value is not None else tracker.last_rsum} {values}")
            if mlflow_log:
                try:
                    mlflow_log.trial_end(run, state, value)
                except Exception:  # noqa: BLE001
                    if state != "interrupted":
                        raise  # after Ctrl-C inside a store write SQLite may stay locked: the interrupt is the news

    OPTUNA_TRIAL_LOG.addFilter(quiet)
    try:
        study.optimize(objective, n_trials=t.trials, catch=(training.NonFiniteLossError,))
    finally:
        OPTUNA_TRIAL_LOG.removeFilter(quiet)
        torch.set_num_threads(threads)
    trials = []
    for tr in sorted(study.trials, key=lambda x: x.number):
        state = STATES.get(tr.state, tr.state.name.lower())
        trials.append({"number": tr.number, "state": state, "values": dict(tr.params),
                       "val_rsum": tr.value if state == "complete" else last.get(tr.number),
                       "epochs": epochs_run.get(tr.number, 0)})
    complete = [tr for tr in trials if tr["state"] == "complete"]
    if not complete:
        raise ValueError(f"tune {method}: none of the {t.trials} trials completed (states "
                         f"{[tr['state'] for tr in trials]}); widen the search space or lower train.lr")
    best = min(complete, key=lambda tr: (-tr["val_rsum"], tr["number"]))  # ties: the earlier trial
    trial0 = trials[0]
    record.update(tuned=True, defaults={"values": base, "val_rsum": trial0["val_rsum"], "state": trial0["state"]},
                  best={"trial": best["number"], "values": best["values"], "val_rsum": best["val_rsum"]},
                  overrides=best["values"], trial_log=trials)
    return record


def write_tuned(root: str | Path, record: dict[str, Any]) -> Path:
    path = tuned_path(root, record["method"])
    write_json(path, record)
    return path


def read_tuned(path: str | Path, method: str) -> dict[str, Any]:
    """A ``tuned/<m>.json`` record, checked for its method and keys."""
    record = read_json(path)
    missing = [k for k in ("method", "tuned", "budget", "defaults", "overrides") if k not in record]
    if missing:
        raise ValueError(f"{path}: missing keys {missing} (written by tune@<method>)")
    if record["method"] != method:
        raise ValueError(f"{path}: tuned for {record['method']!r}, expected {method!r}")
    return record


def apply_tuned(cfg: config.Config, root: str | Path, method: str,
                path: str | Path | None = None) -> tuple[config.Config, str]:
    """``cfg`` with the tuned values of ``method`` applied -> (config, what was applied, in words).

    ``path`` defaults to ``tuned/<method>.json``; when that default is absent, or tuning was off,
    the params.yaml values stand. An explicit ``path`` that does not exist is an error."""
    file = Path(path) if path else tuned_path(root, method)
    if not file.exists():
        if path:
            raise FileNotFoundError(f"{file}: tuned values of {method} not found (run tune@{method})")
        return cfg, f"no {file}: params.yaml values"
    record = read_tuned(file, method)
    if not record["tuned"] or not record["overrides"]:
        return cfg, f"{file}: not tuned (tune.trials 0): params.yaml values"
    tuned = apply_overrides(cfg, record["overrides"], str(file))
    return tuned, f"{file}: trial {record['best']['trial']} of {record['budget']['trials']}: {record['overrides']}"


# ----------------------------------------------------------------------------------- leaderboards
def leaderboards(root: str | Path, methods: list[str]) -> dict[str, Any]:
    """Both rankings by validation RSUM under the tuning protocol (same epochs, seed and split):
    ``defaults`` (trial 0, the params.yaml values) and ``tuned`` (best trial, equal budget), and
    ``ranking_changed`` (None when tuning was off). Every method must have had the same budget."""
    records = {m: read_tuned(tuned_path(root, m), m) for m in methods}
    budgets = {m: r["budget"] for m, r in records.items()}
    first = methods[0]
    unequal = [m for m in methods if budgets[m] != budgets[first]]
    if unequal:
        raise ValueError(f"{TUNED_DIR}/: unequal tuning budgets: {[f'{m}.json' for m in unequal]} differ from "
                         f"{first}.json ({budgets[first]}); rerun tune@<method> for all methods")
    order = {m: i for i, m in enumerate(methods)}

    def ranked(score: Callable[[dict], float]) -> list[dict]:
        rows = [{"method": m, "val_rsum": score(r)} for m, r in records.items()]  # None: trial 0 failed
        return sorted(rows, key=lambda row: (row["val_rsum"] is None, -(row["val_rsum"] or 0.0), order[row["method"]]))

    tuned_on = all(r["tuned"] for r in records.values())
    out: dict[str, Any] = {"budget": budgets[first], "tuned": None, "ranking_changed": None,
                           "defaults": ranked(lambda r: r["defaults"]["val_rsum"]) if tuned_on else None}
    if tuned_on:
        out["tuned"] = ranked(lambda r: r["best"]["val_rsum"])
        out["ranking_changed"] = [r["method"] for r in out["defaults"]] != [r["method"] for r in out["tuned"]]
    return out


def leaderboards_markdown(boards: dict[str, Any]) -> list[str]:
    """Markdown lines for the report: the two rankings side by side and whether the order changed."""
    b = boards["budget"]
    if boards["tuned"] is None:
        return [f"Tuning off (`tune.trials` {b['trials']}): every method trained with its params.yaml values."]
    lines = [f"Validation RSUM under the tuning protocol ({b['trials']} trials per method, at most "
             f"{b['epochs_per_trial']} epochs each, trial 0 = params.yaml values; sampler: "
             f"{b.get('sampler', 'not recorded')}).", "",
             "| rank | defaults | val RSUM | tuned, equal budget | val RSUM |", "|---|---|---|---|---|"]
    for i, (d, t) in enumerate(zip(boards["defaults"], boards["tuned"]), 1):
        dv = "failed" if d["val_rsum"] is None else f"{d['val_rsum']:.1f}"
        lines.append(f"| {i} | {d['method']} | {dv} | {t['method']} | {t['val_rsum']:.1f} |")
    lines += ["", "The ranking **changed** with equal tuning." if boards["ranking_changed"]
              else "The ranking is the same with and without tuning."]
    return lines


# ------------------------------------------------------------------------------------------ MLflow
class MlflowTrialLog:
    """The method's tuning run in MLflow, each trial a nested run (params, per-epoch val RSUM, state)."""

    def __init__(self, cfg: config.Config, root: str | Path, method: str):
        from mlflow.tracking import MlflowClient

        from crossalign.tracking.runs import origin_tags, resolve_uri, setup

        self.experiment_id = setup(cfg, Path(root))
        self.client = MlflowClient(resolve_uri(cfg.tracking.tracking_uri, Path(root)))
        self.origin = origin_tags()  # host and flow run, on the tuning run and each trial
        self.parent = self.client.create_run(self.experiment_id, run_name=f"tune-{method}",
                                             tags={"method": method, "stage": "tune", "sampler": cfg.tune.sampler,
                                                   "sampler_description": describe_sampler(cfg.tune),
                                                   **self.origin}).info.run_id
        self.client.log_batch(self.parent, params=[_param(f"tune.{k}", v) for k, v in cfg.tune.model_dump().items()])

    def trial_start(self, number: int, values: dict[str, Any]) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}",
                                     tags={MLFLOW_PARENT_RUN_ID: self.parent, "trial": str(number),
                                           **self.origin}).info.run_id
        self.client.log_batch(run, params=[_param(k, v) for k, v in values.items()])
        return run

    def epoch(self, run: str, rsum: float, epoch: int) -> None:
        self.client.log_metric(run, "val_rsum", rsum, step=epoch)

    def trial_end(self, run: str, state: str, value: float | None) -> None:
        self.client.set_tag(run, "state", state)
        if value is not None:
            self.client.log_metric(run, "best_val_rsum", value)
        self.client.set_terminated(run, {"complete": "FINISHED", "pruned": "KILLED",
                                         "interrupted": "KILLED"}.get(state, "FAILED"))

    def end(self, record: dict[str, Any] | None) -> None:
        if record is None:  # tuning raised (or Ctrl-C): its own error is the news, not the store's
            try:
                self.client.set_terminated(self.parent, "FAILED")
            except Exception:  # noqa: BLE001
                pass
            return
        if record.get("tuned"):
            self.client.log_metric(self.parent, "defaults_val_rsum", record["defaults"]["val_rsum"] or 0.0)
            self.client.log_metric(self.parent, "best_val_rsum", record["best"]["val_rsum"])
        self.client.log_dict(self.parent, record, "tuned.json")
        self.client.set_terminated(self.parent, "FINISHED")


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value))
