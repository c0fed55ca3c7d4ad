"""``run-stage``: one DVC stage of a comparison, run by a Prefect worker on its own host.

The orchestrating ``compare-aligners`` flow run (``--dispatch``, flows/dispatch.py) starts one flow
run of the ``run-stage`` deployment per stage. The worker that picks it up runs it in its own clone
of the repository (``CROSSALIGN_CLONE``, the worker's working directory) and:

0. checks every parameter before it writes or checks out anything (flows/trust.py): the commit id,
   ``params_yaml`` as a valid configuration, the stage among those the commit's ``dvc.yaml``
   declares, the upstream ``dvc.lock`` entries against their declared commands and outs, every
   side-store path inside a ``cache: false`` out of an upstream stage and inside the clone;
1. fetches and checks out the orchestrator's commit (detached, tracked files forced to it), and
   writes the orchestrator's ``params.yaml``;
2. writes the ``dvc.lock`` entries of the upstream stages that the orchestrator hands over, pulls
   from the DVC remote exactly the outputs of those stages that this stage reads, and fetches their
   ``cache: false`` outs from the remote's side path (flows/side_store.py);
3. pulls this stage's own outputs when the commit's ``dvc.lock`` has an entry for it, so that an
   up-to-date stage is skipped, and puts back the last pushed checkpoint of a ``persist`` out
   (``train``'s ``models/<m>/checkpoints``) — a retry on another host resumes from it;
4. runs ``dvc repro --single-item <stage>`` (DVC decides whether to run, and writes the lock entry),
   pushing the ``persist`` outs to the side path each time they change while it runs;
5. ``dvc push``es the stage's outputs, uploads its ``cache: false`` outs to the side path, and
   hands back its ``dvc.lock`` entry as a markdown artifact of the flow run (the flow run's
   return value lives in the worker's local result storage, which other hosts cannot read).

    prefect worker start --pool crossalign-gpu --name "$(hostname)-gpu0" --limit 1   # in the clone
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import trust
from flows.side_store import SideStore, files_under

CLONE_ENV = "CROSSALIGN_CLONE"        # the worker's clone; default: the flow run's working directory
CHECKPOINT_PUSH_SECONDS = 1.0         # how often a running stage's persist outs are checked for changes
RESULT_FENCE = "```yaml"


class StageRunError(RuntimeError):
    """A step of a stage run failed; the message names the step and holds its output."""


def _sh(args: list[str], cwd: Path, env: dict[str, str] | None = None, what: str | None = None) -> str:
    """Run a command; return its stdout; raise :class:`StageRunError` with its output when it fails."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageRunError(f"{what or ' '.join(args)} failed (exit {proc.returncode}) in {cwd}:\n"
                            f"{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


def _dvc() -> str:
    return str(Path(sys.executable).parent / "dvc")


def stage_env(stage: str, comparison: str | None) -> dict[str, str]:
    """The stage command's environment: this interpreter first on PATH and as ``CROSSALIGN_PYTHON``
    (``tasks/python`` runs it), as in the single-host flow (flows/dvc_dag.py), and the comparison's
    flow run id in ``CROSSALIGN_FLOW_RUN_ID`` (MLflow runs are tagged with it, crossalign.tracking.runs)."""
    env = dict(os.environ)
    if comparison:
        env["CROSSALIGN_FLOW_RUN_ID"] = comparison
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["CROSSALIGN_PYTHON"] = sys.executable
    env["DVC_STAGE"] = stage
    return env


def fetch(clone: Path, commit: str) -> None:
    """Fetch ``origin``; :class:`StageRunError` unless ``commit`` (a checked commit id) is then known."""
    trust.check_commit(commit)
    _sh(["git", "fetch", "--quiet", "origin"], clone, what="git fetch origin")
    known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=clone, capture_output=True)
    if known.returncode != 0:
        raise StageRunError(f"commit {commit} is not on origin of {clone}: push it before dispatching")


def checkout(clone: Path, commit: str, fetched: bool = False) -> None:
    """Fetch ``origin`` (unless ``fetched``) and check out ``commit`` detached, tracked files forced to it."""
    if not fetched:
        fetch(clone, commit)
    _sh(["git", "checkout", "--quiet", "--force", "--detach", trust.check_commit(commit)], clone,
        what=f"git checkout {commit}")


