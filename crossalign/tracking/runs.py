"""MLflow tracking of training runs: one experiment, one run per method (and seed).

``tracking.tracking_uri`` is a SQLite file (one host: metadata in it, artifacts under
``tracking.artifact_location``) or an MLflow tracking server ``http(s)://HOST:PORT`` shared by
every host (artifacts go through the server, proxied ``mlflow-artifacts:``; credentials only from
MLflow's own environment variables, ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``).
A server is asked once per process before anything is logged, so a refusal (401/403) or an
unreachable address is one error naming the URI instead of MLflow's minutes of retries.
Every run is tagged with where it ran (:func:`origin_tags`: host, Prefect flow run).
A run holds the resolved config as params; per-epoch history as ``epoch/<name>`` metrics (losses,
learning rate, validation recall, wall seconds); the best epoch's values that early stopping kept
as ``best_val_<name>`` / ``best_epoch``; system metrics; lineage tags (``crossalign.method``,
``crossalign.seed``, ``crossalign.weights_sha256`` of the saved ``model.safetensors``, git commit,
DVC md5 of the features); the last checkpoint and a loss-curve PNG as artifacts; and the model as
an MLflow pyfunc built "from code" (``crossalign/methods/pyfunc_model.py``) whose artifacts are
``model.safetensors`` + ``model.json`` loaded through :func:`crossalign.methods.load_aligner` --
nothing is pickled.

No run id is written into a DVC out: evaluate and select find a seed's run by its tags
(:func:`find_run`), so the trained model files are a function of config, code and data alone.
The experiment is tagged as model training (``mlflow.experimentKind``) so the MLflow UI opens on
the runs table, and carries a shared view (``?viewStateShareKey=crossalign``) with the metric
columns selected. Its artifact root follows the checkout: a store whose recorded root is another
checkout's (moved or copied tree) is rewritten to this one (:func:`follow_checkout`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crossalign.config import Config
from crossalign.tracking.server import TrackingServerError, check_server, is_server  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)
FEATURE_PATHS = ("data/features", "data/features/train", "data/features/val")
TAG_METHOD, TAG_SEED, TAG_WEIGHTS = "crossalign.method", "crossalign.seed", "crossalign.weights_sha256"
TAG_FINGERPRINT = "crossalign.fingerprint"  # training fingerprint: a resumed checkpoint reopens its run
TAG_HOST, TAG_FLOW_RUN = "crossalign.host", "crossalign.flow_run_id"  # where a run ran (tags, never DVC outs)
TAG_STAGE_FLOW_RUN = "crossalign.stage_flow_run_id"  # Prefect's own flow run of the process, when it differs
TAG_RESUMED_FROM = "crossalign.resumed_from_host"  # a training resumed on another host: where it began
# CROSSALIGN_HOST overrides the host name (two "hosts" on one machine in tests); the stage runner
# sets CROSSALIGN_FLOW_RUN_ID to the comparison's flow run; Prefect sets PREFECT__FLOW_RUN_ID in
# every flow-run process it starts (workers, served deployments), inherited by stage subprocesses.
HOST_ENV, FLOW_RUN_ENV, PREFECT_FLOW_RUN_ENV = "CROSSALIGN_HOST", "CROSSALIGN_FLOW_RUN_ID", "PREFECT__FLOW_RUN_ID"
EPOCH_PREFIX = "epoch/"  # per-epoch history; ``best_*`` are the kept (best-epoch) values
# The MLflow 3 UI's ExperimentKind enum (mlflow/server/js: "mlflow.experimentKind"): classic ML, not GenAI.
# MLflow 3.17's UI reads the kind from its GenAI / Model training toggle (URL ``workflowType=machine_learning``,
# remembered per browser) when that feature flag is on; earlier 3.x UIs read this tag.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
SHARED_VIEW_PREFIX, SHARED_VIEW_KEY = "mlflow.sharedViewState.", "crossalign"
VIEW_METRICS = ("best_val_rsum", "eval_test_rsum", "eval_test_i2t_r1", "eval_test_t2i_r1", "best_epoch")
# Tables/columns of the MLflow SQLite schema that record absolute artifact locations.
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                    ("model_versions", "source"))


def resolve_uri(uri: str, root: Path) -> str:
    """A ``sqlite:///relative/path`` URI made absolute against ``root`` (others unchanged)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((root / uri[len(prefix):]).resolve())
    return uri


