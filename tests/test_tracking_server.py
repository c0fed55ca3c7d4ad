"""Tracking against a real MLflow tracking server (``crossalign mlflow-server`` on 127.0.0.1, basic
auth on, stopped by the test): one experiment even when set up concurrently, artifacts through the
server, runs tagged with host and flow run, the ``champion`` alias moved by ``select`` only, clear
errors for refused or unreachable servers, and the launcher's refusals and permissions."""
from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from argparse import Namespace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow import MlflowClient

from conftest import make_tiny_features, tiny_config
from crossalign.evaluate import stage as evaluation
from crossalign.tracking import mlflow_server
from crossalign.tracking import registry
from crossalign.select import stage as selection
from crossalign.tracking import runs as tracking
from crossalign.methods import mlflow_model
from crossalign.train import tracker
from crossalign.tracking import server as tracking_server
from crossalign.train import stage as training
from crossalign.cli import main as cli_main
from crossalign.io import load_features
from crossalign.methods import load_aligner
from crossalign.retrieval.scoring import score_matrices
from eval_helpers import write_split_features
from servers import free_port, http_status, mlflow_server as start_server

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real server (auth on) for the module; its files under ``workdir``."""
    workdir = tmp_path_factory.mktemp("mlflow-server")
    with start_server(workdir) as srv:
        yield srv, workdir


@pytest.fixture
def client_env(server, monkeypatch):
    """The admin's credentials in MLflow's own variables; the process's MLflow globals restored after."""
    srv, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", srv.username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", srv.password)
    monkeypatch.setattr(tracking_server, "_CHECKED", set())
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield srv
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


def _cfg(tmp_path, srv, name, **overrides):
    tracking_params = {"tracking_uri": srv.url, "experiment": name, "registered_model": f"{name}-m"}
    return tiny_config(tmp_path, tracking=tracking_params, **overrides)


def test_concurrent_setup_creates_one_experiment_whose_artifacts_the_server_holds(tmp_path, client_env):
    cfg = _cfg(tmp_path, client_env, "raced")
    barrier, ids, errors = threading.Barrier(6), [], []

    def set_up():
        barrier.wait()  # every thread finds no experiment, then all create it at once
        try:
            ids.append(tracking.setup(cfg, tmp_path))
        except Exception as err:  # noqa: BLE001 - collected, asserted below
            errors.append(err)

    threads = [threading.Thread(target=set_up) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(ids) == 6 and len(set(ids)) == 1
    client = MlflowClient(client_env.url, registry_uri=client_env.url)
    exp = client.get_experiment(ids[0])
    assert exp.name == "raced" and exp.artifact_location.startswith("mlflow-artifacts:")
    assert [e.name for e in client.search_experiments(filter_string="name = 'raced'")] == ["raced"]
    assert client.get_registered_model("raced-m").name == "raced-m"
    assert not (tmp_path / "mlruns").exists()  # tracking.artifact_location applies to sqlite only


def test_training_logs_through_the_server_tagged_with_host_and_flow_run(tmp_path, client_env, server, monkeypatch):
    _, workdir = server
    monkeypatch.setenv(tracking.HOST_ENV, "gpu-host-7")
    monkeypatch.setenv(tracking.FLOW_RUN_ENV, "comparison-run-1")
    monkeypatch.setenv(tracking.PREFECT_FLOW_RUN_ENV, "stage-run-9")
    for i, split in enumerate(("train", "val")):
        make_tiny_features(tmp_path / "data" / "features" / split, n_images=48 if split == "train" else 16, seed=i)
    cfg = _cfg(tmp_path, client_env, "trained", train={"epochs": 2, "device": "cpu", "threads": 1})
    result = training.run(cfg, tmp_path, "contrastive", tracker_factory=tracker.MlflowTracker, log=lambda *a: None)[0]
    final = tmp_path / "models" / "contrastive" / "final" / "seed-0"
    sha = hashlib.sha256((final / "model.safetensors").read_bytes()).hexdigest()

    client = MlflowClient(client_env.url, registry_uri=client_env.url)
    exp = client.get_experiment_by_name("trained")
    run = tracking.find_run(client, exp.experiment_id, "contrastive", 0, sha)
    assert run.data.tags[tracking.TAG_HOST] == "gpu-host-7"
    assert run.data.tags[tracking.TAG_FLOW_RUN] == "comparison-run-1"
    assert run.data.tags[tracking.TAG_STAGE_FLOW_RUN] == "stage-run-9"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/val_rsum")] == [1, 2]
    # the artifacts are in the server's --artifacts-destination, none in the checkout
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = workdir / "artifacts" / exp.experiment_id / run.info.run_id / "artifacts"
    assert (stored / "loss_curve.png").is_file() and (stored / "checkpoint" / "state.json").is_file()
    assert not (tmp_path / "mlruns").exists()
    # the registered version loads back through the server and scores as the local files do
    version = run.data.tags["registered_version"]
    logged = mlflow_model.load_logged_aligner(f"models:/trained-m/{version}", client_env.url)
    local, _ = load_aligner(final)
    split = load_features(tmp_path / "data" / "features" / "val")
    for a, b in zip(score_matrices(logged, split), score_matrices(local, split)):
        np.testing.assert_array_equal(a, b)
    assert result["best_epoch"] == run.data.metrics["best_epoch"]


def test_a_run_resumed_on_another_host_says_where_it_began(tmp_path, client_env, monkeypatch):
    cfg = _cfg(tmp_path, client_env, "resumed")
    monkeypatch.setenv(tracking.HOST_ENV, "host-a")
    first = tracker.MlflowTracker(cfg, tmp_path)
    run_id = first.start("contrastive", 0, "fp-1")
    mlflow.end_run(status="FAILED")  # host-a died mid-training; its checkpoint holds no run id
    monkeypatch.setenv(tracking.HOST_ENV, "host-b")
    second = tracker.MlflowTracker(cfg, tmp_path)
    assert second.start("contrastive", 0, "fp-1") == run_id  # found again by its tags
    mlflow.end_run()
    tags = MlflowClient(client_env.url, registry_uri=client_env.url).get_run(run_id).data.tags
    assert tags[tracking.TAG_HOST] == "host-b" and tags[tracking.TAG_RESUMED_FROM] == "host-a"


def test_only_select_moves_the_champion_alias_once(tmp_path, client_env, monkeypatch):
    methods = ["concat_mlp", "contrastive"]
    make_tiny_features(tmp_path / "data" / "features" / "train", n_images=32, image_dim=12, text_dim=10)
    write_split_features(tmp_path)
    cfg = _cfg(tmp_path, client_env, "aliased", train={"methods": methods, "epochs": 1, "device": "cpu"},
               select={"gallery": 0, "bootstrap": 20})
    moves = []
    original = MlflowClient.set_registered_model_alias

    def recording(self, name, alias, version):
        moves.append((name, alias, str(version)))
        return original(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", recording)
    for method in methods:
        training.run(cfg, tmp_path, method, tracker_factory=tracker.MlflowTracker, log=lambda *a: None)
        evaluation.run(cfg, method, tmp_path)
    client = MlflowClient(client_env.url, registry_uri=client_env.url)
    assert moves == [] and client.get_registered_model("aliased-m").aliases == {}
    assert len(client.search_model_versions("name='aliased-m'")) == 2  # training registered each

    result = selection.run(cfg, tmp_path)
    version = result["registry"]["champion_version"]
    assert moves == [("aliased-m", registry.CHAMPION, version)]
    assert client.get_registered_model("aliased-m").aliases == {registry.CHAMPION: version}
    select_run = client.search_runs([client.get_experiment_by_name("aliased").experiment_id],
                                    filter_string="tags.stage = 'select'")[0]
    assert select_run.data.tags[tracking.TAG_HOST]  # the select run says where it ran too


def test_wrong_or_missing_credentials_are_one_clear_error(tmp_path, client_env, monkeypatch):
    cfg = _cfg(tmp_path, client_env, "refused")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(tracking.TrackingServerError, match=r"401 .*rejected user 'admin'") as err:
        tracking.setup(cfg, tmp_path)
    assert client_env.url in str(err.value)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(tracking.TrackingServerError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        with registry.using(cfg, tmp_path):
            pass
    assert isinstance(err.value, ValueError)  # stage entry points print it and exit 2


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking_server, "_CHECKED", set())
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = tiny_config(tmp_path, tracking={"tracking_uri": uri})
    started = time.monotonic()
    with pytest.raises(tracking.TrackingServerError, match=f"{uri} .*cannot be reached"):
        tracking.setup(cfg, tmp_path)
    assert time.monotonic() - started < 10  # MLflow's own client would retry for minutes


def test_credentials_in_the_tracking_uri_are_refused(tmp_path):
    from crossalign import config

    with pytest.raises(config.ConfigError, match="credentials belong in the environment") as err:
        tiny_config(tmp_path, tracking={"tracking_uri": "https://user:s3cret-Pw@mlflow.example.org"})
    assert "s3cret-Pw" not in str(err.value) and "user:" not in str(err.value)  # the message echoes no secret
    assert "https://<credentials>@mlflow.example.org" in str(err.value)


def _launch_args(tmp_path, host="0.0.0.0", auth_dir=None) -> Namespace:
    """The parsed arguments of ``crossalign mlflow-server``."""
    return Namespace(host=host, port=5000, backend_store_uri=f"sqlite:///{tmp_path}/m.db",
                     artifacts_destination=str(tmp_path / "a"), workers=1, auth_dir=auth_dir or tmp_path / "auth",
                     auth_database_uri=None, default_permission="READ", allowed_hosts=None,
                     auth_cache_seconds=60)


def test_launcher_refuses_to_expose_a_server_without_a_password(tmp_path, capsys):
    argv = ["mlflow-server", "--host", "0.0.0.0", "--backend-store-uri", f"sqlite:///{tmp_path}/m.db",
            "--artifacts-destination", str(tmp_path / "a"), "--auth-dir", str(tmp_path / "auth")]
    env = {k: v for k, v in os.environ.items() if k != mlflow_server.ADMIN_PASSWORD_ENV}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", env)
        assert cli_main(argv) == 2
    assert "refusing to serve MLflow on 0.0.0.0:5000 without authentication" in capsys.readouterr().err
    assert not (tmp_path / "auth").exists()  # nothing written
    for host in ("10.0.0.5", "gpu-host.example.org"):
        with pytest.raises(mlflow_server.ServerConfigError, match="without authentication"):
            mlflow_server.prepare(_launch_args(tmp_path, host), {})
    for host in ("127.0.0.1", "localhost", "::1"):  # loopback: one user, no auth app
        cmd, _ = mlflow_server.prepare(_launch_args(tmp_path, host), {})
        assert "--app-name" not in cmd
    with pytest.raises(mlflow_server.ServerConfigError, match="at least 12"):
        mlflow_server.prepare(_launch_args(tmp_path), {mlflow_server.ADMIN_PASSWORD_ENV: "short"})
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    with pytest.raises(mlflow_server.ServerConfigError, match="git work tree"):
        mlflow_server.prepare(_launch_args(tmp_path, auth_dir=tmp_path / "repo" / "auth"),
                              {mlflow_server.ADMIN_PASSWORD_ENV: "a-long-enough-password"})


def test_launcher_writes_a_private_auth_config_without_the_password(tmp_path):
    password = "a-long-enough-password"
    env = {mlflow_server.ADMIN_PASSWORD_ENV: password, mlflow_server.ADMIN_USER_ENV: "svc", "PATH": "/bin"}
    cmd, server_env = mlflow_server.prepare(_launch_args(tmp_path), env)
    assert cmd[1:4] == ["-m", "mlflow", "server"] and cmd[-2:] == ["--app-name", "basic-auth"]
    assert password not in " ".join(cmd)
    config = Path(server_env["MLFLOW_AUTH_CONFIG_PATH"])
    assert config.parent == (tmp_path / "auth").resolve()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    text = config.read_text()
    assert password not in text and "admin_username = svc" in text and "default_permission = READ" in text
    assert "auth_cache_ttl_seconds = 60" in text
    assert f"database_uri = sqlite:///{config.parent / 'basic_auth.db'}" in text
    assert server_env["MLFLOW_AUTH_ADMIN_PASSWORD"] == password
    assert mlflow_server.ADMIN_PASSWORD_ENV not in server_env  # handed over under MLflow's name only
    assert server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    key = server_env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert len(key) == 64 and stat.S_IMODE((config.parent / "flask_secret_key").stat().st_mode) == 0o600
    assert mlflow_server.prepare(_launch_args(tmp_path), env)[1]["MLFLOW_FLASK_SERVER_SECRET_KEY"] == key  # reused


def test_a_service_account_owns_what_it_sets_up_and_a_reader_cannot_write_to_it(tmp_path, client_env, monkeypatch):
    admin = (client_env.username, client_env.password)
    for user in ("svc", "peer"):
        assert requests.post(f"{client_env.url}/api/2.0/mlflow/users/create", auth=admin, timeout=10,
                             json={"username": user, "password": f"{user}-password-123"}).status_code == 200
    cfg = _cfg(tmp_path, client_env, "owned")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "svc")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "svc-password-123")
    exp_id = tracking.setup(cfg, tmp_path)  # the stage hosts' account creates experiment and model
    client = MlflowClient(client_env.url, registry_uri=client_env.url)
    run_id = client.create_run(exp_id, tags=tracking.origin_tags()).info.run_id
    client.log_metric(run_id, "x", 1.0)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "peer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "peer-password-123")
    assert client.get_run(run_id).data.metrics == {"x": 1.0}  # READ by default
    with pytest.raises(mlflow.exceptions.MlflowException, match="Permission denied"):
        client.log_metric(run_id, "x", 2.0)
    with pytest.raises(mlflow.exceptions.MlflowException, match="Permission denied"):
        client.delete_registered_model("owned-m")