SIDE_PARAM = "side (flow-run parameter)"


def admit(root: Path, stage: Any, commit: Any, params_yaml: Any, upstream: Any, side: Any,
          comparison: Any) -> dict[str, trust.DeclaredStage]:
    """Check a stage run's parameters (flows/trust.py) before anything is written or checked out;
    fetches ``origin`` to read the commit's ``dvc.yaml``. Returns its stages as declared with these
    params; raises :class:`flows.trust.Refused` naming the parameter and what is allowed."""
    trust.check_commit(commit)
    trust.check_flow_run_id(comparison)
    params = trust.parse_params(params_yaml, "params_yaml (flow-run parameter)")
    if not isinstance(upstream, dict):
        raise trust.Refused(f"upstream (flow-run parameter): expected a mapping of stage names to dvc.lock "
                            f"entries, got {type(upstream).__name__}")
    trust.check_manifest(side, SIDE_PARAM)
    fetch(root, commit)
    stages = trust.declared_stages(_sh(["git", "show", f"{commit}:dvc.yaml"], root, what="git show dvc.yaml"),
                                   params)
    trust.check_stage(stage, stages, "stage (flow-run parameter)")
    for name, entry in upstream.items():
        trust.check_stage(name, stages, "upstream (flow-run parameter) stage")
        trust.check_lock_entry(name, entry, stages, "upstream (flow-run parameter)")
    trust.check_manifest(side, SIDE_PARAM, within=trust.uncached_outs(stages, list(upstream)), root=root)
    return stages


def read_lock(root: Path) -> dict[str, Any]:
    """The stage entries of ``dvc.lock``, read as DVC reads it: YAML 1.2 (PyYAML's YAML 1.1 takes
    DVC's ``5e-05`` for a string, and the entry written back would then differ from params.yaml)."""
    from dvc.utils.serialize import parse_yaml

    path = root / "dvc.lock"
    if not path.exists():
        return {}
    return (parse_yaml(path.read_text(), str(path)) or {}).get("stages", {}) or {}


def write_lock(root: Path, entries: dict[str, Any]) -> None:
    """Write ``dvc.lock`` holding ``entries`` (stage name -> lock entry), in DVC's own format."""
    from dvc.utils.serialize import dump_yaml

    dump_yaml(root / "dvc.lock", {"schema": "2.0", "stages": entries})


def _outs(stage, root: Path) -> list[dict[str, Any]]:
    return [{"path": Path(o.fs_path).relative_to(root).as_posix(), "cache": o.use_cache, "persist": o.persist}
            for o in stage.outs]


def stage_outs(root: Path, stage: str) -> list[dict[str, Any]]:
    """The outs of ``stage`` as declared in dvc.yaml: ``{"path", "cache", "persist"}``."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        (found,) = repo.stage.collect(f"{root / 'dvc.yaml'}:{stage}")
        return _outs(found, root)


def remove_stale_tmp(root: Path, outs: list[str]) -> list[str]:
    """Remove what a killed stage left beside an out: crossalign.io's atomic writes stage an out
    ``p`` as ``.<name>.tmp-*`` beside it, and a stage reading the parent directory (``select``
    reads ``models``) would hash the leftover. Returns the removed paths."""
    removed = []
    for out in outs:
        path = root / out
        for stale in path.parent.glob(f".{path.name}.tmp-*") if path.parent.is_dir() else []:
            shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
            removed.append(stale.relative_to(root).as_posix())
    return removed


def stage_io(root: Path, stage: str, upstream: list[str]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """``stage``'s outs (as :func:`stage_outs`), its file deps, and the cached outs of ``upstream``;
    leftovers of killed stages beside any out of the project are removed (:func:`remove_stale_tmp`)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        (found,) = repo.stage.collect(f"{root / 'dvc.yaml'}:{stage}")
        deps = [Path(d.fs_path).relative_to(root).as_posix() for d in found.deps
                if not isinstance(d, ParamsDependency)]
        ups = [o["path"] for name in upstream for (s,) in [repo.stage.collect(f"{root / 'dvc.yaml'}:{name}")]
               for o in _outs(s, root) if o["cache"]]
        remove_stale_tmp(root, [o["path"] for s in repo.index.stages for o in _outs(s, root)])
    return _outs(found, root), deps, ups


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def pull_targets(deps: list[str], upstream_outs: list[str]) -> list[str]:
    """What to pull so a stage finds its deps: for each dep inside an upstream out, the dep (a part
    of the out); for each upstream out inside a dep (a dep on a parent directory), the out."""
    targets = set()
    for dep in deps:
        for out in upstream_outs:
            if _inside(dep, out):
                targets.add(dep)
            elif _inside(out, dep):
                targets.add(out)
    return sorted(targets)


