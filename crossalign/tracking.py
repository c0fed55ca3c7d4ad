"""MLflow tracking of training runs: one experiment, one run per method (and seed).

Metadata go to SQLite (``tracking.tracking_uri``), artifacts under ``tracking.artifact_location``.
A run holds the resolved config as params, per-epoch losses / learning rate / validation recall as
metrics, system metrics, lineage tags (method, seed, git commit, DVC md5 of the features), the
last checkpoint and a loss-curve PNG as artifacts, and the model as an MLflow pyfunc built "from
code" (``crossalign/pyfunc_model.py``) whose artifacts are ``model.safetensors`` + ``model.json``
loaded through :func:`crossalign.methods.load_aligner` -- nothing is pickled.
"""
from __future__ import annotations

import importlib.util
import logging
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crossalign.config import Config
from crossalign.methods import META, WEIGHTS, load_aligner
from crossalign.methods.base import Aligner

log = logging.getLogger(__name__)
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
FEATURE_PATHS = ("data/features", "data/features/train", "data/features/val")


def resolve_uri(uri: str, root: Path) -> str:
    """A ``sqlite:///relative/path`` URI made absolute against ``root`` (others unchanged)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((root / uri[len(prefix):]).resolve())
    return uri


def setup(cfg: Config, root: str | Path = ".") -> str:
    """Create (once) the SQLite store, the experiment and the registered model -> experiment id.

    Call before fanning out parallel training: concurrent first-time creation races."""
    root = Path(root)
    uri = resolve_uri(cfg.tracking.tracking_uri, root)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        location = Path(cfg.tracking.artifact_location)
        location = (location if location.is_absolute() else root / location).resolve()
        location.mkdir(parents=True, exist_ok=True)
        try:
            exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location.as_uri())
        except MlflowException:  # created meanwhile by another process
            exp_id = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    try:
        client.get_registered_model(cfg.tracking.registered_model)
    except MlflowException:
        try:
            client.create_registered_model(cfg.tracking.registered_model)
        except MlflowException:
            pass  # created meanwhile
    return exp_id


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dvc_feature_hashes(root: Path) -> dict[str, str]:
    """md5 of the feature outs recorded in ``dvc.lock`` (empty when there is no lock yet)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {f"dvc.md5.{o['path']}": o["md5"] for st in stages.values() for o in st.get("outs", [])
            if o.get("path") in FEATURE_PATHS and "md5" in o}


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
        self.name = ""

    def start(self, method: str, seed: int, run_id: str | None) -> str:
        """Start (or, resuming a checkpoint, reopen) the run -> its id."""
        self.name = method if len(self.cfg.train.seeds) == 1 else f"{method}-s{seed}"
        if run_id:
            try:
                self.run = mlflow.start_run(run_id=run_id, log_system_metrics=self.system_metrics)
                return run_id
            except MlflowException:
                log.warning("run %s of the checkpoint is not in the store: starting a new run", run_id)
        tags = {"method": method, "seed": str(seed), "git_commit": git_commit(self.root),
                **dvc_feature_hashes(self.root)}
        self.run = mlflow.start_run(experiment_id=self.experiment_id, run_name=self.name, tags=tags,
                                    log_system_metrics=self.system_metrics)
        mlflow.log_params({k: str(v) for k, v in self.cfg.flat().items()})
        return self.run.info.run_id

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)

    def finish(self, final_dir: Path, ckpt_dir: Path, history: list[dict]) -> dict[str, Any]:
        """Log checkpoint, loss curve and model; end the run -> keys for model.json."""
        if ckpt_dir.exists():
            mlflow.log_artifacts(str(ckpt_dir), "checkpoint")
        if history:
            png = loss_curve_png(history, final_dir / "loss_curve.png")
            mlflow.log_artifact(str(png))
            png.unlink()
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(final_dir / WEIGHTS), "meta": str(final_dir / META)},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                              "safetensors", "numpy", "crossalign"],
            registered_model_name=self.cfg.tracking.registered_model)
        out = {"mlflow_run_id": self.run.info.run_id, "mlflow_model_uri": f"runs:/{self.run.info.run_id}/model",
               "mlflow_logged_model_uri": info.model_uri, "registered_model": self.cfg.tracking.registered_model,
               "registered_version": info.registered_model_version}
        mlflow.set_tags({"registered_version": str(info.registered_model_version)})
        mlflow.end_run()
        return out

    def abort(self) -> None:
        if mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")


def load_logged_aligner(model_uri: str, tracking_uri: str | None = None) -> Aligner:
    """The Aligner of a logged model (``runs:/<id>/model``, ``models:/<name>@champion``, ...)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().aligner


class AlignerModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: loads the Aligner from its safetensors + JSON artifacts; ``predict`` scores
    every image against every caption of a small feature batch (dict of arrays)."""

    def load_context(self, context) -> None:
        meta = Path(context.artifacts["meta"])
        self.aligner, self.meta = load_aligner(meta.parent, weights=context.artifacts["weights"], meta_path=meta)

    def predict(self, context, model_input, params=None):
        """model_input: image_tokens (N,R,Di), image_pooled (N,Di), text_tokens (M,L,Dt),
        text_lengths (M,), text_pooled (M,Dt) -> scores (N, M) (matching methods: match logits;
        re-ranking methods: the fused score of every pair)."""
        t = {k: torch.as_tensor(np.array(v)) for k, v in model_input.items()}
        a = self.aligner
        with torch.inference_mode():
            lengths = t["text_lengths"].long()
            mask = torch.arange(t["text_tokens"].shape[1])[None, :] < lengths[:, None]  # (M, L)
            im = a.encode_images(t["image_tokens"].float(), t["image_pooled"].float())
            tx = a.encode_texts(t["text_tokens"].float(), mask, t["text_pooled"].float())
            if a.embeds and a.matches:
                alpha = a.rerank.alpha if a.rerank else 0.5
                scores = alpha * a.match_block(im, tx) + (1 - alpha) * a.similarity(im, tx)
            else:
                scores = a.similarity(im, tx) if a.embeds else a.match_block(im, tx)
        return scores.float().numpy()
