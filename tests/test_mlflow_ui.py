"""The MLflow UI as a new user opens it, in headless Chromium against a real ``mlflow server`` on
127.0.0.1 (stopped by the test): the README's address shows the runs table with the metric
columns of the experiment's shared view. Skipped where Chromium is not installed (CI)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_features, tiny_config
from crossalign.evaluate import stage as evaluation
from crossalign.tracking import runs as tracking
from crossalign.train import tracker
from crossalign.train import stage as training
from eval_helpers import write_split_features
from servers import free_port, http_status, stop, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium")]


def test_readme_address_opens_the_runs_table_with_metric_columns(tmp_path):
    torch.set_num_threads(1)
    make_tiny_features(tmp_path / "data" / "features" / "train", n_images=48)
    write_split_features(tmp_path)
    cfg = tiny_config(tmp_path, train={"epochs": 2, "device": "cpu", "threads": 1})
    training.run(cfg, tmp_path, "contrastive", tracker_factory=tracker.MlflowTracker, log=lambda *a: None)
    evaluation.run(cfg, "contrastive", tmp_path)
    exp_id = tracking.setup(cfg, tmp_path)

    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", cfg.tracking.tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"})
    try:
        wait_until(lambda: http_status(f"http://127.0.0.1:{port}/health", timeout=2) == 200, 180, "mlflow server",
                   server, interval=1)
        url = (f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
               f"&viewStateShareKey={tracking.SHARED_VIEW_KEY}")
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,900",
                              "--virtual-time-budget=25000", f"--user-data-dir={tmp_path / 'chromium'}",
                              "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    finally:
        stop(server, grace=60)
    assert ">Runs<" in dom and "shared view" in dom  # the runs page, with the experiment's view applied
    for column in ("best_val_rsum", "eval_test_rsum", "best_epoch"):
        assert column in dom, column
