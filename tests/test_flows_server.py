"""The scheduled deployment against a real Prefect server (``prefect server start`` on a free
127.0.0.1 port, PREFECT_HOME in tmp, always stopped): ``prefect deploy`` from prefect.yaml and
``python -m flows.serve`` both create a deployment whose cron the API returns; a run triggered on
the served one executes the real crossalign pipeline (tiny synthetic config, in a copy of the repo)
and completes, after which DVC finds everything up to date.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_config, dump_params
from servers import free_port, http_status, stop, wait_until

from crossalign import config

PREFECT = str(Path(sys.executable).parent / "prefect")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> dict[str, str]:
    """A real Prefect server; yields the environment that points clients at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_UI_ENABLED": "false"}
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/api/health", timeout=2) == 200, 120,
                   "prefect server", proc, interval=1)
        yield env
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the repo's tracked and new files (no data, no venv) with a tiny params.yaml."""
    root = tmp_path_factory.mktemp("crossalign")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in files + [".dvc/config", ".dvcignore"]:
        src = REPO / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / "params.yaml").write_text(dump_params(tiny_config(root)))
    return root


def _deployment(env: dict[str, str], name: str):
    """The deployment through the API (``None`` until it exists)."""
    code = ("from prefect.client.orchestration import get_client\n"
            "import json, sys\n"
            "with get_client(sync_client=True) as c:\n"
            f"    d = c.read_deployment_by_name({name!r})\n"
            "    print(json.dumps({'id': str(d.id), 'crons': [s.schedule.cron for s in d.schedules],\n"
            "                      'active': [s.active for s in d.schedules], 'pull': d.pull_steps,\n"
            "                      'parameters': d.parameters}))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prefect_yaml_deploys_with_its_cron(server, project):
    for pool in ("crossalign", "crossalign-gpu"):
        subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=server,
                       cwd=project, check=True, capture_output=True, text=True)
    env = {k: v for k, v in server.items() if k != "CROSSALIGN_CLONE"}
    out = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env={**env, "PWD": str(project)},
                         cwd=project, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    dep = _deployment(server, "compare-aligners/nightly")
    assert dep is not None and dep["crons"] == ["0 2 * * *"] and dep["active"] == [True]
    assert dep["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(project)
    # the stage deployment of the distributed mode: each worker resolves its own clone at run time
    stage = _deployment(server, "run-stage/gpu")
    assert stage is not None and stage["crons"] == []
    assert stage["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $CROSSALIGN_CLONE }}"


def test_served_deployment_runs_the_real_pipeline(server, project):
    serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--name", "served", "--cron", "*/30 * * * *",
                              "--root", str(project)], cwd=project, env=server, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dep = wait_until(lambda: _deployment(server, "compare-aligners/served"), 120, "served deployment", serve,
                         interval=1)
        assert dep["crons"] == ["*/30 * * * *"] and dep["parameters"]["root"] == str(project)
        code = ("from prefect.deployments import run_deployment\n"
                "from prefect.client.orchestration import get_client\n"
                "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId\n"
                f"r = run_deployment('compare-aligners/served', parameters={{'root': {str(project)!r}, "
                "'methods': ['concat_mlp', 'contrastive'], 'max_parallel': 2}, timeout=540, poll_interval=2)\n"
                "print('STATE', r.state.type.value, r.state.message)\n"
                "with get_client(sync_client=True) as c:\n"
                "    arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[r.id])))\n"
                "print('ARTIFACTS', sorted(a.key for a in arts))\n")
        out = subprocess.run([sys.executable, "-c", code], env=server, capture_output=True, text=True, timeout=600)
        assert "STATE COMPLETED" in out.stdout, out.stdout + out.stderr
        assert "ARTIFACTS ['crossalign-leaderboard', 'crossalign-stages', 'crossalign-summary']" in out.stdout
    finally:
        stop(serve)
    status = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status"], cwd=project,
                            capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout
    assert config.load(project / "params.yaml").train.methods == ["concat_mlp", "contrastive"]
    selection = json.loads((project / "reports" / "selection.json").read_text())
    assert selection["champion"] in ("concat_mlp", "contrastive")
    assert (project / "reports" / "comparison.md").exists()
