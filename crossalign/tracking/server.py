"""The client side of an MLflow tracking server (``tracking.tracking_uri: http(s)://HOST:PORT``):
is a URI a server, and does it answer us.

MLflow's client retries a refused connection for minutes and reports a 401 deep inside the
first call that happens to need the server; :func:`check_server` asks once, before anything is
logged, with the same credentials MLflow's client sends (its own environment variables, never
a config file), and turns a refusal or silence into one error naming the URI and the cure.
"""
from __future__ import annotations

import os
import time


def is_server(uri: str) -> bool:
    """Whether ``uri`` names an MLflow tracking server (``http(s)://``) rather than a local store."""
    return uri.startswith(("http://", "https://"))


class TrackingServerError(ValueError):
    """The MLflow tracking server refused the request or could not be reached."""


_CHECKED: set[tuple] = set()  # (server, credentials) that answered this process


def _credentials_hint() -> str:
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return f"it rejected user {user!r} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
    return ("no credentials were sent: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the "
            "environment (never in params.yaml)")


BUSY = (429, 502, 503, 504)  # a loaded or restarting server: asked again, as MLflow's client does


def check_server(uri: str, experiment: str, connect_timeout: float = 5.0, attempts: int = 4) -> None:
    """Ask the server at ``uri`` for ``experiment`` once per process, with the credentials MLflow's
    client will send (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``;
    TLS as ``MLFLOW_TRACKING_INSECURE_TLS`` / ``MLFLOW_TRACKING_SERVER_CERT_PATH`` say).
    :class:`TrackingServerError` naming ``uri`` when it refuses (401, 403) or nothing accepts the
    connection within ``connect_timeout`` (at once: no minutes of retries); an answer may take as
    long as MLflow's own client waits (``MLFLOW_HTTP_REQUEST_TIMEOUT``, 120 s): a busy server
    that verifies eight new clients' passwords at once is slow, not gone. An absent experiment is
    fine (setup creates it)."""
    import requests

    env = os.environ
    key = (uri, *(env.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD", "TOKEN")))
    if key in _CHECKED:
        return
    auth = ((env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
            if env.get("MLFLOW_TRACKING_USERNAME") and env.get("MLFLOW_TRACKING_PASSWORD") else None)
    headers = {"Authorization": f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"} if env.get("MLFLOW_TRACKING_TOKEN") else {}
    verify: bool | str = env.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or (
        env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() not in ("true", "1"))
    read_timeout = float(env.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 120)
    for attempt in range(attempts):
        try:
            response = requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name",
                                    params={"experiment_name": experiment}, auth=auth, headers=headers,
                                    verify=verify, timeout=(connect_timeout, read_timeout))
        except requests.RequestException as err:
            raise TrackingServerError(f"MLflow tracking server {uri} (tracking.tracking_uri) cannot be reached: "
                                      f"{type(err).__name__}: {err}. Is it running (docs/scale-out.md: MLflow tracking "
                                      "server) and is the address right?") from None
        if response.status_code not in BUSY or attempt == attempts - 1:
            break
        time.sleep(2 ** attempt)
    code = response.status_code
    if code == 401:
        raise TrackingServerError(f"MLflow tracking server {uri} refused the request (HTTP 401 Unauthorized): "
                                  f"{_credentials_hint()}")
    if code == 403:
        raise TrackingServerError(f"MLflow tracking server {uri} refused the request (HTTP 403 Forbidden): "
                                  f"user {auth[0] if auth else None!r} may not read experiment {experiment!r}; "
                                  "an admin must grant it (docs/scale-out.md: MLflow tracking server)")
    if code != 200 and not (code == 404 and "RESOURCE_DOES_NOT_EXIST" in response.text):
        raise TrackingServerError(f"{uri} (tracking.tracking_uri) answered HTTP {code} to an MLflow API request "
                                  f"(is it an MLflow tracking server?): {response.text[:300]}")
    _CHECKED.add(key)
