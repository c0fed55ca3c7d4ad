"""Eight stage-like processes at once write to one real MLflow tracking server (basic auth on) and
one local-directory DVC remote, and nothing is lost.

Each worker is a real subprocess of this file in its own git clone ("host"): it waits until all
eight are ready, then -- at once -- logs a training run through :class:`MlflowTracker` exactly as
``train`` does (experiment set up by all eight concurrently, per-epoch metrics, checkpoint
artifacts, loss curve, the model registered as a version), and ``dvc add`` + ``dvc push`` a
distinct out to the shared remote. It hands back its ``.dvc`` entry, as a stage run hands back
its ``dvc.lock`` entry. The test then checks every run, metric step, artifact byte and model
version in the server, and that a fresh clone given the eight entries ``dvc pull``s all eight
outs with the bytes each worker wrote (expected values recomputed here, not read back).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

N_WORKERS, EPOCHS, OUT_BYTES = 8, 6, 256 * 1024
EXPERIMENT, MODEL = "concurrency", "concurrency-m"
METRICS = ("train_loss", "itc_loss", "val_rsum", "lr")


def expected_metric(worker: int, epoch: int, name: str) -> float:
    """The value worker ``worker`` logs for ``name`` at ``epoch`` (distinct per worker, key, step)."""
    return round(100.0 * worker + 10.0 * epoch + METRICS.index(name) + 0.25, 6)


def expected_bytes(worker: int, what: str) -> bytes:
    """The bytes of worker ``worker``'s DVC out (``out``) or checkpoint blob (``blob``)."""
    return np.random.default_rng([worker, 0 if what == "out" else 1]).bytes(OUT_BYTES)


# --------------------------------------------------------------------------------- the worker
def worker(index: int, clone: Path, tracking_uri: str, go: Path) -> None:
    """One stage-like process: MLflow logging as ``train`` does, then ``dvc add`` + ``dvc push``."""
    import torch
    from dvc.repo import Repo

    from crossalign import config
    from crossalign.methods import build_aligner, method_params, save_aligner
    from crossalign.train.tracker import MlflowTracker

    torch.set_num_threads(1)
    cfg = config.from_dict({"methods": {"embed_dim": 8}, "train": {"seeds": [index], "device": "cpu", "threads": 1},
                            "tracking": {"tracking_uri": tracking_uri, "experiment": EXPERIMENT,
                                         "registered_model": MODEL}}, "worker")
    torch.manual_seed(index)
    final, ckpt = clone / "models" / "final", clone / "models" / "checkpoints"
    save_aligner(build_aligner(cfg, "contrastive", 6, 5), final,
                 {"method": "contrastive", "seed": index, "image_dim": 6, "text_dim": 5,
                  "methods": method_params(cfg, "contrastive")})
    ckpt.mkdir(parents=True)
    (ckpt / "blob.bin").write_bytes(expected_bytes(index, "blob"))
    out = clone / "outs" / f"part-{index}.bin"
    out.parent.mkdir()
    out.write_bytes(expected_bytes(index, "out"))
    (clone / f"ready-{index}").touch()
    while not go.exists():  # start together: the point is eight writers at once
        time.sleep(0.05)

    tracker = MlflowTracker(cfg, clone)  # every worker sets up the (new) experiment at once
    tracker.start("contrastive", index, f"fingerprint-{index}")
    history = []
    for epoch in range(1, EPOCHS + 1):
        values = {name: expected_metric(index, epoch, name) for name in METRICS}
        tracker.log_epoch(values, epoch)
        history.append({"epoch": epoch, **values})
    tracker.finish(final, ckpt, history)

    with Repo(str(clone)) as repo:
        repo.add(str(out))
        repo.push()
    print(json.dumps({"dvc": (out.parent / f"{out.name}.dvc").read_text()}))


# ----------------------------------------------------------------------------------- the test
@pytest.mark.slow
def test_eight_writers_lose_nothing(tmp_path):
    from mlflow import MlflowClient

    from servers import DVC, QUIET_ENV, local_dvc_remote, mlflow_server, stop, use_dvc_remote, wait_until

    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    origin = tmp_path / "origin"
    origin.mkdir()
    with local_dvc_remote(tmp_path) as remote, mlflow_server(tmp_path / "mlflow", workers=2) as srv:
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=origin, check=True, env=env)
        subprocess.run([DVC, "init", "-q"], cwd=origin, check=True, env=env)
        use_dvc_remote(origin, remote, local=False)  # the remote's address is committed, as in a project
        subprocess.run(["git", "add", "-A"], cwd=origin, check=True, env=env)
        subprocess.run(["git", "commit", "-q", "-m", "init"], cwd=origin, check=True, env=env)
        clones = []
        for i in range(N_WORKERS + 1):  # eight workers and one fresh clone that only pulls
            clone = tmp_path / f"clone-{i}"
            subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True, env=env)
            clones.append(clone)

        go = tmp_path / "go"
        worker_env = {**env, **srv.client_env()}
        procs = []
        for i in range(N_WORKERS):
            log = open(tmp_path / f"worker-{i}.log", "w")
            procs.append((subprocess.Popen(
                [sys.executable, __file__, str(i), str(clones[i]), srv.url, str(go)], cwd=clones[i],
                env={**worker_env, "CROSSALIGN_HOST": f"host-{i}"}, stdout=subprocess.PIPE, stderr=log, text=True,
                start_new_session=True), log))
        try:
            wait_until(lambda: all((clones[i] / f"ready-{i}").exists() for i in range(N_WORKERS)), 180,
                       "eight workers ready")
            started = time.monotonic()
            go.touch()
            results = []
            for i, (proc, log) in enumerate(procs):
                out, _ = proc.communicate(timeout=300)
                log.close()
                assert proc.returncode == 0, (tmp_path / f"worker-{i}.log").read_text()[-3000:]
                results.append(json.loads(out.strip().splitlines()[-1]))
            concurrent_seconds = time.monotonic() - started
        finally:
            for proc, log in procs:
                stop(proc)
                log.close()
        print(f"eight concurrent writers: {concurrent_seconds:.1f} s")

        # MLflow: eight finished runs, every metric step, every artifact byte, eight model versions
        os.environ.update(srv.client_env())
        try:
            client = MlflowClient(tracking_uri=srv.url, registry_uri=srv.url)  # not a registry pinned earlier
            experiments = client.search_experiments(filter_string=f"name = '{EXPERIMENT}'")
            assert len(experiments) == 1
            exp = experiments[0]
            runs = client.search_runs([exp.experiment_id], max_results=100)
            assert len(runs) == N_WORKERS and {r.info.status for r in runs} == {"FINISHED"}
            by_seed = {int(r.data.tags["crossalign.seed"]): r for r in runs}
            assert sorted(by_seed) == list(range(N_WORKERS))
            versions = {v.run_id: v for v in client.search_model_versions(f"name='{MODEL}'")}
            assert len(versions) == N_WORKERS and len({v.version for v in versions.values()}) == N_WORKERS
            for i, run in by_seed.items():
                assert run.data.tags["crossalign.host"] == f"host-{i}"
                for name in METRICS:
                    history = client.get_metric_history(run.info.run_id, f"epoch/{name}")
                    assert sorted((m.step, m.value) for m in history) == [
                        (e, expected_metric(i, e, name)) for e in range(1, EPOCHS + 1)], (i, name)
                assert run.data.metrics["best_val_rsum"] == expected_metric(i, EPOCHS, "val_rsum")
                stored = tmp_path / "mlflow" / "artifacts" / exp.experiment_id / run.info.run_id / "artifacts"
                assert (stored / "checkpoint" / "blob.bin").read_bytes() == expected_bytes(i, "blob")
                assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint", "loss_curve.png"}
                assert versions[run.info.run_id].version == run.data.tags["registered_version"]
        finally:
            for key in srv.client_env():
                os.environ.pop(key, None)

    # DVC: the orchestrator writes the eight hand-backs once; a fresh clone pulls every out intact
    fresh = clones[N_WORKERS]
    for i, result in enumerate(results):
        (fresh / "outs").mkdir(exist_ok=True)
        (fresh / "outs" / f"part-{i}.bin.dvc").write_text(result["dvc"])
    subprocess.run([DVC, "pull", "-q"], cwd=fresh, check=True, env=env, capture_output=True)
    for i in range(N_WORKERS):
        pulled = (fresh / "outs" / f"part-{i}.bin").read_bytes()
        assert hashlib.md5(pulled).hexdigest() == hashlib.md5(expected_bytes(i, "out")).hexdigest()
    status = subprocess.run([DVC, "status", "--json"], cwd=fresh, check=True, env=env, capture_output=True, text=True)
    assert json.loads(status.stdout) == {}
    assert sum(1 for p in remote.rglob("*") if p.is_file()) == N_WORKERS  # one object per out, none lost


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
