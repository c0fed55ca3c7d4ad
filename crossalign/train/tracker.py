"""The training loop's MLflow tracker: one run per (method, seed), its epochs, best values,
checkpoint, loss curve and the model, logged as an MLflow pyfunc "from code"
(:mod:`crossalign.methods.pyfunc_model`) and registered as a version of the comparison's model.
"""
from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from crossalign.config import Config
from crossalign.methods import META, WEIGHTS
from crossalign.methods.mlflow_model import PYFUNC_CODE, pip_requirements
from crossalign.tracking.runs import (EPOCH_PREFIX, TAG_FINGERPRINT, TAG_HOST, TAG_METHOD, TAG_RESUMED_FROM, TAG_SEED,
                                      TAG_WEIGHTS, dvc_feature_hashes, git_commit, origin_tags, setup, unfinished_run,
                                      weights_sha256)

log = logging.getLogger(__name__)


def best_epoch_metrics(history: list[dict]) -> dict[str, float]:
    """``best_epoch`` and ``best_val_<k>`` of the first epoch with the highest validation RSUM
    (the epoch whose weights training kept)."""
    if not history:
        return {}
    best = max(history, key=lambda r: r["val_rsum"])  # max keeps the first of equal values
    return {"best_epoch": float(best["epoch"]),
            **{f"best_{k}": float(v) for k, v in best.items() if k.startswith("val_")}}



def loss_curve_png(history: list[dict], path: Path) -> Path:
    """Training loss terms and validation RSUM per epoch (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in [k for k in history[0] if k.endswith("loss")]:
        ax.plot(epochs, [r[key] for r in history], marker="o", label=key)
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.legend(loc="upper left")
    twin = ax.twinx()
    twin.plot(epochs, [r["val_rsum"] for r in history], color="black", ls="--", label="val RSUM")
    twin.set_ylabel("val RSUM"), twin.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class MlflowTracker:
    """The training loop's tracker (same interface as ``training.NullTracker``)."""

    def __init__(self, cfg: Config, root: str | Path = "."):
        self.cfg, self.root = cfg, Path(root)
        self.experiment_id = setup(cfg, self.root)
        self.system_metrics = importlib.util.find_spec("psutil") is not None
        if not self.system_metrics:
            log.warning("psutil is not installed: MLflow system metrics are off")
        self.run: Any = None
        self.name, self.method, self.seed = "", "", 0

    def start(self, method: str, seed: int, fingerprint: str) -> str:
        """Start the run of this (method, seed, training fingerprint), or reopen the unfinished one
        (a training killed and resumed from its checkpoint) -> its id. The checkpoint is a DVC out
        and holds no run id: the run is found by its tags."""
        self.name = method if len(self.cfg.train.seeds) == 1 else f"{method}-s{seed}"
        self.method, self.seed = method, seed
        unfinished = unfinished_run(MlflowClient(), self.experiment_id, method, seed, fingerprint)
        if unfinished is not None:
            self.run = mlflow.start_run(run_id=unfinished.info.run_id, log_system_metrics=self.system_metrics)
            origin, before = origin_tags(), unfinished.data.tags.get(TAG_HOST)
            if before and before != origin[TAG_HOST]:  # resumed on another host: keep where it began
                origin[TAG_RESUMED_FROM] = before
            mlflow.set_tags(origin)
            return unfinished.info.run_id
        tags = {TAG_METHOD: method, TAG_SEED: str(seed), TAG_FINGERPRINT: fingerprint,
                "git_commit": git_commit(self.root), **dvc_feature_hashes(self.root), **origin_tags()}
        self.run = mlflow.start_run(experiment_id=self.experiment_id, run_name=self.name, tags=tags,
                                    log_system_metrics=self.system_metrics)
        mlflow.log_params({k: str(v) for k, v in self.cfg.flat().items()})
        return self.run.info.run_id

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        """One epoch's values as ``epoch/<name>`` at step ``epoch`` (the history, not the result)."""
        mlflow.log_metrics({EPOCH_PREFIX + k: float(v) for k, v in metrics.items()}, step=epoch)

    def finish(self, final_dir: Path, ckpt_dir: Path, history: list[dict]) -> dict[str, Any]:
        """Log the best epoch's values, checkpoint, loss curve and model; tag the run with the
        sha256 of ``final_dir``'s weights; end the run. Returns {}: nothing of the run goes into
        the model files (evaluate and select find the run by its tags)."""
        sha = weights_sha256(final_dir / WEIGHTS)
        best = best_epoch_metrics(history)
        if best:
            mlflow.log_metrics(best)
        if ckpt_dir.exists():
            mlflow.log_artifacts(str(ckpt_dir), "checkpoint")
        if history:
            with tempfile.TemporaryDirectory() as tmp:  # never inside final_dir (a DVC out)
                mlflow.log_artifact(str(loss_curve_png(history, Path(tmp) / "loss_curve.png")))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(final_dir / WEIGHTS), "meta": str(final_dir / META)},
            pip_requirements=pip_requirements(),
            registered_model_name=self.cfg.tracking.registered_model)
        version = str(info.registered_model_version)
        mlflow.set_tags({TAG_WEIGHTS: sha, "registered_version": version})
        summary = f"val RSUM {best['best_val_rsum']:.1f} at epoch {best['best_epoch']:.0f}" if best else "untrained"
        MlflowClient(mlflow.get_tracking_uri(), mlflow.get_registry_uri()).update_model_version(
            self.cfg.tracking.registered_model, version,
            description=version_description(self.method, self.seed, summary, sha))
        mlflow.end_run()
        return {}

    def abort(self) -> None:
        """End the run as failed (training raised, or Ctrl-C), without MLflow's system-metrics
        monitor announcing its stop: the stage's own one-line message says what happened."""
        if mlflow.active_run() is not None:
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            try:
                mlflow.end_run(status="FAILED")
            except Exception as err:  # noqa: BLE001 - e.g. Ctrl-C inside a store write left SQLite locked
                # the run stays RUNNING: the resumed training reopens it by its tags (unfinished_run)
                log.debug("could not mark the MLflow run failed: %s", err)


def version_description(method: str, seed: int, summary: str, sha256: str) -> str:
    """The one line a registered model version carries: what it is, how good, which weights."""
    return f"{method} seed {seed}: {summary}; weights sha256 {sha256[:12]}"
