"""``crossalign mlflow-server``: the one MLflow tracking server every host logs to, behind MLflow's
``basic-auth`` app.

    export CROSSALIGN_MLFLOW_ADMIN_PASSWORD='<at least 12 characters>'   # never in a file you commit
    crossalign mlflow-server --host 0.0.0.0 --port 5000 \\
        --backend-store-uri postgresql://mlflow@db-host:5432/mlflow \\
        --artifacts-destination /srv/mlflow/artifacts

What it does, then ``exec``s ``python -m mlflow server --app-name basic-auth`` with the same host,
port, stores and ``--workers``:

- Beyond loopback it refuses to start without ``CROSSALIGN_MLFLOW_ADMIN_PASSWORD`` (anyone on the
  network could otherwise create runs and move the registry's ``champion``). On 127.0.0.1 without
  it, the server runs without authentication (one user, one machine).
- It writes MLflow's auth config (the keys of MLflow's ``basic_auth.ini``: users' database,
  admin user name, ``default_permission``) to a private (0600) file in ``--auth-dir``, which must
  lie outside any git work tree (default ``~/.config/crossalign/mlflow-server``). The password is
  not written there: it goes to MLflow in its own variable ``MLFLOW_AUTH_ADMIN_PASSWORD``, which
  MLflow reads the first time it starts against an empty users' database to create the admin
  (later starts ignore it; rotate the password through MLflow's update-password API).
- The Flask secret key MLflow's auth app needs for CSRF (``MLFLOW_FLASK_SERVER_SECRET_KEY``) comes
  from the environment, else it is generated once into ``--auth-dir`` (0600) and reused, so
  restarts and several server processes agree.

A verified password is trusted by a worker for ``--auth-cache-seconds`` (MLflow's
``auth_cache_ttl_seconds``, default 60 here, 0 in MLflow): without the cache every request
re-hashes the password, measured at ~1.1 s per request on a loaded 2-core machine against
0.06 s without auth, which made a training run's logging the bottleneck. The price: a
changed or deleted password can still work for up to that long on another worker.

MLflow's background job runner (a supervisor and seven huey consumers for GenAI scorers and
trace archival) is off unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` is set: crossalign logs
runs and models only, and on a small host those processes cost more than the server itself.

``--default-permission READ`` (the default, and MLflow's): a user the admin creates can read every
experiment and model but cannot write to one it did not create, so it cannot move the
``champion`` alias or overwrite versions; the hosts that run stages log with one service account
that owns the experiment and registered model (the account that ran ``setup`` first: the admin,
unless the admin grants another user EDIT/MANAGE). Clients authenticate with MLflow's own
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
"""
from __future__ import annotations

import argparse
import configparser
import io
import ipaddress
import os
import secrets
import sys
from pathlib import Path

ADMIN_USER_ENV, ADMIN_PASSWORD_ENV = "CROSSALIGN_MLFLOW_ADMIN_USERNAME", "CROSSALIGN_MLFLOW_ADMIN_PASSWORD"
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
JOBS_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")  # mlflow.server.auth.permissions
MIN_PASSWORD = 12  # the length MLflow's own user-creation form asks for
AUTH_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"


class ServerConfigError(ValueError):
    """The server would start unsafely or cannot start as asked."""


