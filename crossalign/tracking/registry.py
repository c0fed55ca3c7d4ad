"""MLflow side of evaluation and selection: finding a seed's run by its tags, logging evaluation
metrics to it, one registered-model version per method (with a one-line description), and the
``champion`` alias.

The tracking URI comes from ``params.yaml:tracking``; a relative ``sqlite:///`` path is taken
relative to the project root so library calls with another ``root`` (tests) stay inside it; an
``http(s)://`` URI is the tracking server every host shares. Only ``select`` moves the alias
(:func:`set_champion`): training registers versions, evaluation logs metrics, neither points
``champion`` anywhere, so the alias moves once per comparison, after every evaluation.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from crossalign.tracking import runs as tracking
from crossalign.config import Config

CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # artifact path of each (method, seed) run's logged model


def tracking_uri(cfg: Config, root: Path) -> str:
    """The configured tracking URI with a relative sqlite path resolved against ``root``."""
    uri = tracking.resolve_uri(cfg.tracking.tracking_uri, Path(root))
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


@contextmanager
def using(cfg: Config, root: Path) -> Iterator[MlflowClient]:
    """Point the fluent MLflow API (and a client) at this project's store, restoring after."""
    previous, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    uri = tracking.connect(cfg, Path(root))  # a server is asked once: a refusal is one clear error
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous_registry)


def _metrics(values: dict[str, float]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items()]


def champion_uri(cfg: Config) -> str:
    return f"models:/{cfg.tracking.registered_model}@{CHAMPION}"


def seed_run_id(cfg: Config, root: Path, method: str, seed: int, sha256: str) -> str | None:
    """Id of the newest finished training run of ``method``/``seed`` whose weights hash to
    ``sha256`` (the ``crossalign.*`` tags the tracker sets), or None. A SQLite store that does
    not exist yet (training ran with tracking off) is not created."""
    uri = tracking.resolve_uri(cfg.tracking.tracking_uri, Path(root))
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return None
    with using(cfg, root) as client:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        run = tracking.find_run(client, exp.experiment_id, method, seed, sha256) if exp else None
        return run.info.run_id if run else None


def log_to_seed_run(cfg: Config, root: Path, method: str, seed: int, sha256: str,
                    metrics: dict[str, float]) -> str | None:
    """Log ``metrics`` to the training run that produced these weights -> its id (None: no such run)."""
    run_id = seed_run_id(cfg, root, method, seed, sha256)
    if run_id is not None:
        log_to_run(cfg, root, run_id, metrics)
    return run_id


def log_to_run(cfg: Config, root: Path, run_id: str, metrics: dict[str, float],
               artifacts: list[Path] = ()) -> None:
    """Log final metrics (and files) to an existing run; a run id that the store does not know
    is an error naming the store."""
    with using(cfg, root) as client:
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ValueError(f"MLflow run {run_id!r} not found in {tracking_uri(cfg, root)} "
                             "(model.json names a run of another tracking store?)") from None
        client.log_batch(run_id, metrics=_metrics(metrics))
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path="evaluation")


def register_versions(cfg: Config, root: Path, candidates: dict[str, dict]) -> dict[str, str]:
    """Make each method's model a version of ``tracking.registered_model``.

    ``candidates``: method -> {"run_id", "seed", "tags": {...}, "description": one line, and
    optionally "artifact": the name of the run's logged model to register (default ``model``, the
    one training logged; a re-ranking method's evaluation logs one ranking at the fusion alpha it
    chose on val, see :func:`crossalign.methods.mlflow_model.log_fused_model`)}.
    Idempotent: a version already registered from that model of the same run (training registers
    each run's model) is reused, its tags and description refreshed. Returns method -> version.
    """
    name = cfg.tracking.registered_model
    versions: dict[str, str] = {}
    with using(cfg, root) as client:
        for method, cand in candidates.items():
            run_id, artifact = cand["run_id"], cand.get("artifact", MODEL_ARTIFACT)
            tags = {"method": method, "seed": str(cand["seed"]),
                    **{k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in cand.get("tags", {}).items()}}
            models = logged_model_ids(client, run_id, artifact)
            existing = [v for v in _versions(client, name)  # training registers its run's `model`
                        if v.run_id == run_id and (_model_id(v) in models if _model_id(v) else artifact == MODEL_ARTIFACT)]
            if existing:
                version = existing[0].version
                for k, v in tags.items():
                    client.set_model_version_tag(name, version, k, v)
            else:
                try:
                    # the logged model by its id when the run logged one of that name: a runs:/ URI
                    # resolves to it too, but MLflow warns that the run has no such artifact
                    source = f"models:/{next(iter(models))}" if len(models) == 1 else f"runs:/{run_id}/{artifact}"
                    version = mlflow.register_model(source, name, tags=tags).version
                except MlflowException as err:
                    raise ValueError(f"cannot register {method} (run {run_id}) as a version of {name!r}: "
                                     f"{err.message}") from None
            if cand.get("description"):
                client.update_model_version(name, str(version), description=cand["description"])
            versions[method] = str(version)
    return versions


def logged_model_ids(client: MlflowClient, run_id: str, artifact: str) -> set[str]:
    """Ids of the logged models called ``artifact`` that run ``run_id`` logged."""
    experiment = client.get_run(run_id).info.experiment_id
    ids, token = set(), None
    while True:
        page = client.search_logged_models(experiment_ids=[experiment], filter_string=f"name = '{artifact}'",
                                           page_token=token)
        ids.update(m.model_id for m in page if m.source_run_id == run_id)
        token = page.token
        if not token:
            return ids


def _model_id(version) -> str | None:
    """The logged model a registered version was made from (the store may leave ``model_id`` unset
    and name it in ``source``, ``models:/<id>``); None for a version registered from run artifacts."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def _versions(client: MlflowClient, name: str) -> list:
    try:
        client.get_registered_model(name)
    except MlflowException:
        return []
    return list(client.search_model_versions(f"name='{name}'"))


def set_champion(cfg: Config, root: Path, version: str) -> None:
    """Move the ``champion`` alias of the registered model to ``version``."""
    with using(cfg, root) as client:
        client.set_registered_model_alias(cfg.tracking.registered_model, CHAMPION, str(version))


def current_champion(cfg: Config, root: Path):
    """The model version holding the ``champion`` alias, or None when there is none yet."""
    with using(cfg, root) as client:
        try:
            return client.get_model_version_by_alias(cfg.tracking.registered_model, CHAMPION)
        except MlflowException:
            return None


def log_selection(cfg: Config, root: Path, files: list[Path], metrics: dict[str, float],
                  tags: dict[str, str] | None = None) -> str:
    """Record a ``select`` run in the experiment holding the selection facts (``tags``: champion,
    registry versions), its metrics and the report files."""
    with using(cfg, root) as client:
        exp_id = tracking.setup(cfg, root)
        run = client.create_run(exp_id, run_name="select",
                                tags={"stage": "select", **tracking.origin_tags(), **(tags or {})})
        client.log_batch(run.info.run_id, metrics=_metrics(metrics))
        for path in files:
            client.log_artifact(run.info.run_id, str(path), artifact_path="reports")
        client.set_terminated(run.info.run_id)
        return run.info.run_id
