"""One comparison spread over two "hosts", for real, on this machine.

A real ``prefect server start`` with basic auth, a real ``mlflow server`` with MLflow's basic-auth
app (tests/servers.py), a local-directory DVC remote, a bare git ``origin``, and two process
workers (``host-a``, ``host-b``) in two separate clones — different working directories, sharing
only the server URLs, the git origin and the DVC remote. An orchestrating clone runs
``python -m flows.compare --dispatch run-stage/gpu`` on the tiny config (two methods). A training
process is frozen (SIGSTOP) after its first checkpoint; once the checkpoint is on the remote the
test kills that worker (its process group and every process under it, by pid): the flow run must
still complete, the stage restarted on the other worker and resumed after the frozen epoch. Then:

- stages of the two methods ran on different workers (the workers' ``submitted-flow-run`` events);
- a request to the Prefect API without credentials gets 401;
- a third clone that only runs ``dvc pull`` (after the orchestrator committed ``dvc.lock`` and the
  ``cache: false`` outs) has a clean ``dvc status`` and the same ``reports/selection.json``;
- every MLflow run of the comparison is in the one server, tagged with the comparison's flow run
  and the host; the killed training is one run, resumed on the other host.

Every process started here is stopped by pid, also on failure. The fast tests at the end check
the pieces without servers: pull targets, the result artifact, the side store, the checkpoint
pusher's snapshots, dead-worker detection and the orchestrator's refusal of unpushed commits.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_config
from servers import descendants, free_port, http_status, mlflow_server, stop, wait_until


BIN = Path(sys.executable).parent
METHODS = ["concat_mlp", "contrastive"]
EPOCHS = 6             # the training of the killed host is frozen (SIGSTOP) after its first checkpoint
POOL, DEPLOYMENT = "crossalign-gpu", "run-stage/gpu"
QUIET = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}) in {cwd}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd)


def _pushed_state(remote: Path, manifest: Path) -> bytes | None:
    """The ``state.json`` of the checkpoint a side-store manifest names (``None``: not readable yet)."""
    try:
        md5 = next(v for k, v in json.loads(manifest.read_text()).items() if k.endswith("/state.json"))
        return (remote / "crossalign-side" / "blobs" / md5[:2] / md5[2:]).read_bytes()
    except (OSError, ValueError, StopIteration):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _kill_host(proc: subprocess.Popen) -> None:
    """A host dies: SIGKILL the process group of ``proc`` and every process under it, by pid."""
    victims = descendants(proc.pid)
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
                      evaluate={"controls": []}, tune={"trials": 0}).model_dump(mode="json")
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


@pytest.mark.slow
def test_comparison_over_two_workers_survives_a_dead_host(tmp_path: Path):
    procs: list[subprocess.Popen] = []
    servers = contextlib.ExitStack()
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
        mlflow_srv = servers.enter_context(mlflow_server(tmp_path / "mlflow"))
        origin = make_origin(tmp_path, remote, {"tracking_uri": mlflow_srv.url})

        port = free_port()
        auth = f"crossalign:{secrets.token_urlsafe(12)}"
        base = {**os.environ, **QUIET, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        for key in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "CROSSALIGN_CLONE", "PYTHONPATH"):
            base.pop(key, None)
        server_env = {**base, "PREFECT_HOME": str(tmp_path / "prefect-server"),
                      "PREFECT_SERVER_API_AUTH_STRING": auth}
        server = start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                  str(port)], tmp_path, server_env)
        api = f"http://127.0.0.1:{port}/api"
        client = {**base, **mlflow_srv.client_env(), "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth,
                  "PREFECT_HOME": str(tmp_path / "prefect-client")}
        wait_until(lambda: http_status(f"{api}/health", tuple(auth.split(":", 1))) == 200, 120, "prefect server", server)
        assert http_status(f"{api}/flow_runs/filter") in (401, 405)  # GET not even routed without auth
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
            """A host dies mid-train: as soon as a training process has written its first checkpoint,
            freeze it (SIGSTOP); once the other worker has run a stage of the other method and the
            frozen checkpoint is on the remote, kill the host."""
            seen: set[tuple[str, str]] = set()  # (worker, method) of every stage command seen running
            frozen: tuple[str, str, int, bytes] | None = None  # worker, method, pid, state.json

            def scan() -> None:
                nonlocal frozen
                for name, worker in workers.items():
                    for pid in descendants(worker.pid):
                        argv = _cmdline(pid)
                        if "--method" not in argv or not any(a.startswith("tasks.") for a in argv):
                            continue
                        method = argv[argv.index("--method") + 1]
                        seen.add((name, method))
                        state = tmp_path / name / "models" / method / "checkpoints" / "seed-0" / "state.json"
                        if frozen is None and "tasks.train" in argv and state.exists():
                            os.kill(pid, signal.SIGSTOP)
                            frozen = (name, method, pid, state.read_bytes())

            deadline = time.monotonic() + 500
            while time.monotonic() < deadline:
                scan()
                if frozen and any(w != frozen[0] and m != frozen[1] for w, m in seen):
                    break
                time.sleep(0.1)
            if frozen is None:
                return
            name, method, _, state = frozen
            pushed = remote / "crossalign-side" / "checkpoints"
            try:  # killed even when the push never comes: a frozen host would hang the run
                wait_until(lambda: any(_pushed_state(remote, m) == state for m in pushed.glob(f"train-{method}-*.json")),
                      60, "the frozen checkpoint on the remote")
            finally:
                killed.update(stage=f"train@{method}", worker=name, epoch=json.loads(state)["epoch"], seen=seen)
                _kill_host(workers[name])

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
        per_method = {m: {w for s, _, w in runs if s.endswith("@" + m)} for m in METHODS}  # any final state
        first, second = (per_method[m] for m in METHODS)
        assert any(w1 != w2 for w1 in first for w2 in second), (per_method, runs)  # two methods, two workers
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
        assert epoch == killed["epoch"] and 1 <= epoch < EPOCHS, (resumed, killed)  # the last pushed epoch

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

        # every MLflow run in the one server, tagged with the comparison and its host
        code = ("import json\nfrom prefect.client.orchestration import get_client\n"
                "from prefect.client.schemas.filters import FlowRunFilter, FlowFilter, FlowFilterName\n"
                "with get_client(sync_client=True) as c:\n"
                "    (r,) = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=['compare-aligners'])))\n"
                "print(r.id)\n")
        comparison = _api(client, code).strip().splitlines()[-1]
        code = ("import json\nfrom mlflow import MlflowClient\n"
                f"c = MlflowClient({mlflow_srv.url!r})\n"
                "ids = [e.experiment_id for e in c.search_experiments()]\n"
                "print(json.dumps([[r.info.status, r.data.tags] for r in c.search_runs(ids, max_results=1000)]))\n")
        mlruns = json.loads(_api(client, code).strip().splitlines()[-1])
        assert mlruns and all(tags.get("crossalign.flow_run_id") == comparison for _, tags in mlruns), mlruns
        assert {tags.get("crossalign.host") for _, tags in mlruns} <= {"host-a", "host-b"}, mlruns
        training = {m: [(st, tags) for st, tags in mlruns if tags.get("crossalign.method") == m
                        and "crossalign.fingerprint" in tags] for m in METHODS}
        assert all(len(runs) == 1 and runs[0][0] == "FINISHED" for runs in training.values()), training
        (resumed_status, resumed_tags), = training[killed["stage"].split("@")[1]]
        assert resumed_tags["crossalign.resumed_from_host"] == killed["worker"], resumed_tags  # both hosts logged
        assert resumed_tags["crossalign.host"] == survivor, resumed_tags
    finally:
        for p in reversed(procs):
            stop(p, grace=15)
        servers.close()


# ------------------------------------------------------------------ the pieces, without servers
def test_pull_targets_are_the_parts_of_upstream_outs_a_stage_reads():
    from flows.stage_run import pull_targets

    upstream = ["data/features", "eval/test_index.json", "models/a/final", "models/a/checkpoints", "eval/a"]
    # a dep inside an out: only that part; a dep on a parent directory: every out under it
    assert pull_targets(["data/features/train", "tuned/a.json", "tasks/train.py"], upstream) == ["data/features/train"]
    assert pull_targets(["models", "eval", "data/features/test"], upstream) == [
        "data/features/test", "eval/a", "eval/test_index.json", "models/a/checkpoints", "models/a/final"]
    assert pull_targets(["data/featuresX"], upstream) == []  # a name prefix is not a parent


def test_a_lock_entry_keeps_dvcs_exponent_floats_through_a_worker(tmp_path: Path):
    """DVC writes a small float param as ``5e-05``; a worker reads its dvc.lock, hands the entry back
    in its result artifact, and the orchestrator writes it: the value stays the float params.yaml
    holds, so `dvc status` is up to date (a YAML 1.1 read made it the string '5e-05')."""
    from dvc.utils.serialize import dump_yaml

    from flows.stage_run import parse_result, read_lock, result_markdown, write_lock

    entry = {"cmd": "c", "params": {"params.yaml": {"train.text_layers_lr": 5e-05, "train.lr": 0.001}}}
    dump_yaml(tmp_path / "dvc.lock", {"schema": "2.0", "stages": {"train@a": entry}})
    assert "train.text_layers_lr: 5e-05" in (tmp_path / "dvc.lock").read_text()  # DVC's own spelling
    read = read_lock(tmp_path)["train@a"]
    assert read == entry and isinstance(read["params"]["params.yaml"]["train.text_layers_lr"], float)
    back = parse_result(result_markdown({"stage": "train@a", "outcome": "ran", "host": "h", "flow_run_id": "f",
                                         "lock": read, "side": {}}))["lock"]
    (tmp_path / "orchestrator").mkdir()
    write_lock(tmp_path / "orchestrator", {"train@a": back})
    assert read_lock(tmp_path / "orchestrator")["train@a"] == entry


def test_result_artifact_round_trips_a_lock_entry():
    from flows.stage_run import parse_result, result_key, result_markdown

    entry = {"cmd": "sh tasks/python -m tasks.train --method a", "deps": [{"path": "x", "md5": "0" * 32}],
             "params": {"params.yaml": {"train.epochs": 2, "tracking": {"tracking_uri": "http://h:5000"}}},
             "outs": [{"path": "models/a/final", "md5": "1" * 32 + ".dir", "size": 10, "nfiles": 2}]}
    result = {"stage": "train@a", "outcome": "ran", "host": "h", "flow_run_id": "f", "lock": entry,
              "side": {"plots/train/a.csv": "2" * 32}}
    markdown = result_markdown(result)
    assert markdown.startswith("# train@a: ran on h\n")
    assert parse_result(markdown) == result
    assert result_key("evaluate_control@contrastive+cross_attention") == \
        "crossalign-stage-evaluate-control-contrastive-cross-attention"
    with pytest.raises(ValueError, match="no ```yaml block"):
        parse_result("# nothing here")


def _dvc_project(root: Path, remote: Path) -> Path:
    root.mkdir(parents=True)
    _run(["git", "init", "-q", "-b", "main"], root)
    _run([str(BIN / "dvc"), "init", "-q"], root)
    _run([str(BIN / "dvc"), "remote", "add", "-d", "shared", str(remote)], root)
    return root


def test_side_store_carries_files_by_content_and_checkpoints_by_manifest(tmp_path: Path):
    import hashlib

    from flows.side_store import SideStore

    remote = tmp_path / "remote"
    a = _dvc_project(tmp_path / "a", remote)
    (a / "reports").mkdir()
    (a / "reports" / "r.md").write_text("report")
    (a / "metrics.json").write_text("{}")
    manifest = SideStore(a).put(["reports/r.md", "metrics.json"])
    assert manifest == {"reports/r.md": hashlib.md5(b"report").hexdigest(), "metrics.json": hashlib.md5(b"{}").hexdigest()}
    md5 = manifest["reports/r.md"]
    assert (remote / "crossalign-side" / "blobs" / md5[:2] / md5[2:]).read_text() == "report"
    b = _dvc_project(tmp_path / "b", remote)
    (b / "metrics.json").write_text("stale")
    store_b = SideStore(b)
    store_b.get(manifest)
    assert (b / "reports" / "r.md").read_text() == "report" and (b / "metrics.json").read_text() == "{}"
    assert store_b.get_checkpoint("k") is None
    SideStore(a).put_checkpoint("k", manifest)
    assert store_b.get_checkpoint("k") == manifest
    (remote / "crossalign-side" / "blobs" / md5[:2] / md5[2:]).write_text("corrupt")
    with pytest.raises(OSError, match="does not match"):
        store_b.get({"reports/r.md": md5})
    assert (b / "reports" / "r.md").read_text() == "report"  # untouched on error


def test_checkpoint_pusher_pushes_whole_checkpoints_only_when_they_change(tmp_path: Path):
    from crossalign.io import atomic_dir
    from flows.side_store import SideStore
    from flows.stage_run import CheckpointPusher

    root = _dvc_project(tmp_path / "p", tmp_path / "remote")
    ckpt = root / "models" / "a" / "checkpoints"

    def save(epoch: int) -> None:  # as crossalign.train.checkpoint does: a whole directory replaced
        with atomic_dir(ckpt / "seed-0") as tmp:
            (Path(tmp) / "state.json").write_text(json.dumps({"epoch": epoch}))
            (Path(tmp) / "model.safetensors").write_bytes(bytes([epoch]) * 64)

    store = SideStore(root)
    pusher = CheckpointPusher(store, "train-a-k", root, ["models/a/checkpoints"], every=60)
    assert pusher.push_once() is False and store.get_checkpoint("train-a-k") is None  # nothing yet
    save(1)
    assert pusher.push_once() is True
    assert pusher.push_once() is False  # unchanged: not hashed or pushed again
    save(2)
    assert pusher.push_once() is True and pusher.count == 2
    other = _dvc_project(tmp_path / "q", tmp_path / "remote")
    SideStore(other).get(SideStore(other).get_checkpoint("train-a-k"), other)
    restored = other / "models" / "a" / "checkpoints" / "seed-0"
    assert json.loads((restored / "state.json").read_text()) == {"epoch": 2}
    assert (restored / "model.safetensors").read_bytes() == bytes([2]) * 64
    half = ckpt / ".seed-0.tmp-0000abcd"  # a checkpoint being written when the snapshot is taken
    half.mkdir()
    (half / "state.json").write_text("{")
    save(3)
    half.mkdir(exist_ok=True)
    (half / "state.json").write_text("{")
    assert pusher.push_once() is True
    assert sorted(store.get_checkpoint("train-a-k")) == ["models/a/checkpoints/seed-0/model.safetensors",
                                                         "models/a/checkpoints/seed-0/state.json"]


def test_leftovers_of_a_killed_stage_beside_outs_are_removed(tmp_path: Path):
    from flows.stage_run import remove_stale_tmp

    (tmp_path / "models" / "a" / ".final.tmp-1234abcd" / "seed-0").mkdir(parents=True)
    (tmp_path / "models" / "a" / "final").mkdir()
    (tmp_path / "models" / "a" / ".keep").write_text("")
    (tmp_path / "reports").mkdir()
    (tmp_path / ".reports.tmp-99").write_text("half")
    assert sorted(remove_stale_tmp(tmp_path, ["models/a/final", "reports", "missing/x"])) == [
        ".reports.tmp-99", "models/a/.final.tmp-1234abcd"]
    assert sorted(p.name for p in (tmp_path / "models" / "a").iterdir()) == [".keep", "final"]


def test_a_worker_is_dead_after_three_missed_heartbeats_or_offline():
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from flows.dispatch import worker_dead

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)

    class Client:
        def __init__(self, **worker):
            self.worker = SimpleNamespace(name="host-a", heartbeat_interval_seconds=3, status="ONLINE", **worker)

        def read_workers_for_work_pool(self, pool):
            return [self.worker]

    assert not worker_dead(Client(last_heartbeat_time=now - timedelta(seconds=8)), "p", "host-a", now)
    assert worker_dead(Client(last_heartbeat_time=now - timedelta(seconds=10)), "p", "host-a", now)
    offline = Client(last_heartbeat_time=now)
    offline.worker.status = "OFFLINE"
    assert worker_dead(offline, "p", "host-a", now)
    assert not worker_dead(Client(last_heartbeat_time=now), "p", "host-b", now)  # unknown: not judged


def test_dispatch_refuses_an_unpushed_commit_and_uncommitted_code(tmp_path: Path):
    from flows_toy import make_toy_project

    from flows.dispatch import DispatchError, dispatch_commit
    from flows.dvc_dag import read_dag

    src = make_toy_project(tmp_path / "src")
    shutil.rmtree(src / ".dvc")
    _git(src, "init", "-q", "-b", "main")
    _run([str(BIN / "dvc"), "init", "-q"], src)
    _git(src, "add", "-A")
    _git(src, "commit", "-qm", "toy")
    _run(["git", "clone", "-q", "--bare", str(src), str(tmp_path / "origin.git")], tmp_path)
    _git(tmp_path, "clone", "-q", str(tmp_path / "origin.git"), str(tmp_path / "clone"))
    clone = tmp_path / "clone"
    dag = read_dag(clone)
    head = _git(clone, "rev-parse", "HEAD").strip()
    assert dispatch_commit(clone, dag) == head
    (clone / "params.yaml").write_text((clone / "params.yaml").read_text() + "\n")  # sent along: allowed
    assert dispatch_commit(clone, dag) == head
    (clone / "toy.py").write_text("# changed\n")
    with pytest.raises(DispatchError, match="uncommitted changes to toy.py"):
        dispatch_commit(clone, dag)
    _git(clone, "commit", "-qam", "local only")
    with pytest.raises(DispatchError, match="is not on origin"):
        dispatch_commit(clone, dag)
