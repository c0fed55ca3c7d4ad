"""What the distributed mode refuses from outside (flows/trust.py): the audit's payloads through the
real ``run-stage`` flow function (``.fn()``), the side store, the orchestrator's gathering of worker
results, and the ``compare-aligners`` flow parameters. Each is refused with one clear error before
anything is written or checked out: no marker file, nothing outside the clone, the clone's files
and ``git status`` unchanged. Also: ``${item}`` is quoted in every ``dvc.yaml`` command (a second
layer, checked on a minimal DVC project), and the stage list flows/trust.py derives is DVC's own.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flows_toy import dvc, make_toy_project
from prefect.logging import disable_run_logger

from conftest import REPO
from crossalign import config
from flows import trust
from flows.side_store import SideStore

BIN = Path(sys.executable).parent
MD5 = hashlib.md5(b"payload").hexdigest()
SIDE = "side (flow-run parameter)"


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _git(cwd: Path, *args: str) -> str:
    return _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd)


def snapshot(root: Path) -> tuple[dict[str, str], str]:
    """Every file under ``root`` but ``.git`` (path -> sha256; a symlink -> its target) and
    ``git status``: what a refused stage run must leave exactly as it was."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] == ".git" or (p.is_dir() and not p.is_symlink()):
            continue
        files[rel.as_posix()] = f"-> {p.readlink()}" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return files, _run(["git", "status", "--porcelain", "--ignored"], root)


@pytest.fixture
def clone(tmp_path: Path, monkeypatch) -> Path:
    """A worker's clone of a toy project (crossalign's DAG shape, unquoted ``${item}`` in its
    commands) with a git ``origin`` and a DVC remote; ``CROSSALIGN_CLONE`` points at it."""
    src = make_toy_project(tmp_path / "src")
    shutil.rmtree(src / ".dvc")
    _git(src, "init", "-q", "-b", "main")
    _run([str(BIN / "dvc"), "init", "-q"], src)
    _run([str(BIN / "dvc"), "remote", "add", "-d", "shared", str(tmp_path / "remote")], src)
    _git(src, "add", "-A")
    _git(src, "commit", "-qm", "toy")
    _run(["git", "clone", "-q", "--bare", str(src), str(tmp_path / "origin.git")], tmp_path)
    _git(tmp_path, "clone", "-q", str(tmp_path / "origin.git"), str(tmp_path / "clone"))
    monkeypatch.setenv("CROSSALIGN_CLONE", str(tmp_path / "clone"))
    monkeypatch.delenv("TOY_FAIL", raising=False)
    return tmp_path / "clone"


def _params(clone: Path, methods: list[str] | None = None) -> str:
    raw = yaml.safe_load((clone / "params.yaml").read_text())
    if methods is not None:
        raw["train"]["methods"] = methods
        raw["select"]["baseline"] = methods[0]
    return yaml.safe_dump(raw, sort_keys=False)


def _lock(clone: Path, stage: str) -> dict:
    """A well-formed dvc.lock entry of ``stage`` (its declared command and outs)."""
    stages = trust.declared_stages((clone / "dvc.yaml").read_text(), trust.parse_params(_params(clone)))
    return {"cmd": stages[stage].cmd, "outs": [{"path": o.path, "hash": "md5", "md5": "0" * 32 + ".dir", "size": 1,
                                               "nfiles": 1} for o in stages[stage].outs if o.cache]}


def _refused(clone: Path, param: str, match: str, *, stage: str = "data", params: str | None = None,
             upstream: dict | None = None, side: dict | None = None, commit: str | None = None,
             comparison: str | None = None) -> str:
    """Call the real run-stage flow function; assert it is refused with one error that names the
    parameter ``param`` first and says ``match``, and left the clone exactly as it was."""
    from flows.stage_run import run_stage

    before = snapshot(clone)
    commit = commit if commit is not None else _git(clone, "rev-parse", "HEAD").strip()
    with disable_run_logger(), pytest.raises(trust.Refused, match=match) as err:
        run_stage.fn(stage=stage, commit=commit, params_yaml=params if params is not None else _params(clone),
                     upstream=upstream or {}, side=side or {}, comparison=comparison)
    assert snapshot(clone) == before
    assert str(err.value).startswith(param), str(err.value)
    return str(err.value)