def checkpoint_key(stage: str, params_yaml: str, upstream: dict[str, Any]) -> str:
    """Where a stage's checkpoint is pushed: its name and a hash of its inputs (params + upstream
    lock entries), so two comparisons with different inputs never share one."""
    blob = json.dumps({"params": params_yaml, "upstream": upstream}, sort_keys=True).encode()
    return f"{stage.replace('@', '-').replace('+', '-')}-{hashlib.md5(blob).hexdigest()[:16]}"


class CheckpointPusher(threading.Thread):
    """Pushes the files of ``rels`` (persist outs) to the side store whenever they change.

    Training replaces a checkpoint directory as a whole each epoch (``os.replace`` of a finished
    directory, crossalign.io.atomic_dir) and never rewrites its files, so hard links taken while no
    directory's inode changed are one consistent checkpoint; they are uploaded at leisure while
    training goes on.
    """

    def __init__(self, store: SideStore, key: str, root: Path, rels: list[str], every: float):
        super().__init__(daemon=True)
        self.store, self.key, self.root, self.rels, self.every = store, key, root, rels, every
        self.stop = threading.Event()
        self.seen: dict[str, int] | None = None   # directory inodes of the last push
        self.count = 0

    def _dirs(self) -> dict[str, int]:
        return {str(p): p.stat().st_ino for rel in self.rels if (self.root / rel).is_dir()
                for p in [self.root / rel, *(q for q in (self.root / rel).rglob("*") if q.is_dir())]}

    def _snapshot(self, into: Path) -> tuple[list[str], dict[str, int]] | None:
        """Hard-link the current files into ``into``; ``None`` when a directory was replaced meanwhile."""
        before = self._dirs()
        files = [f for rel in self.rels if (self.root / rel).exists()
                 for f in files_under(self.root, rel, hidden=False)]  # not a checkpoint being written
        for rel in files:
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(self.root / rel, into / rel)
        return (files, before) if self._dirs() == before else None

    def push_once(self) -> bool:
        """Push the checkpoint if it changed since the last push; True when one was pushed."""
        scratch = self.root / ".dvc" / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a directory replaced while linking: try again at once
            with tempfile.TemporaryDirectory(dir=scratch, prefix="checkpoint-") as tmp:
                try:
                    if self._dirs() == self.seen:
                        return False
                    snap = self._snapshot(Path(tmp))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if snap is None:
                    continue
                files, dirs = snap
                if not files:
                    return False
                self.store.put_checkpoint(self.key, self.store.put(files, Path(tmp)))
                self.seen = dirs
                self.count += 1
                return True
        return False

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.push_once()


