"""What a ``compare-aligners`` run shows in the Prefect UI: the leaderboard as a table artifact
(from ``reports/selection.json``, written by ``select``), the stage outcomes as a table, and a markdown summary (the
effective parameters, any failure, and the head of ``reports/comparison.md``).

The pure functions (``leaderboard_rows``, ``summary_markdown``) are tested on their own;
``publish`` only reads the files and calls Prefect.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

SELECTION = Path("reports/selection.json")  # champion + leaderboard (metrics/ holds numbers only)
REPORT = Path("reports/comparison.md")
REPORT_HEAD_LINES = 40


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, float):
        out[prefix] = round(value, 4)
    elif isinstance(value, (int, str, bool)) or value is None:
        out[prefix] = value
    else:  # lists (per-seed values, CIs): shown as text
        out[prefix] = json.dumps(value)


def leaderboard_rows(selection: dict[str, Any]) -> list[dict[str, Any]]:
    """``selection["leaderboard"]`` as flat table rows (nested keys dotted: ``test.rsum``), the
    champion marked. Accepts a list of per-method records or a ``{method: record}`` mapping."""
    board = selection.get("leaderboard")
    if board is None:
        raise ValueError(f"{SELECTION}: no 'leaderboard' key (keys: {sorted(selection)})")
    records = [{"method": m, **r} for m, r in board.items()] if isinstance(board, dict) else list(board)
    champion = selection.get("champion")
    rows = []
    for record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{SELECTION}: leaderboard entry {record!r} is not a mapping")
        row: dict[str, Any] = {}
        _flatten("", record, row)
        if champion is not None:
            row = {"champion": "*" if row.get("method") == champion else "", **row}
        rows.append(metrics_first(row))
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metrics_first(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` reordered for a table that fits a screen: champion mark and method, then every
    numeric column (the metrics) in file order, then other values, and long descriptive text
    (``protocol``, wherever a metrics file still carries it) last."""
    head = [k for k in ("champion", "method") if k in row]
    rest = [k for k in row if k not in head]
    last = [k for k in rest if k.rsplit(".", 1)[-1] == "protocol"]
    numbers = [k for k in rest if k not in last and _is_number(row[k])]
    other = [k for k in rest if k not in last and k not in numbers]
    return {k: row[k] for k in head + numbers + other + last}


def summary_markdown(effective: dict[str, Any], stages: list[dict[str, Any]], failure: str | None,
                     report_head: str | None, seconds: float) -> str:
    """The run's summary: outcome, parameters in effect, stages, and the report's head."""
    ran = sum(r["outcome"] == "ran" for r in stages)
    skipped = sum(r["outcome"] == "skipped" for r in stages)
    lines = ["# compare-aligners", "",
             f"**{'FAILED' if failure else 'Completed'}** in {seconds:.1f} s: {ran} stage(s) ran, "
             f"{skipped} up to date (skipped), {len(stages) - ran - skipped} failed or not run.", ""]
    if failure:
        lines += ["```", failure, "```", ""]
    lines += ["| parameter | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in effective.items()]
    lines += ["", "| stage | outcome | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['outcome']} | {r['seconds'] if r['seconds'] is not None else ''} |" for r in stages]
    lines += ["", f"## {REPORT}", ""]
    lines.append(report_head if report_head else f"_{REPORT} was not written._")
    return "\n".join(lines)


def _read_head(path: Path, n: int) -> str | None:
    if not path.exists():
        return None
    with open(path) as fh:
        return "".join(line for _, line in zip(range(n), fh)).rstrip()


def publish(root: Path, stages: list[dict[str, Any]], effective: dict[str, Any], failure: str | None,
            seconds: float) -> dict[str, Any] | None:
    """Create the run's artifacts; return the selection (``None`` when select has not written one)."""
    selection = None
    path = root / SELECTION
    if path.exists() and not failure:
        selection = json.loads(path.read_text())
        create_table_artifact(key="crossalign-leaderboard", table=leaderboard_rows(selection),
                              description=f"Leaderboard from {SELECTION}; champion: {selection.get('champion')}")
    create_table_artifact(key="crossalign-stages",
                          table=[{k: r[k] for k in ("stage", "outcome", "seconds", "gpu")} for r in stages],
                          description="DVC stages of this run: ran, skipped (up to date), failed or not run")
    create_markdown_artifact(key="crossalign-summary",
                             markdown=summary_markdown(effective, stages, failure,
                                                       _read_head(root / REPORT, REPORT_HEAD_LINES), seconds),
                             description="compare-aligners run summary and the head of reports/comparison.md")
    return selection