def test_a_shell_payload_as_a_method_or_a_stage_name_is_refused_before_anything_runs(clone: Path, tmp_path: Path):
    dvc(clone, "repro", "features")  # train's inputs are there: only the checks stand between the payload and sh
    marker = tmp_path / "X"
    payload = f"joint; touch {marker} #"
    message = _refused(clone, "params_yaml (flow-run parameter)", "unknown methods", stage=f"train@{payload}",
                       params=_params(clone, [payload, "joint"]))
    assert "train.methods" in message
    message = _refused(clone, "stage (flow-run parameter)", "is not a stage of dvc.yaml", stage=f"train@{payload}")
    assert "train@joint" in message  # names the stages there are
    for stage in ("dvc.yaml:data", "../other/dvc.yaml:data", "train@joint --force", "Data"):
        _refused(clone, "stage (flow-run parameter)", "is not a stage of dvc.yaml", stage=stage)
    _refused(clone, "upstream (flow-run parameter) stage", "is not a stage of dvc.yaml",
             upstream={payload: {"cmd": "python toy.py data"}})
    _refused(clone, "upstream (flow-run parameter)", "has command", stage="features",
             upstream={"data": {**_lock(clone, "data"), "cmd": f"python toy.py data; touch {marker}"}})
    _refused(clone, "commit", "expected a full commit id", commit=f"HEAD; touch {marker}")
    _refused(clone, "comparison", "expected a flow run id", comparison=f"x\nCROSSALIGN_HOST=evil")
    assert not marker.exists()


