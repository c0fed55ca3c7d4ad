"""The DVC side of the Prefect flow: read the DAG from ``dvc.yaml``, ask DVC whether a stage is up
to date, run a stage's command, and record the result in ``dvc.lock`` — without Prefect.

Why not ``dvc repro <stage>`` per task: DVC takes one repo-wide lock for the whole of ``repro``, so
two stages reproduced at once collide. Instead a stage's ``cmd`` runs in a plain subprocess (as
many at once as the flow allows) and only the bookkeeping — ``status``, removing stale outputs,
``commit`` — goes through DVC, one call at a time under :class:`DvcBookkeeper`'s lock in the flow
process. DVC itself releases its lock while a command runs (``dvc.stage.run.run_stage``); this is the
same split, with the commands side by side. The ``dvc.lock`` written is the one ``dvc repro``
writes, so either front end finds the other's work up to date.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import chdir, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dvc.repo import Repo


@dataclass(frozen=True)
class StageNode:
    """One pipeline stage of ``dvc.yaml`` as the flow needs it."""

    name: str                    # stage name, e.g. "train@contrastive" ("sub/dvc.yaml:x" outside the root file)
    target: str                  # absolute DVC address ("/abs/dvc.yaml:train@contrastive"), cwd-independent
    cmds: tuple[str, ...]        # shell commands, run in order
    wdir: Path                   # working directory of the commands
    upstream: tuple[str, ...]    # stages whose outputs this one reads

    @property
    def group(self) -> str:
        """The ``foreach`` stage this one was generated from (``train`` for ``train@joint``)."""
        return self.name.split("@", 1)[0]


def read_dag(root: str | Path) -> dict[str, StageNode]:
    """Pipeline stages of ``<root>/dvc.yaml`` in dependency order (upstream first).

    The order and the edges come from DVC's own stage graph (``Repo.index.graph``: an edge runs
    from a stage to the stage that produces one of its dependencies), with ``foreach`` expanded
    against the current ``params.yaml``. Data sources (``.dvc`` files) have no command and are left
    out. Raises ``ValueError`` naming the file when there is no pipeline.
    """
    import networkx as nx

    root = Path(root).resolve()
    if not (root / "dvc.yaml").exists():
        raise ValueError(f"{root / 'dvc.yaml'}: no such file; the flow runs the DAG of a DVC project")
    with Repo(str(root)) as repo:
        graph = repo.index.graph
        with_cmd = {s for s in graph.nodes if getattr(s, "cmd", None)}
        order = [s for s in reversed(list(nx.topological_sort(graph))) if s in with_cmd]
        dag = {}
        for stage in order:
            cmds = stage.cmd if isinstance(stage.cmd, list) else stage.cmd.splitlines()
            upstream = sorted(_name(s, root) for s in graph.successors(stage) if s in with_cmd)
            dag[_name(stage, root)] = StageNode(_name(stage, root), f"{stage.dvcfile.path}:{stage.name}",
                                                tuple(c for c in cmds if c.strip()), Path(stage.wdir),
                                                tuple(upstream))
    if not dag:
        raise ValueError(f"{root / 'dvc.yaml'}: no stage with a cmd")
    return dag


def _name(stage, root: Path) -> str:
    """A stage's name relative to the project root, as ``dvc repro`` run there prints it."""
    dvcfile = Path(stage.dvcfile.path)
    return stage.name if dvcfile == root / "dvc.yaml" else f"{dvcfile.relative_to(root)}:{stage.name}"


class DvcBookkeeper:
    """Every DVC call the flow makes, one at a time (a fresh ``Repo`` per call, under one lock).

    Thread-safe: Prefect runs stage tasks in threads; stage commands run concurrently outside the
    lock (with absolute working directories), only these short calls are serialised, so DVC's
    repo-wide lock never sees two callers.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self._lock = threading.Lock()

    @contextmanager
    def _dvc(self) -> Iterator[Repo]:
        """The lock, the project root as cwd (DVC resolves stage paths, status keys and run-cache
        entries against the cwd, as its CLI does) and a fresh ``Repo``."""
        with self._lock, chdir(self.root), Repo(str(self.root)) as repo:
            yield repo

    def status(self, target: str | None = None) -> dict:
        """``dvc status [target]`` as a dict (``target``: a :attr:`StageNode.target`); empty when up
        to date."""
        with self._dvc() as repo:
            return repo.status(targets=[target] if target else None)

    def prepare(self, target: str) -> None:
        """Remove the stage's non-persistent outputs before it runs, as ``dvc repro`` does."""
        with self._dvc() as repo, repo.lock:
            for stage in repo.stage.collect(target):
                stage.remove_outs(ignore_remove=False, force=False)

    def commit(self, target: str) -> None:
        """Record the stage's deps, params, command and outputs in ``dvc.lock`` and its outputs in
        the cache (``dvc commit --force <stage>``: what ``dvc repro`` does after a command)."""
        with self._dvc() as repo:
            repo.commit(target, force=True)


def describe_status(status: dict) -> str:
    """One line from a ``dvc status`` entry, e.g. ``changed deps: data/prepared; changed command``."""
    parts = []
    for entries in status.values():
        for entry in entries:
            if isinstance(entry, str):
                parts.append(entry)
            else:
                for kind, changes in entry.items():
                    names = ", ".join(f"{k} ({v})" for k, v in changes.items()) if isinstance(changes, dict) else changes
                    parts.append(f"{kind}: {names}")
    return "; ".join(parts) or "changed"


def stage_env(stage: StageNode, root: Path, gpu: str | None) -> dict[str, str]:
    """The environment of a stage command: the flow's, with the flow's interpreter first on PATH
    and named in ``CROSSALIGN_PYTHON`` (the stage launcher ``tasks/python`` runs that one, so a
    stage runs in the flow's venv), DVC's ``DVC_ROOT`` and ``DVC_STAGE``, and
    ``CUDA_VISIBLE_DEVICES`` pinned when a GPU was assigned. Inside a flow run, that run's id in
    ``CROSSALIGN_FLOW_RUN_ID`` (unless already set): MLflow runs are tagged with it
    (crossalign.tracking.runs), also when ``python -m flows.compare`` runs without a worker."""
    env = dict(os.environ)
    if not env.get("CROSSALIGN_FLOW_RUN_ID"):
        from prefect.runtime import flow_run

        if flow_run.id:
            env["CROSSALIGN_FLOW_RUN_ID"] = str(flow_run.id)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["CROSSALIGN_PYTHON"] = sys.executable
    env["DVC_ROOT"] = str(root)
    env["DVC_STAGE"] = stage.name
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    seconds: float
    tail: str          # last lines of stdout+stderr, for the error message


def run_commands(stage: StageNode, env: dict[str, str], echo: Callable[[str], None],
                 tail_lines: int = 30) -> CommandResult:
    """Run the stage's commands in order with ``/bin/sh -c`` in its ``wdir``; stream each output
    line to ``echo``; stop at the first failing command."""
    start = time.monotonic()
    tail: deque[str] = deque(maxlen=tail_lines)
    code = 0
    for cmd in stage.cmds:
        echo(f"$ {cmd}")
        proc = subprocess.Popen(["/bin/sh", "-c", cmd], cwd=stage.wdir, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            echo(line)
        code = proc.wait()
        if code != 0:
            break
    return CommandResult(code, time.monotonic() - start, "\n".join(tail))


def gpu_ids() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` labels."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPU
        return []


class SlotPool:
    """``size`` execution slots, each pinned to one GPU when there are several GPUs.

    ``acquire()`` blocks until a slot is free and returns its GPU label (``None``: do not pin);
    ``release(label)`` frees it. With one or no GPU every slot is unpinned.
    """

    def __init__(self, size: int, gpus: list[str]):
        if size < 1:
            raise ValueError(f"max_parallel must be >= 1, got {size}")
        self.size = size
        labels: list[str | None] = [gpus[i % len(gpus)] for i in range(size)] if len(gpus) > 1 else [None] * size
        self._free: deque[str | None] = deque(labels)
        self._cond = threading.Condition()

    def acquire(self) -> str | None:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._free))
            return self._free.popleft()

    def release(self, label: str | None) -> None:
        with self._cond:
            self._free.append(label)
            self._cond.notify()