def repro(root: Path, stage: str, env: dict[str, str], echo) -> tuple[int, list[str]]:
    """``dvc repro --single-item <stage>`` in ``root``, each output line to ``echo`` -> (exit code, lines)."""
    proc = subprocess.Popen([_dvc(), "repro", "--single-item", stage], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        echo(lines[-1])
    return proc.wait(), lines


def result_markdown(result: dict[str, Any]) -> str:
    """The artifact a stage run leaves: a title line and the result as YAML (read back by
    :func:`parse_result`)."""
    return (f"# {result['stage']}: {result['outcome']} on {result['host']}\n\n"
            f"{RESULT_FENCE}\n{yaml.safe_dump(result, sort_keys=False)}```\n")


def parse_result(markdown: str) -> dict[str, Any]:
    """Inverse of :func:`result_markdown`."""
    start = markdown.find(RESULT_FENCE + "\n")
    end = markdown.rfind("\n```")
    if start < 0 or end <= start:
        raise ValueError(f"stage-run artifact holds no {RESULT_FENCE} block:\n{markdown[:500]}")
    return yaml.safe_load(markdown[start + len(RESULT_FENCE) + 1:end + 1])


def result_key(stage: str) -> str:
    """Artifact key of a stage's result (keys: lowercase letters, digits, dashes)."""
    slug = "".join(c if c.isalnum() else "-" for c in stage.lower())
    return f"crossalign-stage-{slug}"


@flow(name="run-stage", log_prints=True)
def run_stage(stage: str, commit: str, params_yaml: str, upstream: dict[str, Any],
              side: dict[str, str], comparison: str | None = None) -> dict[str, Any]:
    """Run DVC stage ``stage`` of commit ``commit`` in this worker's clone (module docstring).

    ``upstream``: the ``dvc.lock`` entries of the stages it reads; ``side``: their ``cache: false``
    outs as a side-store manifest; ``comparison``: the orchestrating flow run's id. Returns (and
    leaves as an artifact) ``{"stage", "outcome": "ran" | "skipped", "host", "flow_run_id",
    "lock": <its dvc.lock entry>, "side": <manifest of its cache: false outs>}``. Raises
    :class:`flows.trust.Refused`, before anything is written or checked out, for a parameter that
    is not what the commit's ``dvc.yaml`` and a valid configuration allow (:func:`admit`).
    """
    log = get_run_logger()
    root = Path(os.environ.get(CLONE_ENV) or os.getcwd()).resolve()
    host = os.environ.get("CROSSALIGN_HOST") or socket.gethostname()
    stages = admit(root, stage, commit, params_yaml, upstream, side, comparison)
    log.info("%s: commit %s in %s on %s", stage, commit[:12], root, host)
    checkout(root, commit, fetched=True)
    (root / "params.yaml").write_text(params_yaml)
    own = read_lock(root).get(stage)
    write_lock(root, {**read_lock(root), **upstream})

    store = SideStore(root)
    store.get(side, root, within=trust.uncached_outs(stages, list(upstream)), what=SIDE_PARAM)
    outs, deps, upstream_outs = stage_io(root, stage, list(upstream))
    targets = pull_targets(deps, upstream_outs)
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        if targets:
            log.info("%s: dvc pull %s", stage, " ".join(targets))
            repo.pull(targets=targets, force=True)
        if own is not None:  # the commit's lock knows this stage: its outs may make it up to date
            try:
                repo.pull(targets=[stage], allow_missing=True, force=True)
            except Exception as err:  # noqa: BLE001 - not on the remote: the stage runs
                log.info("%s: its outputs of the commit's dvc.lock are not on the remote (%s)", stage, err)

    persist = [o["path"] for o in outs if o["persist"]]
    key = checkpoint_key(stage, params_yaml, upstream)
    pusher = None
    if persist:
        saved = store.get_checkpoint(key, within=persist)
        if saved:
            log.info("%s: resuming from the pushed checkpoint %s (%d files)", stage, key, len(saved))
            store.get(saved, root, within=persist, what=f"checkpoint manifest {key}")
        pusher = CheckpointPusher(store, key, root, persist, CHECKPOINT_PUSH_SECONDS)
        pusher.start()
    try:
        code, lines = repro(root, stage, stage_env(stage, comparison), log.info)
    finally:
        if pusher is not None:
            pusher.stop.set()
            pusher.join()
    if code != 0:
        raise StageRunError(f"stage {stage} failed (exit {code}); last output:\n" + "\n".join(lines[-30:]))
    outcome = "skipped" if any("didn't change, skipping" in ln for ln in lines) else "ran"

    with Repo(str(root)) as repo:
        repo.push(targets=[stage])
    uncached = [f for o in outs if not o["cache"] for f in files_under(root, o["path"])]
    result = {"stage": stage, "outcome": outcome, "host": host, "flow_run_id": str(flow_run.get_id()),
              "lock": read_lock(root)[stage], "side": store.put(uncached, root)}
    create_markdown_artifact(key=result_key(stage), markdown=result_markdown(result),
                             description=f"dvc.lock entry of {stage} (run-stage on {host})")
    log.info("%s: %s on %s, pushed", stage, outcome, host)
    return result
