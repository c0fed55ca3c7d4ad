"""``crossalign summary``: where to look after a run (``make run`` ends with it).

    crossalign summary --elapsed 582
    Finished in 9 min 42 s. Where to look:
    report:  reports/comparison.md (champion: joint)
    MLflow:  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db, then open
             http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=crossalign
    metrics: .venv/bin/dvc metrics show

With a tracking server (``tracking.tracking_uri: http(s)://...``) the runs address is the
server's own. The MLflow store is only read (nothing is created when it does not exist yet).
"""
from __future__ import annotations

import json
from pathlib import Path

from crossalign.config import Config

REPORT = Path("reports/comparison.md")
SELECTION = Path("reports/selection.json")
MLFLOW_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s default address


def elapsed_text(seconds: float) -> str:
    """``9 min 42 s`` (``1 h 02 min`` from an hour on, ``42 s`` under a minute)."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def lines(cfg: Config, root: Path, elapsed: float | None = None) -> list[str]:
    """The summary's lines: how long it took (when given), the report, the MLflow runs table, the metrics."""
    from crossalign.tracking import runs as tracking  # imports MLflow: only when the summary is printed

    root = Path(root)
    head = f"Finished in {elapsed_text(elapsed)}. Where to look:" if elapsed is not None else "Where to look:"
    champion = ""
    if (root / SELECTION).exists():
        champion = f" (champion: {json.loads((root / SELECTION).read_text()).get('champion')})"
    report = f"{REPORT}{champion}" if (root / REPORT).exists() else f"{REPORT} (not written yet: run the pipeline)"
    uri = cfg.tracking.tracking_uri
    exp = tracking.experiment_id(cfg, root)
    if uri.startswith(("http://", "https://")):
        mlflow = [tracking.runs_url(uri, exp or "<id>")]
    else:
        mlflow = [f".venv/bin/mlflow ui --backend-store-uri {uri}, then open",
                  "         " + tracking.runs_url(MLFLOW_UI, exp or "<id>")]
    if exp is None:
        mlflow[-1] += f"   (no experiment {cfg.tracking.experiment!r} yet)"
    return [head, f"report:  {report}", f"MLflow:  {mlflow[0]}", *mlflow[1:], "metrics: .venv/bin/dvc metrics show"]