def origin_tags() -> dict[str, str]:
    """Where a run ran: ``crossalign.host`` and, inside a Prefect flow run, ``crossalign.flow_run_id``
    (the comparison's, :data:`FLOW_RUN_ENV`, else Prefect's own) -- MLflow tags, never DVC outs."""
    tags = {TAG_HOST: os.environ.get(HOST_ENV) or socket.gethostname()}
    ours, prefect = os.environ.get(FLOW_RUN_ENV), os.environ.get(PREFECT_FLOW_RUN_ENV)
    if ours or prefect:
        tags[TAG_FLOW_RUN] = ours or prefect
    if ours and prefect and ours != prefect:
        tags[TAG_STAGE_FLOW_RUN] = prefect
    return tags


def artifact_root(cfg: Config, root: Path) -> Path:
    """``tracking.artifact_location`` resolved against the checkout ``root`` (absolute ones as given)."""
    location = Path(cfg.tracking.artifact_location)
    return (location if location.is_absolute() else Path(root) / location).resolve()


def shared_view() -> dict[str, Any]:
    """The runs-table view the experiment's ``viewStateShareKey`` link opens: run name, source and
    the selection metrics as columns (column keys as the UI spells them), newest run first. The
    order is start time because the MLflow UI nests child runs (a tuning run's trials) under their
    parent, collapsed, only in that order: sorted by a metric, every trial would be a row of its own."""
    return {"selectedColumns": ["attributes.`Source`", *(f"metrics.`{m}`" for m in VIEW_METRICS)],
            "orderByKey": "attributes.start_time", "orderByAsc": False}