def test_a_side_manifest_cannot_write_outside_the_clone_or_outside_an_upstream_out(clone: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    upstream = {"evaluate@joint": _lock(clone, "evaluate@joint")}
    _refused(clone, SIDE, "climbs out with '..'", stage="select", upstream=upstream, side={"../OUTSIDE.txt": MD5})
    _refused(clone, SIDE, "is an absolute path", stage="select", upstream=upstream, side={str(outside / "ABS.txt"): MD5})
    _refused(clone, SIDE, r"names git's or DVC's own files", stage="select", upstream=upstream,
             side={".git/hooks/post-checkout": MD5})
    _refused(clone, SIDE, "is not inside an out it may carry", stage="select", upstream=upstream, side={"toy.py": MD5})
    _refused(clone, SIDE, "expected 32 lowercase hex digits", stage="select", upstream=upstream,
             side={"metrics/joint.json": "../../x"})
    (clone / "metrics").symlink_to(outside, target_is_directory=True)  # a symlinked directory inside the clone
    message = _refused(clone, SIDE, "goes through the symlink", stage="select", upstream=upstream,
                       side={"metrics/joint.json": MD5})
    assert str(clone / "metrics") in message and "outside the clone" in message
    assert list(outside.iterdir()) == [] and not (tmp_path / "OUTSIDE.txt").exists()


def test_admit_lets_a_well_formed_stage_run_through(clone: Path):
    """The refusals above are not the harness failing: the same inputs, well formed, are admitted."""
    from flows.stage_run import admit

    commit = _git(clone, "rev-parse", "HEAD").strip()
    stages = admit(clone, "select", commit, _params(clone), {"evaluate@joint": _lock(clone, "evaluate@joint")},
                   {"metrics/joint.json": MD5}, "0b9c7d8e-1f2a-4b3c-8d4e-5f6a7b8c9d0e")
    assert set(stages) >= {"data", "features", "train@joint", "evaluate@joint", "select"}


def test_the_side_store_refuses_paths_out_of_the_project_and_writes_nothing(tmp_path: Path):
    remote = tmp_path / "remote"
    root = tmp_path / "p"
    root.mkdir()
    _git(root, "init", "-q")
    _run([str(BIN / "dvc"), "init", "-q"], root)
    _run([str(BIN / "dvc"), "remote", "add", "-d", "shared", str(remote)], root)
    (root / "reports").mkdir()
    (root / "reports" / "r.md").write_text("payload")
    store = SideStore(root)
    manifest = store.put(["reports/r.md"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "reports" / "to-outside.md").symlink_to(outside / "file.md")
    before = snapshot(root)
    good = manifest["reports/r.md"]
    for bad, match in [("../OUTSIDE.txt", "climbs out"), (str(tmp_path / "ABS.txt"), "absolute path"),
                       ("linked/x.md", "goes through the symlink"), ("reports/to-outside.md", "goes through the symlink"),
                       ("reports/./r.md", "canonical form"), ("reports\\..\\..\\x", "backslash")]:
        with pytest.raises(trust.Refused, match=match):
            store.get({"reports/new.md": good, bad: good})  # one bad path: not even the good one is written
        assert snapshot(root) == before, bad
    with pytest.raises(trust.Refused, match="not inside an out it may carry"):
        store.get({"reports/r.md": good}, within=["metrics"])
    assert list(outside.iterdir()) == [] and not (tmp_path / "OUTSIDE.txt").exists()
    assert not (tmp_path / "ABS.txt").exists()
    # a checkpoint manifest read from the remote is checked the same way
    (remote / "crossalign-side" / "checkpoints").mkdir(parents=True)
    (remote / "crossalign-side" / "checkpoints" / "k.json").write_text(json.dumps({"../OUTSIDE.txt": good}))
    with pytest.raises(trust.Refused, match=r"checkpoint manifest .*k\.json.*climbs out"):
        store.get_checkpoint("k")
    store.put_checkpoint("k", {"models/a/checkpoints/state.json": good})
    with pytest.raises(trust.Refused, match="not inside an out it may carry"):
        store.get_checkpoint("k", within=["models/b/checkpoints"])
    assert store.get_checkpoint("k", within=["models/a/checkpoints"]) == {"models/a/checkpoints/state.json": good}


def test_the_orchestrator_refuses_a_forged_worker_result_before_writing(tmp_path: Path):
    from flows.dispatch import gather
    from flows.dvc_dag import read_dag

    toy = make_toy_project(tmp_path / "toy", ["concat_mlp", "joint"])
    dag = read_dag(toy)
    entry = _lock(toy, "evaluate@joint")
    ok = {"stage": "evaluate@joint", "outcome": "ran", "host": "h", "flow_run_id": "f", "lock": entry,
          "side": {"metrics/joint.json": MD5}}
    before = snapshot_files(toy)
    forged = [({**ok, "side": {"../OUTSIDE.txt": MD5}}, "climbs out"),
              ({**ok, "side": {"params.yaml": MD5}}, "not inside an out it may carry"),
              ({**ok, "stage": "evaluate@concat_mlp"}, "is for stage"),
              ({**ok, "lock": {**entry, "cmd": "python toy.py evaluate joint; touch X"}}, "has command"),
              ({**ok, "lock": {**entry, "outs": [{"path": "../x", "md5": "0" * 32}]}}, "climbs out"),
              ({**ok, "lock": {**entry, "outs": [{"path": "raw", "md5": "0" * 32}]}}, "dvc.yaml declares")]
    for result, match in forged:
        with pytest.raises(trust.Refused, match=match):
            gather(toy, dag, {"evaluate@joint": result})
        assert snapshot_files(toy) == before  # no dvc.lock, no side file
    assert not (tmp_path / "OUTSIDE.txt").exists()


def snapshot_files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_compare_flow_parameters_are_checked_before_params_yaml_is_written(tmp_path: Path):
    from flows import compare

    toy = make_toy_project(tmp_path / "toy")
    before = snapshot_files(toy)
    marker = tmp_path / "X"
    bad = [({"methods": [f"joint; touch {marker} #"]}, "unknown methods"),
           ({"dataset": "../../etc"}, "allowed: synthetic"),
           ({"dispatch_retries": -1}, "dispatch_retries -1"),
           ({"max_parallel": 0}, "max_parallel 0"),
           ({"dispatch": "run-stage/gpu; touch x/y"}, "expected a deployment name"),
           ({"root": str(tmp_path)}, "no dvc.yaml there")]
    with disable_run_logger():
        for params, match in bad:
            with pytest.raises(config.ConfigError, match=match):
                compare.compare_aligners.fn(**{"root": str(toy), **params})
    assert snapshot_files(toy) == before and not marker.exists()


# ------------------------------------------------------------- dvc.yaml: DVC's own stage list, quoted items
def test_declared_stages_are_dvcs_own_expansion_of_the_real_dvc_yaml():
    from dvc.repo import Repo

    from flows.dvc_dag import read_dag
    from flows.stage_run import stage_outs

    params = trust.parse_params((REPO / "params.yaml").read_text())
    stages = trust.declared_stages((REPO / "dvc.yaml").read_text(), params)
    dag = read_dag(REPO)
    assert sorted(stages) == sorted(dag)
    with Repo(str(REPO)) as repo:
        for name in dag:
            (found,) = repo.stage.collect(f"{REPO / 'dvc.yaml'}:{name}")
            assert stages[name].cmd == found.cmd, name
    for name in ("train@joint", "select", "evaluate_control@contrastive+cross_attention"):
        assert sorted((o.path, o.cache, o.persist) for o in stages[name].outs) == \
            sorted((o["path"], o["cache"], o["persist"]) for o in stage_outs(REPO, name))
    assert [o.path for o in stages["train@joint"].outs if o.persist] == ["models/joint/checkpoints"]


def test_every_item_in_a_dvc_yaml_command_is_single_quoted():
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    cmds = {name: body["do"]["cmd"] for name, body in doc["stages"].items() if "foreach" in body}
    assert cmds and all("${item}" in c for c in cmds.values())
    for name, cmd in cmds.items():
        assert cmd.count("${item}") == cmd.count("'${item}'"), (name, cmd)


def test_a_quoted_item_does_not_reach_the_shell_in_a_minimal_dvc_project(tmp_path: Path):
    """DVC substitutes ``${item}`` before the shell sees the command: unquoted, the item
    ``joint; touch X #`` runs ``touch``; quoted as dvc.yaml now does, it is one argument."""
    project = tmp_path / "p"
    project.mkdir()
    _git(project, "init", "-q")
    _run([str(BIN / "dvc"), "init", "-q"], project)
    (project / "dvc.yaml").write_text("stages:\n"
                                      "  plain:\n    foreach: ${items}\n    do:\n      cmd: echo run --method ${item}\n"
                                      "  quoted:\n    foreach: ${items}\n    do:\n      cmd: echo run --method '${item}'\n")
    marker = tmp_path / "X"
    payload = f"joint; touch {marker} #"
    (project / "params.yaml").write_text(yaml.safe_dump({"items": ["joint", payload]}))
    out = _run([str(BIN / "dvc"), "repro", "--single-item", f"quoted@{payload}"], project)
    assert "run --method joint; touch" in out and not marker.exists()
    _run([str(BIN / "dvc"), "repro", "--single-item", f"plain@{payload}"], project)
    assert marker.exists()  # the control: without the quotes the payload runs
    # and the first layer: validation refuses that item before DVC sees it
    with pytest.raises(trust.Refused, match="unknown methods"):
        trust.parse_params(yaml.safe_dump({"train": {"methods": [payload]}}))


def test_params_must_be_valid_under_both_yaml_readers():
    """PyYAML (the stages) and DVC's reader may disagree; each must see a valid configuration."""
    with pytest.raises(trust.Refused, match="as DVC reads it"):
        trust.parse_params("tracking:\n  experiment: 1e3\n")  # PyYAML: the string '1e3'; DVC: 1000.0
    with pytest.raises(trust.Refused, match="not valid YAML"):
        trust.parse_params("train: [")
    with pytest.raises(trust.Refused, match="expected the text of params.yaml"):
        trust.parse_params({"train": {}})
    assert trust.parse_params("train:\n  methods: [joint]\nselect:\n  baseline: joint\n")["train"]["methods"] == ["joint"]


@pytest.mark.parametrize("rel", ["a", "reports/comparison.md", "models/joint/checkpoints/seed-0/state.json"])
def test_relative_paths_in_canonical_form_pass(rel: str):
    assert trust.check_relpath(rel, "t") == rel


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", ".git/config",
                                 "x/.dvc/config", "a\\b", "a\nb", None, 3])
def test_other_paths_are_refused(rel):
    with pytest.raises(trust.Refused):
        trust.check_relpath(rel, "t")
