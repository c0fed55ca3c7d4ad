"""``compare-aligners``: crossalign's DAG, read from ``dvc.yaml``, as a Prefect 3 flow.

Each pipeline stage becomes one task run, submitted in dependency order with its upstream futures
as ``wait_for``; the ``foreach`` branches (``train@<m>``, ``evaluate@<m>``) run side by side, at most
``max_parallel`` commands at once, each pinned to its own GPU when there are several. A stage that
``dvc status`` reports up to date is skipped; a stage that ran is committed to ``dvc.lock``
(flows/dvc_dag.py), so ``dvc repro`` and this flow each find the other's work up to date.

Failure: a stage whose upstream failed does not run, except a stage that gathers several branches
of one ``foreach`` (``select``): it runs once every branch has finished, so that it can report
which branches are missing (and fail) rather than choose among the rest. The flow run then fails
with a message naming the failed stages and the last lines the gathering stage printed.

Distributed mode (``dispatch``: a deployment of the ``run-stage`` flow, flows/stage_run.py): each
stage runs as a flow run of that deployment on whichever worker (host, GPU) is free; flows/dispatch.py.

    python -m flows.compare [--methods a,b] [--dataset synthetic] [--epochs N] [--max-parallel N]
    python -m flows.compare --dispatch run-stage/gpu      # stages on the workers of run-stage/gpu's pool
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import chdir
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.states import Cancelled, Completed, State
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import allow_failure, quote

from flows import artifacts
from flows.dvc_dag import (DvcBookkeeper, SlotPool, StageNode, describe_status, gpu_ids, project_lock,
                           read_dag, run_commands, stage_env)
from crossalign.config import ConfigError
from flows.outcomes import PipelineFailed, StageFailed, failure_message, outcomes  # noqa: F401 (re-exported)
from flows.overrides import apply_overrides, overrides_from, validate_overrides

# Retry policy, by stage name: the data stage downloads (coco2017 / coco-karpathy), the one step
# that meets the network; every other stage is deterministic, and a retry would only repeat its error.
RETRIES: dict[str, dict[str, Any]] = {
    "data": {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=10),
             "retry_jitter_factor": 0.2},
}


@task(cache_policy=NO_CACHE, task_run_name="{name}")
def run_stage(name: str, node: StageNode, books: DvcBookkeeper, slots: SlotPool,
              branches: list[PrefectFuture] | None = None) -> dict[str, Any] | State:
    """Run one DVC stage unless DVC reports it up to date; commit it to ``dvc.lock`` when it ran.

    ``branches``: for a stage gathering ``foreach`` branches, their (finished) futures; it runs
    when at least one branch completed, to report the missing ones, and is cancelled otherwise.
    Returns ``{"stage", "outcome": "ran", "seconds", "gpu"}``, or, when it was up to date, a
    Completed state named "Skipped" holding the same row with ``"outcome": "skipped"``; raises
    :class:`StageFailed` with the command's last output lines when it fails.
    """
    log = get_run_logger()
    if branches is not None and not any(f.state.is_completed() for f in branches):
        return Cancelled(message=f"{name}: no upstream branch completed")
    status = books.status(node.target)
    if not status:
        log.info("%s is up to date (dvc status): skipped", name)
        return skipped_state({"stage": name, "outcome": "skipped", "seconds": 0.0, "gpu": None})
    log.info("%s: %s", name, describe_status(status))
    gpu = slots.acquire()
    try:
        books.prepare(node.target)
        log.info("%s: running%s", name, f" on GPU {gpu}" if gpu is not None else "")
        result = run_commands(node, stage_env(node, books.root, gpu), echo=log.info)
    finally:
        slots.release(gpu)
    if result.returncode != 0:
        raise StageFailed(f"stage {name} failed (exit {result.returncode}); last output:\n{result.tail}")
    books.commit(node.target)
    log.info("%s: done in %.1f s, committed to dvc.lock", name, result.seconds)
    return {"stage": name, "outcome": "ran", "seconds": round(result.seconds, 3), "gpu": gpu}


SKIPPED = "Skipped"  # the name of a Completed state whose stage DVC found up to date


def skipped_state(row: dict[str, Any]) -> State:
    """The final state of a stage that did not run because it was up to date: Completed (its
    dependents run), named "Skipped" and, in the flow-run graph, labelled "<stage> (up to date)",
    so that it does not look like a stage that ran."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is not None and ctx.task_run is not None:  # the engine reports the run's name with its final state
        ctx.task_run.name = f"{row['stage']} (up to date)"
    return Completed(data=row, name=SKIPPED, message=f"{row['stage']} is up to date (dvc status): not run")


def _task_for(node: StageNode):
    policy = RETRIES.get(node.name)
    return run_stage.with_options(**policy) if policy else run_stage


def _gathers_branches(node: StageNode, dag: dict[str, StageNode]) -> bool:
    """True for a stage that reads two or more branches of one ``foreach`` (select <- evaluate@*)."""
    groups = [dag[u].group for u in node.upstream if "@" in u]
    return any(groups.count(g) > 1 for g in set(groups))


def submit_dag(dag: dict[str, StageNode], books: DvcBookkeeper, slots: SlotPool) -> dict[str, PrefectFuture]:
    """Submit every stage with its upstream futures as ``wait_for`` (``dag`` is in dependency order)."""
    futures: dict[str, PrefectFuture] = {}
    for name, node in dag.items():
        upstream = [futures[u] for u in node.upstream]
        branches = None
        if _gathers_branches(node, dag):
            branches, upstream = quote(upstream), [allow_failure(f) for f in upstream]
        futures[name] = _task_for(node).submit(name, node, books, slots, branches, wait_for=upstream)
    return futures


def check_params(project: Path) -> None:
    """``crossalign check`` of ``<project>/params.yaml`` against the typed config and ``dvc.yaml``;
    raises :class:`crossalign.config.ConfigError` with every problem (and its "did you mean")."""
    from crossalign.cli import check_project

    _, problems, _ = check_project(project / "params.yaml", project / "dvc.yaml")
    if problems:
        raise ConfigError("\n".join(problems))


MAX_DISPATCH_RETRIES = 10


def check_flow_parameters(project: Path, max_parallel: Any, dispatch: Any, dispatch_retries: Any) -> None:
    """The flow parameters the typed config does not cover, checked before anything is written:
    ``root`` a DVC project, ``max_parallel`` >= 1, ``dispatch`` a ``<flow>/<deployment>`` name,
    ``dispatch_retries`` 0..:data:`MAX_DISPATCH_RETRIES`. Raises :class:`ConfigError` naming it.
    (``methods``, ``dataset``, ``epochs`` go through the typed config: flows/overrides.py.)"""
    if not (project / "dvc.yaml").is_file():
        raise ConfigError(f"root {str(project)!r}: no dvc.yaml there; the flow runs the DAG of a DVC project")
    if max_parallel is not None and (isinstance(max_parallel, bool) or not isinstance(max_parallel, int)
                                     or max_parallel < 1):
        raise ConfigError(f"max_parallel {max_parallel!r}: expected a whole number >= 1 (or none: one per GPU)")
    if dispatch is not None and (not isinstance(dispatch, str) or dispatch.count("/") != 1
                                 or not all(part.strip() for part in dispatch.split("/"))):
        raise ConfigError(f"dispatch {dispatch!r}: expected a deployment name <flow>/<deployment>, e.g. run-stage/gpu")
    if isinstance(dispatch_retries, bool) or not isinstance(dispatch_retries, int) \
            or not 0 <= dispatch_retries <= MAX_DISPATCH_RETRIES:
        raise ConfigError(f"dispatch_retries {dispatch_retries!r}: expected a whole number from 0 to "
                          f"{MAX_DISPATCH_RETRIES}")


def default_parallelism() -> int:
    """One stage at a time per CUDA GPU, at least one."""
    return max(1, len(gpu_ids()))


@flow(name="compare-aligners", log_prints=True)
def compare_aligners(root: str = ".", methods: list[str] | None = None, dataset: str | None = None,
                     epochs: int | None = None, max_parallel: int | None = None,
                     dispatch: str | None = None, dispatch_retries: int = 2) -> dict[str, Any]:
    """Train, evaluate and select crossalign's aligners: the DAG of ``<root>/dvc.yaml``.

    ``methods`` / ``dataset`` / ``epochs`` (``None``: as in params.yaml) are written into
    ``params.yaml`` first, so DVC sees them; ``max_parallel`` (``None``: the number of GPUs, at
    least 1) bounds the stage commands running at once. ``dispatch`` (``None``: run here) names the
    ``run-stage`` deployment that runs each stage on a worker; a stage whose host dies is started
    again up to ``dispatch_retries`` times. Returns the stage outcomes and the selection; raises
    :class:`PipelineFailed` when a stage failed.
    """
    log = get_run_logger()
    start = time.monotonic()
    project = Path(root).resolve()
    check_flow_parameters(project, max_parallel, dispatch, dispatch_retries)
    validate_overrides(project, overrides_from(methods, dataset, epochs))  # a bad parameter writes nothing, not even the lock
    from prefect.runtime import flow_run

    # one flow run per project at a time, from before params.yaml is written to the last commit:
    # a second run (a cron run firing during a triggered one) waits, then finds the work up to date
    with project_lock(project, who=f"flow run {flow_run.name or ''} {flow_run.id or ''}".strip(), on_wait=log.warning):
        return _compare_locked(project, start, methods, dataset, epochs, max_parallel, dispatch, dispatch_retries)


def _compare_locked(project: Path, start: float, methods: list[str] | None, dataset: str | None,
                    epochs: int | None, max_parallel: int | None, dispatch: str | None,
                    dispatch_retries: int) -> dict[str, Any]:
    """The body of :func:`compare_aligners`, run while it holds the project's flow lock."""
    log = get_run_logger()
    cfg = apply_overrides(project, overrides_from(methods, dataset, epochs))
    check_params(project)  # before any stage: DVC removes outputs before it notices a missing param
    parallel = max_parallel if max_parallel is not None else default_parallelism()
    gpus = gpu_ids()
    slots = SlotPool(parallel, gpus)
    effective = {"root": str(project), "methods": cfg.train.methods, "dataset": cfg.data.dataset,
                 "epochs": cfg.train.epochs, "max_parallel": parallel, "gpus": gpus}
    log.info("effective parameters: %s", effective)
    dag = read_dag(project)
    log.info("DAG from dvc.yaml: %s", " -> ".join(dag))
    books = DvcBookkeeper(project)
    from crossalign.tracking import runs as tracking  # mlflow is heavy: imported only when the flow runs

    tracking.setup(cfg, project)  # the MLflow store, once, before branches race to create it
    if dispatch:
        rows = _run_dispatched(project, dag, dispatch, dispatch_retries, effective)
    else:
        with chdir(project):  # as `dvc repro` in the project root: DVC resolves paths against the cwd
            rows = outcomes(submit_dag(dag, books, slots))
    message = failure_message(rows)
    selection = artifacts.publish(project, rows, effective, message, time.monotonic() - start)
    if message:
        raise PipelineFailed(message)
    return {"stages": rows, "selection": selection, "parameters": effective}


def _run_dispatched(project: Path, dag: dict[str, StageNode], deployment: str, retries: int,
                    effective: dict[str, Any]) -> list[dict[str, Any]]:
    """The stages as flow runs of ``deployment`` (flows/dispatch.py); then dvc.lock and the outs here."""
    from flows import dispatch

    commit = dispatch.dispatch_commit(project, dag)
    effective.update({"dispatch": deployment, "commit": commit})
    get_run_logger().info("dispatching the stages of commit %s to %s", commit[:12], deployment)
    rows, results = dispatch.dispatched_rows(dispatch.submit_dispatched(
        dag, deployment, commit, (project / "params.yaml").read_text(), retries, RETRIES))
    dispatch.gather(project, dag, results)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run crossalign's DVC DAG as the Prefect flow compare-aligners.")
    parser.add_argument("--root", default=".", help="DVC project (default: .)")
    parser.add_argument("--methods", help="comma-separated methods (default: params.yaml train.methods)")
    parser.add_argument("--dataset", help="data.dataset (default: params.yaml)")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: params.yaml)")
    parser.add_argument("--max-parallel", type=int, help="stage commands at once (default: GPUs, >= 1)")
    parser.add_argument("--dispatch", metavar="DEPLOYMENT",
                        help="run each stage as a flow run of this run-stage deployment (e.g. run-stage/gpu) "
                             "on its work pool's workers, instead of here")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:  # bad parameters: one clear message and exit 2, before Prefect starts a flow run
        check_flow_parameters(Path(args.root).resolve(), args.max_parallel, args.dispatch, 2)
        validate_overrides(Path(args.root), overrides_from(methods, args.dataset, args.epochs))
        check_params(Path(args.root).resolve())
    except ConfigError as err:  # one line: the file, then each problem after a semicolon
        print("error: " + "; ".join(line.strip() for line in str(err).splitlines() if line.strip()), file=sys.stderr)
        return 2
    state = compare_aligners(root=args.root, methods=methods, dataset=args.dataset, epochs=args.epochs,
                             max_parallel=args.max_parallel, dispatch=args.dispatch, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    raise SystemExit(main())