def default_auth_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "crossalign" / "mlflow-server"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; beyond "
                        f"loopback needs {ADMIN_PASSWORD_ENV})")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument("--backend-store-uri", required=True,
                        help="runs and registry database, e.g. postgresql://mlflow@db-host:5432/mlflow "
                             "(its password from PGPASSWORD or ~/.pgpass) or sqlite:////srv/mlflow/mlflow.db")
    parser.add_argument("--artifacts-destination", required=True,
                        help="artifact root the server proxies (a directory, s3://..., ...)")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    parser.add_argument("--auth-dir", type=Path, default=None,
                        help=f"private directory for the auth config (default {default_auth_dir()}); "
                             "must be outside any git work tree")
    parser.add_argument("--auth-database-uri", default=None,
                        help="users and permissions database (default sqlite in --auth-dir)")
    parser.add_argument("--default-permission", default="READ", choices=PERMISSIONS,
                        help="what every authenticated user may do to resources it did not create (default READ)")
    parser.add_argument("--auth-cache-seconds", type=int, default=60,
                        help="how long a worker trusts a verified password (MLflow's auth_cache_ttl_seconds; "
                             "0: hash every request, ~1 s of CPU each on a busy 2-core host; default 60)")
    parser.add_argument("--allowed-hosts", default=None,
                        help="Host headers the server accepts, e.g. mlflow.example.org,10.0.0.5:5000 "
                             "(MLflow's default: localhost and private addresses)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def git_work_tree(path: Path) -> Path | None:
    """The git work tree that ``path`` lies in (a ``.git`` in it or a parent), or None."""
    for parent in [path, *path.parents]:
        if (parent / ".git").exists():
            return parent
    return None


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (0600 from creation, then renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def auth_config_text(database_uri: str, admin_username: str, default_permission: str, cache_seconds: int) -> str:
    """MLflow's basic-auth config (``mlflow/server/auth/basic_auth.ini``'s keys), without a password."""
    parser = configparser.ConfigParser()
    parser["mlflow"] = {"default_permission": default_permission, "database_uri": database_uri,
                        "admin_username": admin_username, "authorization_function": AUTH_FUNCTION,
                        "auth_cache_ttl_seconds": str(cache_seconds)}
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def _secret_key(auth_dir: Path, env: dict[str, str]) -> str:
    if env.get(SECRET_KEY_ENV):
        return env[SECRET_KEY_ENV]
    path = auth_dir / "flask_secret_key"
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_hex(32)
    write_private(path, key + "\n")
    return key


def prepare(args: argparse.Namespace, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Check the request, write the private auth files -> (``mlflow server`` argv, its environment).
    :class:`ServerConfigError` for an unsafe or impossible start (nothing written then)."""
    password = env.get(ADMIN_PASSWORD_ENV)
    auth = bool(password)
    if not auth and not is_loopback(args.host):
        raise ServerConfigError(
            f"refusing to serve MLflow on {args.host}:{args.port} without authentication: anyone who reaches it "
            f"could log runs and move the registry's champion. Set {ADMIN_PASSWORD_ENV} (and optionally "
            f"{ADMIN_USER_ENV}, default admin) in the environment, or bind --host 127.0.0.1")
    if auth and len(password) < MIN_PASSWORD:
        raise ServerConfigError(f"{ADMIN_PASSWORD_ENV} has {len(password)} characters; use at least {MIN_PASSWORD}")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.port),
           "--workers", str(args.workers), "--backend-store-uri", args.backend_store_uri,
           "--artifacts-destination", args.artifacts_destination]
    if args.allowed_hosts:
        cmd += ["--allowed-hosts", args.allowed_hosts]
    out = {k: v for k, v in env.items() if k not in (ADMIN_PASSWORD_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD")}
    out.setdefault(JOBS_ENV, "false")  # MLflow's GenAI job runner: 8 more processes crossalign never uses
    if not auth:
        return cmd, out
    auth_dir = (args.auth_dir or default_auth_dir()).expanduser().resolve()
    tree = git_work_tree(auth_dir)
    if tree is not None:
        raise ServerConfigError(f"--auth-dir {auth_dir} lies in the git work tree {tree}: the server's secrets "
                                "must live outside any repository (default: ~/.config/crossalign/mlflow-server)")
    auth_dir.mkdir(parents=True, exist_ok=True)
    auth_dir.chmod(0o700)
    database = args.auth_database_uri or f"sqlite:///{auth_dir / 'basic_auth.db'}"
    username = env.get(ADMIN_USER_ENV) or "admin"
    config = write_private(auth_dir / "basic_auth.ini", auth_config_text(
        database, username, args.default_permission, args.auth_cache_seconds))
    out |= {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            SECRET_KEY_ENV: _secret_key(auth_dir, env)}
    out.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)  # the config file's admin_username is the one
    return cmd + ["--app-name", "basic-auth"], out


def run(args: argparse.Namespace) -> int:
    """``crossalign mlflow-server``: prepare, then become ``mlflow server`` (exec: same pid, signals
    reach it). 2 with the reason on stderr when it refuses."""
    try:
        cmd, env = prepare(args, dict(os.environ))
    except ServerConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    auth = "basic-auth, admin user from the auth config" if "--app-name" in cmd else "no authentication (loopback)"
    print(f"MLflow tracking server on http://{args.host}:{args.port} ({auth})", file=sys.stderr, flush=True)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached
