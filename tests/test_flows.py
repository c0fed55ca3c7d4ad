"""The Prefect flow (flows/compare.py) on toy DVC projects: the DAG read from dvc.yaml, skipping
what DVC reports up to date, both directions of flow <-> ``dvc repro``, concurrency and GPU
pinning, retries on the data stage, a failed method, parameters, artifacts.

Flows run under ONE session-scoped ``prefect_test_harness`` (a temporary server, ~15 s).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml
from flows_toy import METHODS, dvc, make_toy_project, toy_log
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.logging import disable_run_logger
from prefect.testing.utilities import prefect_test_harness

from crossalign import config
from flows import compare
from flows.artifacts import leaderboard_markdown, leaderboard_rows, summary_markdown
from flows.dvc_dag import DvcBookkeeper, SlotPool, read_dag
from flows.overrides import apply_overrides, overrides_from


@pytest.fixture(scope="session")
def prefect_harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def toy(tmp_path: Path, monkeypatch) -> Path:
    for key in ("TOY_FAIL", "TOY_FLAKY", "TOY_SLEEP", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    return make_toy_project(tmp_path / "toy")


def run_flow(root: Path, **params):
    """Run the flow in-process; return its final state."""
    return compare.compare_aligners(root=str(root), return_state=True, **params)


def artifacts_of(state) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return {a.key: a for a in found}


# ------------------------------------------------------------------------- DAG and bookkeeping
def test_read_dag_follows_dvc_yaml_and_params(toy: Path):
    dag = read_dag(toy)
    names = list(dag)
    assert set(names) == {"data", "features", "select", *(f"{s}@{m}" for s in ("train", "evaluate") for m in METHODS)}
    for name, node in dag.items():  # dependency order: every upstream comes first
        assert all(names.index(u) < names.index(name) for u in node.upstream), name
    assert dag["train@joint"].upstream == ("features",)
    assert dag["evaluate@joint"].upstream == ("train@joint",)
    assert dag["select"].upstream == tuple(sorted(f"evaluate@{m}" for m in METHODS))
    assert dag["train@joint"].cmds == ("python toy.py train joint",)
    assert dag["train@joint"].target == f"{toy / 'dvc.yaml'}:train@joint"
    apply_overrides(toy, overrides_from(methods=["concat_mlp"]))
    assert [n for n in read_dag(toy) if "@" in n] == ["train@concat_mlp", "evaluate@concat_mlp"]


def test_read_dag_without_dvc_yaml_names_the_file(tmp_path: Path):
    with pytest.raises(ValueError, match="dvc.yaml: no such file"):
        read_dag(tmp_path)


def test_bookkeeper_status_is_empty_only_after_commit(toy: Path):
    books = DvcBookkeeper(toy)
    target = read_dag(toy)["data"].target
    assert books.status(target)  # never ran
    dvc(toy, "repro", "data")
    assert books.status(target) == {}
    (toy / "raw" / "data.txt").write_text("tampered")
    assert "data" in books.status(target)
    books.commit(target)
    assert books.status(target) == {}


def test_overrides_write_params_keep_comments_and_fail_fast(toy: Path):
    text = (toy / "params.yaml").read_text()
    cfg = apply_overrides(toy, overrides_from(methods=["concat_mlp", "joint"], dataset="synthetic", epochs=3))
    assert cfg.train.methods == ["concat_mlp", "joint"] and cfg.train.epochs == 3
    raw = yaml.safe_load((toy / "params.yaml").read_text())
    assert raw["train"]["methods"] == ["concat_mlp", "joint"] and raw["train"]["epochs"] == 3
    assert (toy / "params.yaml").read_text().startswith("# toy params")
    before = (toy / "params.yaml").read_text()
    assert before != text
    with pytest.raises(config.ConfigError, match=r"unknown methods \['clip'\]; allowed: \['concat_mlp'"):
        apply_overrides(toy, overrides_from(methods=["concat_mlp", "clip"]))
    with pytest.raises(config.ConfigError, match=r"data.dataset = 'imagenet'.*allowed: synthetic"):
        apply_overrides(toy, overrides_from(dataset="imagenet"))
    assert (toy / "params.yaml").read_text() == before  # a refused override leaves the file as it was


def test_slot_pool_pins_one_gpu_per_slot_and_blocks_when_full():
    pool = SlotPool(2, ["3", "5"])
    a, b = pool.acquire(), pool.acquire()
    assert {a, b} == {"3", "5"}
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    time.sleep(0.2)
    assert got == []  # both slots taken: the third stage waits
    pool.release(a)
    waiter.join(5)
    assert got == [a]
    assert SlotPool(3, ["0"]).acquire() is None  # one GPU: nothing to pin
    with pytest.raises(ValueError, match="max_parallel must be >= 1"):
        SlotPool(0, [])


def test_project_lock_makes_a_second_run_wait_and_names_the_holder(toy: Path, tmp_path: Path):
    from flows.dvc_dag import project_lock

    order, told = [], []
    with project_lock(toy, who="flow run first-run"):
        waiter = threading.Thread(target=lambda: _hold(toy, order, told))
        waiter.start()
        time.sleep(0.5)
        order.append("first done")
    waiter.join(10)
    assert order == ["first done", "second holds"]  # the second waited for the first to let go
    assert len(told) == 1 and "waiting for flow run first-run (pid" in told[0]
    with pytest.raises(ValueError, match="not a DVC project"):
        with project_lock(tmp_path / "nowhere"):
            pass


def _hold(root: Path, order: list[str], told: list[str]) -> None:
    from flows.dvc_dag import project_lock

    with project_lock(root, who="flow run second-run", on_wait=told.append):
        order.append("second holds")


def test_leaderboard_rows_are_compact_and_mark_champion():
    selection = {"champion": "joint", "leaderboard": [
        {"method": "joint", "val_rsum": 300.123456, "seeds": [0], "protocol": "a long protocol text " * 5,
         "test": {"rsum": 290.04, "i2t_r1": 40.0, "t2i_r1": 30.55, "i2t_medr": 2.0},
         "test_std": {"rsum": 1.0}, "binding_probe": {"mean": 69.44, "ci95": {"mean": [60.0, 75.0]}}},
        {"method": "contrastive+cross_attention", "control": True, "val_rsum": 200.0, "seeds": [0, 1],
         "test": {"rsum": 190.0}}]}
    rows = leaderboard_rows(selection)
    assert rows[0] == {"rank": 1, "method": "joint", "role": "champion", "val RSUM": 300.1, "test RSUM": 290.0,
                       "R@1 i2t": 40.0, "R@1 t2i": 30.6, "binding %": 69.4, "seeds": 1}
    assert rows[1]["role"] == "control" and rows[1]["R@1 i2t"] == "" and rows[1]["seeds"] == 2
    assert leaderboard_rows({"leaderboard": {"a": {"val_rsum": 1.0}}})[0]["method"] == "a"
    with pytest.raises(ValueError, match="no 'leaderboard' key"):
        leaderboard_rows({"champion": "a"})
    md = leaderboard_markdown(selection)
    assert md.startswith("Champion: **joint** (best validation RSUM, 300.1)")
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert table[0] == "| rank | method | val RSUM | test RSUM | R@1 i2t | R@1 t2i | binding % | seeds |"
    assert table[2].startswith("| **1** | **joint** (champion) | **300.1** |")
    assert table[3].startswith("| 2 | contrastive+cross_attention (control) | 200.0 | 190.0 |  |")
    assert max(len(ln) for ln in table) < 100 and "protocol" not in md  # narrow: nothing cut off on the right


def test_summary_markdown_states_failure_parameters_and_report():
    stages = [{"stage": "data", "outcome": "skipped", "seconds": 0.0},
              {"stage": "train@joint", "outcome": "failed", "seconds": None}]
    md = summary_markdown({"methods": ["joint"]}, stages, "1 stage(s) failed: train@joint", "# Report", 2.0)
    assert "**FAILED**" in md and "1 stage(s) failed: train@joint" in md
    assert "| methods | `['joint']` |" in md and "| train@joint | failed |  |" in md
    assert md.rstrip().endswith("# Report")


def test_run_stage_task_runs_commits_then_skips(toy: Path, monkeypatch):
    dag, books, slots = read_dag(toy), DvcBookkeeper(toy), SlotPool(1, [])
    monkeypatch.setenv("TOY_FLAKY", str(toy.parent / "flaky-marker"))
    with disable_run_logger():
        with pytest.raises(compare.StageFailed, match="(?s)stage data failed \\(exit 1\\).*download interrupted"):
            compare.run_stage.fn("data", dag["data"], books, slots)
        first = compare.run_stage.fn("data", dag["data"], books, slots)
        again = compare.run_stage.fn("data", dag["data"], books, slots)
    assert first["outcome"] == "ran"
    assert again.is_completed() and again.name == compare.SKIPPED and again.result()["outcome"] == "skipped"
    assert (toy / "raw" / "data.txt").read_text() == "synthetic"
    assert books.status(dag["data"].target) == {}


# --------------------------------------------------------------------------------- flow runs
def test_flow_runs_dag_concurrently_retries_data_and_dvc_finds_it_up_to_date(toy: Path, prefect_harness, monkeypatch):
    monkeypatch.setenv("TOY_FLAKY", str(toy.parent / "flaky-marker"))
    monkeypatch.setenv("TOY_SLEEP", "1.0")
    monkeypatch.setitem(compare.RETRIES, "data", {"retries": 2, "retry_delay_seconds": 0})
    state = run_flow(toy, max_parallel=2)
    assert state.is_completed(), state.message
    result = state.result()
    assert {r["stage"]: r["outcome"] for r in result["stages"]} == {n: "ran" for n in read_dag(toy)}
    log = toy_log(toy)
    assert [e["step"] for e in log][:2] == ["data", "features"]  # data succeeded on its retry
    trains = [e for e in log if e["step"] == "train"]
    at_once = max(sum(o["start"] <= t["start"] < o["end"] for o in trains) for t in trains)
    assert at_once == 2, "max_parallel=2: two trainings at once, never three"
    # direction 1: after the flow, DVC finds everything up to date and repro runs nothing
    assert DvcBookkeeper(toy).status() == {}
    assert "Data and pipelines are up to date." in dvc(toy, "repro").stdout
    assert len(toy_log(toy)) == len(log)
    keys = artifacts_of(state)
    assert {"crossalign-leaderboard", "crossalign-stages", "crossalign-summary"} <= set(keys)
    assert "champion: contrastive" in keys["crossalign-summary"].data
    assert "contrastive" in keys["crossalign-leaderboard"].data
    # a second flow run skips every stage
    again = run_flow(toy, max_parallel=2)
    assert {r["outcome"] for r in again.result()["stages"]} == {"skipped"}


def test_flow_after_dvc_repro_skips_every_stage(toy: Path, prefect_harness):
    dvc(toy, "repro")
    ran = len(toy_log(toy))
    state = run_flow(toy)
    assert state.is_completed(), state.message
    assert {r["outcome"] for r in state.result()["stages"]} == {"skipped"}
    assert len(toy_log(toy)) == ran
    # the flow-run graph tells them from stages that ran: state "Skipped", task run "<stage> (up to date)"
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert sorted(r.name for r in runs) == sorted(f"{stage} (up to date)" for stage in read_dag(toy))
    assert {r.state.type.value for r in runs} == {"COMPLETED"} and {r.state.name for r in runs} == {compare.SKIPPED}


def test_failed_method_fails_its_branch_and_select_names_it(toy: Path, prefect_harness, monkeypatch):
    monkeypatch.setenv("TOY_FAIL", "contrastive")
    state = run_flow(toy, max_parallel=2)
    assert state.is_failed()
    assert "train@contrastive" in state.message
    assert "missing methods ['contrastive']" in state.message  # select's own error, surfaced
    steps = {(e["step"], e["item"]) for e in toy_log(toy)}
    assert ("evaluate", "joint") in steps and ("evaluate", "concat_mlp") in steps
    assert ("evaluate", "contrastive") not in steps and ("select", None) not in steps
    assert "not run (upstream failed): evaluate@contrastive" in state.message
    status = DvcBookkeeper(toy).status()
    assert {"train@contrastive", "evaluate@contrastive", "select"} <= set(status)
    assert "train@joint" not in status  # the healthy branches are committed
    assert "FAILED" in artifacts_of(state)["crossalign-summary"].data


def test_flow_parameters_take_effect_and_pin_gpus(toy: Path, prefect_harness, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    state = run_flow(toy, methods=["concat_mlp", "joint"], epochs=3)
    assert state.is_completed(), state.message
    assert state.result()["parameters"]["max_parallel"] == 2  # default: one per visible GPU
    assert (toy / "models" / "joint" / "w.txt").read_text() == "joint epochs=3"
    assert not (toy / "models" / "contrastive").exists()
    cudas = {e["item"]: e["cuda"] for e in toy_log(toy) if e["step"] == "train"}
    assert set(cudas) == {"concat_mlp", "joint"} and set(cudas.values()) <= {"0", "1"}
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.parameters["methods"] == ["concat_mlp", "joint"] and run.parameters["epochs"] == 3
    bad = run_flow(toy, methods=["concat_mlp", "clip"])
    assert bad.is_failed() and "allowed: ['concat_mlp'" in bad.message


def test_failed_data_stage_stops_everything_after_it(toy: Path, prefect_harness, monkeypatch):
    monkeypatch.setenv("TOY_FLAKY", str(toy.parent / "flaky-marker"))
    monkeypatch.setitem(compare.RETRIES, "data", {"retries": 0})
    state = run_flow(toy)
    assert state.is_failed() and "1 stage(s) failed: data" in state.message
    assert "download interrupted" in state.message
    assert toy_log(toy) == []  # nothing downstream ran, select included (no branch completed)
    rows = artifacts_of(state)["crossalign-stages"].data
    assert '"select"' in rows and "not run" in rows


# ------------------------------------------------------------------- params checked, bad input
def test_main_with_a_bad_method_prints_one_line_and_changes_nothing(toy: Path, prefect_harness, capsys):
    before = (toy / "params.yaml").read_text()
    assert compare.main(["--root", str(toy), "--methods", "foo"]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err + captured.out
    assert "unknown methods ['foo']; allowed: ['concat_mlp', 'cross_attention', 'contrastive', 'joint']" in lines[0]
    assert lines[0].count("unknown methods") == 1
    assert (toy / "params.yaml").read_text() == before and toy_log(toy) == []


def test_main_with_a_params_typo_names_the_key_and_runs_nothing(toy: Path, prefect_harness, capsys):
    text = (toy / "params.yaml").read_text()
    (toy / "params.yaml").write_text(text.replace("  epochs: 1\n", "  epoch: 1\n"))
    assert compare.main(["--root", str(toy)]) == 2
    err = capsys.readouterr().err
    assert "train.epoch: unknown key (value 1); did you mean `epochs`?" in err and "Traceback" not in err
    assert toy_log(toy) == []


def test_flow_checks_params_before_any_stage_runs(toy: Path, prefect_harness):
    """A key dvc.yaml reads, deleted (valid for the typed config, which has a default): the flow
    fails before DVC could remove an output; nothing ran."""
    dvc(toy, "repro")
    ran = len(toy_log(toy))
    text = (toy / "params.yaml").read_text()
    (toy / "params.yaml").write_text(text.replace("  epochs: 1\n", ""))
    state = run_flow(toy)
    assert state.is_failed() and "train.epochs (read by train@concat_mlp" in state.message
    assert len(toy_log(toy)) == ran
    assert all((toy / "models" / m / "w.txt").exists() for m in METHODS)


def test_stage_env_names_the_flow_run_so_mlflow_runs_are_tagged_with_it(prefect_harness, toy: Path, monkeypatch):
    """Single-host runs too: a stage launched by ``python -m flows.compare`` (no worker, so Prefect sets
    no PREFECT__FLOW_RUN_ID) gets the flow run's id in CROSSALIGN_FLOW_RUN_ID."""
    from prefect import flow

    from flows.dvc_dag import stage_env

    monkeypatch.delenv("CROSSALIGN_FLOW_RUN_ID", raising=False)
    node = read_dag(toy)["data"]

    @flow
    def probe() -> str:
        return stage_env(node, toy, None).get("CROSSALIGN_FLOW_RUN_ID", "")

    state = probe(return_state=True)
    assert state.result() == str(state.state_details.flow_run_id)
    assert "CROSSALIGN_FLOW_RUN_ID" not in stage_env(node, toy, None)  # outside a flow run: none
    monkeypatch.setenv("CROSSALIGN_FLOW_RUN_ID", "comparison-id")  # a worker's stage run keeps the comparison's
    assert probe() == "comparison-id"


# ------------------------------------------------------------------------ concurrency under load
def _bookkeeping_log(monkeypatch) -> list[dict]:
    """Record every prepare (outputs removed) and commit the flow's bookkeepers make, with times."""
    events: list[dict] = []
    lock = threading.Lock()

    def recorded(kind, method):
        def wrapper(self, target):
            start = time.time()
            method(self, target)
            with lock:
                events.append({"kind": kind, "stage": target.rsplit(":", 1)[1], "start": start, "end": time.time()})
        return wrapper

    monkeypatch.setattr(DvcBookkeeper, "prepare", recorded("prepare", DvcBookkeeper.prepare))
    monkeypatch.setattr(DvcBookkeeper, "commit", recorded("commit", DvcBookkeeper.commit))
    return events


def _violations(dag, runs: list[dict], events: list[dict]) -> list[str]:
    """Every run that started before an upstream stage had committed, ran while an upstream's
    outputs were being removed, had its own outputs removed again before its commit, overlapped
    another run of its own stage, or found an input or output missing (the command's own check)."""
    found = []
    for run in runs:
        name = run["step"] + (f"@{run['item']}" if run["item"] else "")
        for key in ("missing_at_start", "missing_at_end", "own_missing"):
            if run[key]:
                found.append(f"{name} (pid {run['pid']}): {key} {run[key]}")
        for up in dag[name].upstream:
            before = [e for e in events if e["stage"] == up and e["end"] <= run["start"]]
            last = max(before, key=lambda e: e["end"]) if before else None
            if last is None or last["kind"] != "commit":
                found.append(f"{name} started at {run['start']:.3f} before {up} was committed "
                             f"(last bookkeeping of {up}: {last})")
        for e in events:
            if e["kind"] == "prepare" and e["stage"] in dag[name].upstream and \
                    e["start"] < run["end"] and e["end"] > run["start"]:
                found.append(f"{name} ran {run['start']:.3f}-{run['end']:.3f} while {e['stage']}'s outputs were "
                             f"removed ({e['start']:.3f}-{e['end']:.3f})")
        commits = [e for e in events if e["stage"] == name and e["kind"] == "commit" and e["start"] >= run["end"]]
        until = min((e["end"] for e in commits), default=float("inf"))
        for e in events:
            if e["kind"] == "prepare" and e["stage"] == name and run["start"] < e["end"] and e["start"] < until:
                found.append(f"{name} ran {run['start']:.3f}-{run['end']:.3f}, its outputs were removed again "
                             f"({e['start']:.3f}-{e['end']:.3f}) before its commit")
        same = [o for o in runs if o is not run and (o["step"], o["item"]) == (run["step"], run["item"])
                and o["start"] < run["end"] and o["end"] > run["start"]]
        if same:
            found.append(f"{name}: two runs at once (pids {run['pid']}, {same[0]['pid']})")
    return found


@pytest.mark.slow
def test_overlapping_flow_runs_under_load_never_run_a_stage_without_its_input(tmp_path: Path, prefect_harness,
                                                                             monkeypatch):
    """max_parallel 4, stages that burn CPU and sleep at random, three rounds; in each round a
    triggered run (new epochs: train, evaluate and select are stale) and, once it has removed or
    committed its first outputs, a second run of the same project (a cron run firing). No stage may start before every stage it
    reads has committed, nor run while an upstream's outputs are removed; the second run waits
    for the first and finds its work up to date."""
    for key in ("TOY_FAIL", "TOY_FLAKY", "TOY_SLEEP", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    toy = make_toy_project(tmp_path / "stress", methods=METHODS, stress=True)
    events = _bookkeeping_log(monkeypatch)
    for epochs in (2, 3, 4):
        states: dict[str, object] = {}

        def run(key: str, **params) -> None:
            states[key] = run_flow(toy, max_parallel=4, **params)

        first = threading.Thread(target=run, args=("triggered",), kwargs={"epochs": epochs})
        second = threading.Thread(target=run, args=("scheduled",))
        first.start()
        deadline, seen = time.monotonic() + 60, len(events)
        while len(events) == seen and time.monotonic() < deadline:  # the first run is under way ...
            time.sleep(0.05)
        second.start()  # ... when the second one fires
        first.join(120), second.join(120)
        dag = read_dag(toy)
        problems = _violations(dag, toy_log(toy), events)
        assert not problems, f"epochs={epochs}:\n" + "\n".join(problems)
        assert states["triggered"].is_completed(), states["triggered"].message
        assert states["scheduled"].is_completed(), states["scheduled"].message
        ran = {r["stage"] for r in states["triggered"].result()["stages"] if r["outcome"] == "ran"}
        assert {n for n in dag if n.split("@")[0] in ("train", "evaluate", "select")} <= ran
        assert {r["outcome"] for r in states["scheduled"].result()["stages"]} == {"skipped"}
        assert DvcBookkeeper(toy).status() == {}
    assert len(toy_log(toy)) == 2 + 3 * 7  # data and features once, then train/evaluate/select per round


@pytest.mark.slow
def test_compare_on_an_up_to_date_project_prints_no_traceback(toy: Path, tmp_path: Path):
    """`python -m flows.compare` as a user runs it, in a shell without the Makefile's telemetry
    settings and with no Prefect server (Prefect starts a temporary one): every stage skipped,
    exit 0, and nothing on the terminal from telemetry (a failed send offline, SQLite locked by
    the server's telemetry service) or MLflow warnings."""
    import os
    import subprocess
    import sys

    dvc(toy, "repro")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DO_NOT_TRACK", "DVC_NO"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(Path(compare.__file__).parents[1]),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",  # as prefect.toml: a loaded CPU
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    done = subprocess.run([sys.executable, "-m", "flows.compare", "--root", str(toy)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    for bad in ("Traceback", "telemetry", "database is locked", "UserWarning", "\x1b["):
        assert bad not in out, f"{bad!r} in:\n{out[-3000:]}"
    assert out.count("is up to date (dvc status): skipped") == len(read_dag(toy))
