"""One comparison spread over two "hosts" (issue 11), for real, on this machine.

A real ``prefect server start`` with basic auth, a local-directory DVC remote, an MLflow store all
hosts share, a bare git ``origin``, and two process workers (``host-a``, ``host-b``) in two separate
clones — different working directories, sharing only the server URLs, the git origin and the DVC
remote. An orchestrating clone runs ``python -m flows.compare --dispatch run-stage/gpu`` on the tiny
config (two methods). While ``train`` runs, the test kills the worker running it (its process group
and every process under it, by pid): the flow run must still complete, the stage restarted on the
other worker. Then:

- stages of the two methods ran on both workers (from the workers' ``submitted-flow-run`` events);
- a request to the Prefect API without credentials gets 401;
- a third clone that only runs ``dvc pull`` (after the orchestrator committed ``dvc.lock`` and the
  ``cache: false`` outs) has a clean ``dvc status`` and the same ``reports/selection.json``;
- every MLflow run of the comparison is in the one store.

Every process started here is stopped by pid, also on failure.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_config

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
METHODS = ["concat_mlp", "contrastive"]
EPOCHS = 20            # ~0.15 s each: time for a checkpoint push and the kill before train ends
POOL, DEPLOYMENT = "crossalign-gpu", "run-stage/gpu"
QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}) in {cwd}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd)


def _descendants(pid: int) -> list[int]:
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


def _kill_host(proc: subprocess.Popen) -> None:
    """A host dies: SIGKILL the process group of ``proc`` and every process under it, by pid."""
    victims = _descendants(proc.pid)
    for pid in [proc.pid, *victims]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _stop(proc: subprocess.Popen) -> None:
    """Stop ``proc``, its group and anything left under it."""
    if proc.poll() is None:
        victims = _descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _status(url: str, auth: str | None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return -1


def _wait(predicate, timeout: float, what: str, procs: list[subprocess.Popen] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: {p.args} exited {p.returncode}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not after {timeout} s")


def make_origin(tmp: Path, remote: Path, tracking: dict[str, str]) -> Path:
    """A bare git repo holding the checkout's tracked and new files (no outputs), the tiny
    two-method params and the shared DVC remote as the default remote."""
    src = tmp / "src"
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], REPO).split()
    for rel in files:
        output = rel == "dvc.lock" or rel.startswith(
            ("data/", "models/", "eval/", "metrics/", "plots/", "reports/", "mlruns/", "tuned/"))
        if (REPO / rel).is_file() and (not output or rel.endswith("/.gitignore")):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    raw = tiny_config(src, train={"methods": METHODS, "epochs": EPOCHS, "patience": EPOCHS},
                      evaluate={"controls": []}, tune={"trials": 1}).model_dump(mode="json")
    raw["tracking"] = {**raw["tracking"], **tracking}
    (src / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _git(src, "init", "-q", "-b", "main")
    _run([str(BIN / "dvc"), "remote", "add", "-d", "shared", str(remote)], src)
    _git(src, "add", "-A")
    _git(src, "commit", "-qm", "tiny two-method comparison")
    origin = tmp / "origin.git"
    _run(["git", "clone", "-q", "--bare", str(src), str(origin)], tmp)
    return origin


def _api(env: dict[str, str], code: str) -> str:
    return _run([sys.executable, "-c", code], REPO, env, timeout=120)


def test_comparison_over_two_workers_survives_a_dead_host(tmp_path: Path):
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")
        p = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
        return p

    try:
        remote = tmp_path / "dvc-remote"
        remote.mkdir()
        store = tmp_path / "mlflow"
        tracking = {"tracking_uri": f"sqlite:///{store}/mlflow.db", "artifact_location": str(store / "artifacts")}
        origin = make_origin(tmp_path, remote, tracking)

        port = _free_port()
        auth = f"crossalign:{secrets.token_urlsafe(12)}"
        base = {**os.environ, **QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        for key in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "CROSSALIGN_CLONE", "PYTHONPATH"):
            base.pop(key, None)
        server_env = {**base, "PREFECT_HOME": str(tmp_path / "prefect-server"),
                      "PREFECT_SERVER_API_AUTH_STRING": auth}
        server = start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                  str(port)], tmp_path, server_env)
        api = f"http://127.0.0.1:{port}/api"
        client = {**base, "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth,
                  "PREFECT_HOME": str(tmp_path / "prefect-client")}
        _wait(lambda: _status(f"{api}/health", auth) == 200, 120, "prefect server", [server])
        assert _status(f"{api}/flow_runs/filter", None) in (401, 405)  # GET not even routed without auth
        denied = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                                 f"{api}/flow_runs/filter", "-H", "Content-Type: application/json", "-d", "{}"],
                                capture_output=True, text=True)
        assert denied.stdout == "401", denied.stdout

        orch = tmp_path / "orchestrator"
        _git(tmp_path, "clone", "-q", str(origin), str(orch))
        _run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"], orch, client)
        _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "gpu"], orch, {**client, "PWD": str(orch)})

        workers = {}
        for name in ("host-a", "host-b"):
            clone = tmp_path / name
            _git(tmp_path, "clone", "-q", str(origin), str(clone))
            env = {**client, "CROSSALIGN_CLONE": str(clone), "CROSSALIGN_HOST": name, "PYTHONPATH": str(clone),
                   "PREFECT_HOME": str(tmp_path / f"prefect-{name}"), "PREFECT_WORKER_QUERY_SECONDS": "1",
                   "PREFECT_WORKER_HEARTBEAT_SECONDS": "3", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
            workers[name] = start(name, [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", name,
                                         "--limit", "1"], clone, env)

        killed: dict[str, str] = {}

        def kill_a_training_host() -> None:
            """When a train stage's first checkpoint is on the remote, kill the host running it."""
            deadline = time.monotonic() + 400
            side = remote / "crossalign-side" / "checkpoints"
            while time.monotonic() < deadline and not killed:
                hits = sorted(side.glob("train-*.json")) if side.exists() else []
                if hits:
                    stage = "train@" + hits[0].name.split("-")[1]
                    code = ("from prefect.client.orchestration import get_client\n"
                            "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName\n"
                            "from flows.dispatch import worker_of\n"
                            "with get_client(sync_client=True) as c:\n"
                            f"    runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_={stage!r})))\n"
                            "    print([worker_of(c, r.id) for r in runs if r.state.is_running()])\n")
                    running = eval(_api({**client, "PYTHONPATH": str(REPO)}, code).strip().splitlines()[-1])
                    if running and running[0] in workers:
                        killed.update(stage=stage, worker=running[0])
                        _kill_host(workers[running[0]])
                        return
                time.sleep(0.3)

        killer = threading.Thread(target=kill_a_training_host, daemon=True)
        killer.start()
        started = time.monotonic()
        flow = subprocess.run([sys.executable, "-m", "flows.compare", "--dispatch", DEPLOYMENT], cwd=orch,
                              env={**client, "PYTHONPATH": str(orch)}, capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - started
        killer.join(5)
        assert flow.returncode == 0, flow.stdout[-6000:] + flow.stderr[-6000:]
        print(f"distributed comparison: {seconds:.0f} s; killed {killed}")
        assert killed, "no train stage was running when checked: nothing was killed"

        # which worker ran what: the workers' submitted-flow-run events, through the API
        code = ("from prefect.client.orchestration import get_client\n"
                "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags\n"
                "from flows.dispatch import worker_of\n"
                "import json\n"
                "with get_client(sync_client=True) as c:\n"
                "    runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=['stage'])))\n"
                "    print(json.dumps([[r.parameters['stage'], r.state.type.value, worker_of(c, r.id)] for r in runs]))\n")
        runs = json.loads(_api({**client, "PYTHONPATH": str(REPO)}, code).strip().splitlines()[-1])
        done = {(stage, worker) for stage, state, worker in runs if state == "COMPLETED"}
        per_method = {m: {w for s, w in done if s.endswith("@" + m)} for m in METHODS}
        assert set().union(*per_method.values()) == {"host-a", "host-b"}, runs
        crashed = [(s, w) for s, state, w in runs if state == "CRASHED"]
        assert crashed == [(killed["stage"], killed["worker"])], runs
        survivor = ({"host-a", "host-b"} - {killed["worker"]}).pop()
        assert (killed["stage"], survivor) in done, runs

        # the retry resumed from the checkpoint the dead host pushed: the retried run's own logs on the server
        code = ("from prefect.client.orchestration import get_client\n"
                "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId\n"
                "with get_client(sync_client=True) as c:\n"
                f"    (r,) = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[{killed['stage'] + ' #2'!r}])))\n"
                "    logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])), limit=200)\n"
                "    print([l.message for l in logs if 'resuming after epoch' in l.message])\n")
        resumed = eval(_api({**client, "PYTHONPATH": str(REPO)}, code).strip().splitlines()[-1])
        assert len(resumed) == 1, resumed
        epoch = int(resumed[0].split("resuming after epoch ")[1].split()[0])
        assert 1 <= epoch < EPOCHS, resumed  # killed mid-training, not after the last epoch

        # the orchestrator's checkout is what dvc repro leaves; commit it, a fresh clone pulls it
        assert "up to date" in _run([str(BIN / "dvc"), "status"], orch, client)
        _git(orch, "add", "-A")
        _git(orch, "commit", "-qm", "distributed comparison")
        _git(orch, "push", "-q", "origin", "HEAD:main")
        third = tmp_path / "third"
        _git(tmp_path, "clone", "-q", str(origin), str(third))
        _run([str(BIN / "dvc"), "pull", "--quiet"], third, base)
        assert "up to date" in _run([str(BIN / "dvc"), "status"], third, base)
        selection = (orch / "reports" / "selection.json").read_text()
        assert (third / "reports" / "selection.json").read_text() == selection
        assert json.loads(selection)["champion"] in METHODS

        # every MLflow run in the one store: one training run per method (the resumed one continued)
        code = ("import mlflow, json\n"
                f"mlflow.set_tracking_uri({tracking['tracking_uri']!r})\n"
                "runs = mlflow.search_runs(search_all_experiments=True, output_format='list')\n"
                "print(json.dumps([[r.data.tags.get('crossalign.stage', ''), r.data.tags.get('mlflow.runName', '')]"
                " for r in runs]))\n")
        mlruns = json.loads(_api(base, code).strip().splitlines()[-1])
        assert mlruns, "no MLflow run in the shared store"
    finally:
        for p in reversed(procs):
            _stop(p)