def test_requests_need_credentials_and_a_reader_cannot_move_the_champion(server):
    srv, _ = server
    admin = (srv.username, srv.password)
    api = f"{srv.url}/api/2.0/mlflow"
    assert http_status(f"{api}/experiments/search?max_results=1") == 401
    assert http_status(f"{api}/experiments/search?max_results=1", admin) == 200
    assert http_status(f"{api}/experiments/search?max_results=1", (srv.username, "wrong-password")) == 401
    reader = ("reader", "reader-password-1")
    assert requests.post(f"{api}/users/create", json={"username": reader[0], "password": reader[1]},
                         auth=admin, timeout=10).status_code == 200
    assert requests.post(f"{api}/registered-models/create", json={"name": "guarded"}, auth=admin,
                         timeout=10).status_code == 200
    assert requests.get(f"{api}/registered-models/get", params={"name": "guarded"}, auth=reader,
                        timeout=10).status_code == 200  # default_permission READ: it can look
    alias = {"name": "guarded", "alias": registry.CHAMPION, "version": "1"}
    assert requests.post(f"{api}/registered-models/alias", json=alias, auth=reader, timeout=10).status_code == 403
    assert requests.delete(f"{api}/registered-models/delete", json={"name": "guarded"}, auth=reader,
                           timeout=10).status_code == 403
    assert requests.get(f"{api}/registered-models/get", params={"name": "guarded"}, auth=admin,
                        timeout=10).status_code == 200  # still there
