"""Real servers for tests, on 127.0.0.1, always stopped: an MLflow tracking server and a local
DVC remote.

``mlflow_server(workdir)`` starts the server the way the README does, ``crossalign mlflow-server``
(which execs ``mlflow server``; SQLite backend store, proxied artifacts under
``workdir/artifacts``), on a free loopback port, in its own process group; it waits until
``/health`` answers and, on exit, stops the whole group by its pid (SIGTERM, then SIGKILL).
With ``auth=True`` (the default) it runs MLflow's ``basic-auth`` app: an admin user whose
password is generated here and handed over in ``CROSSALIGN_MLFLOW_ADMIN_PASSWORD``; the launcher
writes MLflow's auth config (0600), the users' database and the Flask secret key into a private
temporary directory. Nothing is shared with another test's server.

A client process needs only the environment of :meth:`MlflowServer.client_env`::

    MLFLOW_TRACKING_URI=http://127.0.0.1:<port>
    MLFLOW_TRACKING_USERNAME=<username>   # MLflow's own client variables (HTTP basic auth)
    MLFLOW_TRACKING_PASSWORD=<password>

``local_dvc_remote(tmp)`` is a directory that clones share as their DVC remote
(``dvc remote add -d``); :func:`use_dvc_remote` points a clone at it.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
REPO = Path(__file__).resolve().parents[1]  # the checkout whose crossalign starts the server
QUIET_ENV = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}


class MlflowServer(NamedTuple):
    """A running tracking server: its URL and the admin credentials (None without auth)."""

    url: str
    username: str | None
    password: str | None

    def client_env(self) -> dict[str, str]:
        """The variables a client process needs to log to this server (MLflow's own names)."""
        env = {"MLFLOW_TRACKING_URI": self.url}
        if self.username is not None:
            env |= {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}
        return env


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def wait_until(ready: Callable[[], Any], timeout: float, what: str, *procs: subprocess.Popen,
               log: Path | None = None, interval: float = 0.5) -> Any:
    """Poll ``ready`` every ``interval`` s until it returns something true, and return that; an error
    naming ``what`` (with the log's tail) when one of ``procs`` exits first or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args!r} exited with {proc.returncode} before it was ready:\n"
                                   f"{log_tail(log) if log else ''}")
        value = ready()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s:\n{log_tail(log) if log else ''}")


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """Stop ``proc`` (started with ``start_new_session``), every process of its group, and anything
    left under it that changed group: SIGTERM, ``grace`` seconds, then SIGKILL."""
    victims = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
    try:  # workers that outlived their parent still belong to the group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def http_status(url: str, auth: tuple[str, str] | None = None, timeout: float = 5) -> int | None:
    """The HTTP status of a GET of ``url`` (with basic-auth credentials if given); None when
    nothing answers."""
    request = urllib.request.Request(url)
    if auth is not None:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


@contextmanager
def mlflow_server(workdir: str | Path, *, auth: bool = True, workers: int = 1, default_permission: str = "READ",
                  timeout: float = 120) -> Iterator[MlflowServer]:
    """A real MLflow tracking server on 127.0.0.1, started as users start it (``crossalign
    mlflow-server``: SQLite store ``workdir/mlflow.db``, artifacts proxied to
    ``workdir/artifacts``, log ``workdir/server.log``) -> its URL and admin credentials; stopped
    by process group on exit. ``auth``: MLflow's basic-auth app, admin ``admin`` with a generated
    password and ``default_permission`` for other users; its private files in a fresh temporary
    directory (outside any git work tree, as the launcher demands), removed on exit."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **QUIET_ENV}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                "CROSSALIGN_MLFLOW_ADMIN_USERNAME", "CROSSALIGN_MLFLOW_ADMIN_PASSWORD"):
        env.pop(key, None)
    auth_dir = Path(tempfile.mkdtemp(prefix="crossalign-mlflow-auth-"))
    cmd = [sys.executable, "-m", "crossalign.cli", "mlflow-server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers), "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", str(workdir / "artifacts"), "--auth-dir", str(auth_dir),
           "--default-permission", default_permission]
    username = password = None
    if auth:
        username, password = "admin", secrets.token_urlsafe(18)
        env |= {"CROSSALIGN_MLFLOW_ADMIN_USERNAME": username, "CROSSALIGN_MLFLOW_ADMIN_PASSWORD": password}
    log = workdir / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: http_status(f"{url}/health", timeout=2) == 200, timeout, f"mlflow server at {url}",
                   proc, log=log)
        yield MlflowServer(url, username, password)
    finally:
        stop(proc)
        shutil.rmtree(auth_dir, ignore_errors=True)


@contextmanager
def local_dvc_remote(tmp: str | Path) -> Iterator[Path]:
    """A directory used as the shared DVC remote (``tmp/dvc-remote``); nothing runs, nothing to stop."""
    remote = Path(tmp) / "dvc-remote"
    remote.mkdir(parents=True, exist_ok=True)
    yield remote


def use_dvc_remote(clone: Path, remote: Path, name: str = "shared", local: bool = True) -> None:
    """Make ``remote`` the default DVC remote of ``clone``: in ``.dvc/config.local`` (this clone
    only, not committed), or with ``local=False`` in ``.dvc/config`` (committed, seen by every clone)."""
    scope = ["--local"] if local else []
    subprocess.run([DVC, "remote", "add", *scope, "-f", "-d", name, str(remote)], cwd=clone, check=True,
                   capture_output=True, env={**os.environ, **QUIET_ENV})
