"""The distributed mode of ``compare-aligners`` (``--dispatch <deployment>``): every stage is a flow
run of the ``run-stage`` deployment (flows/stage_run.py), picked up by whichever worker of its work
pool has a free slot — one worker per GPU, on any host.

The orchestrator holds no data: it sends each stage run the commit, ``params.yaml`` and the
``dvc.lock`` entries of its upstream stages (plus their ``cache: false`` outs, by side-store
manifest), and collects the entry each run hands back. At the end it writes ``dvc.lock`` once,
fetches the ``cache: false`` outs and ``dvc pull``s, so its checkout is what ``dvc repro`` would
have left (``dvc status`` clean).

A dead host: a stage run whose worker stops heartbeating (``last_heartbeat_time`` older than
:data:`MISSED_HEARTBEATS` worker heartbeat intervals, or marked OFFLINE by the server), or whose flow
run ends Crashed (e.g. by Prefect's zombie-flow automation on flow-run heartbeats), is marked Crashed
and started again, on another worker; ``train`` resumes there from its last pushed checkpoint.
"""
from __future__ import annotations

import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.states import Crashed

from flows.outcomes import unfinished_row
from flows.dvc_dag import StageNode
from flows.side_store import SideStore
from flows.stage_run import parse_result, read_lock, result_key, write_lock

MISSED_HEARTBEATS = 3        # as Prefect's server marks a worker OFFLINE (foreman inactivity multiple)
POLL_SECONDS = 1.0
SUBMITTED = "prefect.worker.submitted-flow-run"


class DispatchError(RuntimeError):
    """The checkout cannot be dispatched, or a stage run failed; the message says which and why."""