def runs_url(base: str, experiment_id: str) -> str:
    """The address of the experiment's runs table with the shared view (``base``: the MLflow UI's
    or server's address): ``workflowType=machine_learning`` opens the table, not MLflow's GenAI
    overview, and ``viewStateShareKey`` applies :func:`shared_view`."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={SHARED_VIEW_KEY}")


def experiment_id(cfg: Config, root: Path) -> str | None:
    """The id of ``tracking.experiment`` in the store, or None when the store or experiment does
    not exist yet (a SQLite store is only read: nothing is created)."""
    uri = resolve_uri(cfg.tracking.tracking_uri, Path(root))
    path = _sqlite_path(uri)
    if path is not None:  # read the file directly: opening it through MLflow checks (and may migrate) its schema
        if not path.exists():
            return None
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                             (cfg.tracking.experiment,)).fetchone()
        return str(row[0]) if row else None
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(cfg.tracking.experiment)
    return exp.experiment_id if exp is not None else None


def setup(cfg: Config, root: str | Path = ".") -> str:
    """Create (once) the store, the experiment and the registered model -> experiment id.

    The experiment is tagged as model training with a shared runs-table view; a SQLite store
    moved with its checkout is re-pointed at it first. Safe when several processes or hosts
    set up at once: a concurrent creation of the experiment or registered model is taken as
    done (on one SQLite file, better called once before fanning out: SQLite locks)."""
    root = Path(root)
    uri = connect(cfg, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # explicitly: an earlier registry.using() may have pinned the default ./mlflow.db
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        exp_id = _create_experiment(client, cfg, root, uri)
        exp = client.get_experiment(exp_id)
    else:
        exp_id = exp.experiment_id
    tags = {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], SHARED_VIEW_PREFIX + SHARED_VIEW_KEY: json.dumps(shared_view()),
            "mlflow.note.content": "crossalign: one run per method and seed of the train stage; `epoch/*` metrics "
                                   "are per-epoch history, `best_*` the epoch early stopping kept, `eval_*` the "
                                   "evaluate stage's COCO metrics; `select` runs hold the comparison report. "
                                   f"Runs table with these columns: add `?workflowType=machine_learning&"
                                   f"viewStateShareKey={SHARED_VIEW_KEY}` to this page's address."}
    current = exp.tags or {}
    for key, value in tags.items():
        if current.get(key) != value:
            _set_experiment_tag(client, exp_id, key, value)
    try:
        client.get_registered_model(cfg.tracking.registered_model)
    except MlflowException:
        try:
            client.create_registered_model(cfg.tracking.registered_model)
        except MlflowException:
            pass  # created meanwhile
    return exp_id


def connect(cfg: Config, root: Path) -> str:
    """The tracking URI, ready to use: a SQLite store's directory made (and the store re-pointed
    at a moved checkout), a server asked once (:func:`check_server`)."""
    uri = resolve_uri(cfg.tracking.tracking_uri, Path(root))
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        follow_checkout(cfg, Path(root))
    elif is_server(uri):
        check_server(uri, cfg.tracking.experiment)
    return uri


def _create_experiment(client: MlflowClient, cfg: Config, root: Path, uri: str) -> str:
    """Create the experiment -> its id; one created meanwhile by another process or host is
    taken. A local store gets ``tracking.artifact_location``; a server keeps its own artifact
    root (``--artifacts-destination``, served as ``mlflow-artifacts:``) so every host reads
    the artifacts every other host wrote."""
    location = None
    if not is_server(uri):
        path = artifact_root(cfg, root)
        path.mkdir(parents=True, exist_ok=True)
        location = path.as_uri()
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except MlflowException as err:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)  # created meanwhile?
        if exp is None:
            raise
        log.info("experiment %s was created meanwhile by another process (%s)", cfg.tracking.experiment,
                 err.error_code)
        return exp.experiment_id


def _set_experiment_tag(client: MlflowClient, exp_id: str, key: str, value: str) -> None:
    """Set an experiment tag; when several processes set it at once the store can refuse all but
    one (a SQL unique-key race, seen with eight hosts against one server): a refusal is fine
    if the tag now holds ``value``."""
    try:
        client.set_experiment_tag(exp_id, key, value)
    except MlflowException:
        if client.get_experiment(exp_id).tags.get(key) != value:
            raise


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def follow_checkout(cfg: Config, root: Path) -> bool:
    """Re-point a store that moved with its checkout at the new tree -> whether it rewrote.

    MLflow records absolute artifact URIs (experiment root, each run, logged model and model
    version). When the SQLite file lies inside ``root``, ``tracking.artifact_location`` is
    relative, and the experiment's recorded root is not ``root``'s, the checkout was moved or
    copied with its ``mlruns/``: every recorded location under the old root is rewritten to the
    same path under the new one, so runs log into, and models load from, this tree."""
    db = _sqlite_path(resolve_uri(cfg.tracking.tracking_uri, Path(root)))
    if db is None or not db.exists() or Path(cfg.tracking.artifact_location).is_absolute():
        return False
    if not db.resolve().is_relative_to(Path(root).resolve()):
        return False
    new = artifact_root(cfg, root).as_uri()
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:  # closed; committed on success
        try:
            row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                              (cfg.tracking.experiment,)).fetchone()
        except sqlite3.OperationalError:  # no MLflow schema yet
            return False
        if row is None or row[0] in (new, None) or not row[0].startswith("file://"):
            return False
        old = row[0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column in LOCATION_COLUMNS:
            if table in tables:
                con.execute(f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '  # fixed names
                            f'WHERE "{column}" = ? OR substr("{column}", 1, ?) = ?',
                            (new, len(old) + 1, old, len(old) + 1, old + "/"))
    log.warning("MLflow store %s recorded artifacts under %s: re-pointed at %s (checkout moved or copied)",
                db, old, new)
    return True


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file: the tag that ties an MLflow run to the model files it produced."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unfinished_run(client: MlflowClient, experiment_id: str, method: str, seed: int, fingerprint: str):
    """The newest run of ``method``/``seed`` with this training fingerprint that did not finish
    (killed: RUNNING; stopped by an error: FAILED), or None."""
    runs = client.search_runs(
        [experiment_id], max_results=20, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{TAG_METHOD}` = '{method}' AND tags.`{TAG_SEED}` = '{int(seed)}' "
                      f"AND tags.`{TAG_FINGERPRINT}` = '{fingerprint}'")
    return next((r for r in runs if r.info.status != "FINISHED"), None)


def find_run(client: MlflowClient, experiment_id: str, method: str, seed: int, sha256: str):
    """The newest finished run of ``method``/``seed`` whose saved weights hash to ``sha256``, or
    None. Several runs can match (the same config trained twice gives identical weights): any of
    them produced these files; the newest is taken."""
    runs = client.search_runs(
        [experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{TAG_METHOD}` = '{method}' AND tags.`{TAG_SEED}` = '{int(seed)}' "
                      f"AND tags.`{TAG_WEIGHTS}` = '{sha256}' AND attributes.status = 'FINISHED'")
    return runs[0] if runs else None


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