def _git(project: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DispatchError(f"git {' '.join(args)} failed in {project}: {proc.stderr.strip()}")
    return proc.stdout


def dispatch_commit(project: Path, dag: dict[str, StageNode]) -> str:
    """The commit stage runs check out: ``HEAD``, which must be on ``origin`` (workers fetch it)
    and whose tracked files may differ from the checkout only in ``params.yaml`` (sent along),
    ``dvc.lock`` and stage outs. Raises :class:`DispatchError` naming what is wrong."""
    commit = _git(project, "rev-parse", "HEAD").strip()
    _git(project, "fetch", "--quiet", "origin")
    if not _git(project, "branch", "-r", "--contains", commit).strip():
        raise DispatchError(f"commit {commit[:12]} of {project} is not on origin: `git push` it first, "
                            "the workers check it out from there")
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        outs = [Path(o.fs_path).relative_to(project).as_posix() for s in repo.index.stages for o in s.outs]
    dirty = [line[3:] for line in _git(project, "status", "--porcelain", "--untracked-files=no").splitlines()]
    code = [p for p in dirty if p not in ("params.yaml", "dvc.lock")
            and not any(p == o or p.startswith(o.rstrip("/") + "/") for o in outs)]
    if code:
        raise DispatchError(f"{project}: uncommitted changes to {', '.join(sorted(code))}: workers run the "
                            f"code of commit {commit[:12]}; commit and push them first")
    return commit


def worker_of(client, run_id) -> str | None:
    """The name of the worker that took flow run ``run_id``, from its ``submitted-flow-run`` event."""
    page = client.read_events(filter=EventFilter(event=EventNameFilter(name=[SUBMITTED]),
                                                 related=EventRelatedFilter(id=[f"prefect.flow-run.{run_id}"])),
                              limit=50)  # the server's maximum page
    names = [e.resource.get("prefect.resource.name") for e in page.events]
    return names[0] if names else None


def worker_dead(client, pool: str, name: str, now: datetime | None = None) -> bool:
    """Whether worker ``name`` of ``pool`` stopped heartbeating (or the server marked it OFFLINE)."""
    now = now or datetime.now(timezone.utc)
    for w in client.read_workers_for_work_pool(pool):
        if w.name == name:
            interval = w.heartbeat_interval_seconds or 30
            stale = w.last_heartbeat_time is not None and \
                (now - w.last_heartbeat_time).total_seconds() > MISSED_HEARTBEATS * interval
            return stale or str(getattr(w.status, "value", w.status)).upper() == "OFFLINE"
    return False


def await_run(run_id, pool: str, log: Callable[[str], None], poll: float = POLL_SECONDS):
    """Wait for flow run ``run_id`` to end; a run whose worker died is set Crashed. Returns
    ``(state, worker name)``."""
    with get_client(sync_client=True) as client:
        worker = None
        while True:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                return state, worker or worker_of(client, run_id)
            worker = worker or worker_of(client, run_id)
            if worker is not None and worker_dead(client, pool, worker):
                message = f"worker {worker} stopped heartbeating: its host is presumed dead"
                log(message)
                client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                return client.read_flow_run(run_id).state, worker
            time.sleep(poll)


def read_result(run_id, stage: str) -> dict[str, Any]:
    """The result a completed stage run left as its artifact."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[result_key(stage)])))
    if not found:
        raise DispatchError(f"stage run {run_id} of {stage} completed without its {result_key(stage)} artifact")
    return parse_result(found[0].data)


@task(cache_policy=NO_CACHE, task_run_name="{name}")
def dispatch_stage(name: str, deployment: str, commit: str, params_yaml: str,
                   upstream_results: list[dict[str, Any]], retries: int) -> dict[str, Any]:
    """Run stage ``name`` as a flow run of ``deployment``; start it again (up to ``retries`` times)
    when its host dies. Returns the stage run's result plus ``worker`` and ``attempts``."""
    log = get_run_logger()
    upstream = {r["stage"]: r["lock"] for r in upstream_results}
    side = {rel: md5 for r in upstream_results for rel, md5 in r["side"].items()}
    start = time.monotonic()
    comparison = flow_run.get_id()  # the orchestrating compare-aligners run: MLflow runs are tagged with it
    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(deployment).work_pool_name
    for attempt in range(1, retries + 2):
        run = run_deployment(deployment, parameters={"stage": name, "commit": commit, "params_yaml": params_yaml,
                                                     "upstream": upstream, "side": side,
                                                     "comparison": comparison},
                             flow_run_name=f"{name} #{attempt}", timeout=0, tags=["crossalign", "stage"])
        log.info("%s: flow run %s (attempt %d)", name, run.id, attempt)
        state, worker = await_run(run.id, pool, log.warning)
        if state.is_completed():
            result = read_result(run.id, name)
            log.info("%s: %s on worker %s", name, result["outcome"], worker)
            return {**result, "worker": worker, "attempts": attempt, "seconds": round(time.monotonic() - start, 3)}
        if not state.is_crashed():
            raise DispatchError(f"stage {name} failed on worker {worker} ({state.name}): {state.message}")
        log.warning("%s: run %s on %s crashed (%s); starting it again", name, run.id, worker, state.message)
    raise DispatchError(f"stage {name}: {retries + 1} attempts crashed")


def submit_dispatched(dag: dict[str, StageNode], deployment: str, commit: str, params_yaml: str,
                      retries: int, policies: dict[str, dict[str, Any]] | None = None) -> dict[str, PrefectFuture]:
    """Submit every stage as a :func:`dispatch_stage` task, upstream results as its inputs.
    ``policies``: task retry options by stage name (the ``data`` download's, as on one host); a
    stage whose upstream failed does not run."""
    futures: dict[str, PrefectFuture] = {}
    for name, node in dag.items():
        ups = [futures[u] for u in node.upstream]
        policy = (policies or {}).get(node.name)
        run = dispatch_stage.with_options(**policy) if policy else dispatch_stage
        futures[name] = run.submit(name, deployment, commit, params_yaml, ups, retries)
    return futures


def dispatched_rows(futures: dict[str, PrefectFuture]) -> tuple[list[dict[str, Any]], dict[str, dict]]:
    """Stage outcome rows (as flows/compare.py's) and the results of the stages that completed."""
    wait(list(futures.values()))
    rows, results = [], {}
    for name, fut in futures.items():
        if fut.state.is_completed():
            r = fut.result()
            results[name] = r
            rows.append({"stage": name, "outcome": r["outcome"], "seconds": r["seconds"], "gpu": None,
                         "worker": r["worker"], "message": ""})
        else:
            rows.append({**unfinished_row(name, fut), "worker": None})
    return rows, results


def gather(project: Path, dag: dict[str, StageNode], results: dict[str, dict[str, Any]]) -> None:
    """Write ``dvc.lock`` once (the entries the stage runs handed back, in DAG order), put their
    ``cache: false`` outs in place and ``dvc pull`` the rest: the checkout ``dvc repro`` leaves."""
    import sys

    old = read_lock(project)
    entries = {name: results[name]["lock"] if name in results else old[name]
               for name in dag if name in results or name in old}
    write_lock(project, entries)
    store = SideStore(project)
    for r in results.values():
        store.get(r["side"], project)
    if not results:
        return
    dvc = str(Path(sys.executable).parent / "dvc")
    proc = subprocess.run([dvc, "pull", "--force", *results], cwd=project, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DispatchError(f"dvc pull in {project} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
