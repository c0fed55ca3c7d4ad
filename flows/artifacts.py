"""What a ``compare-aligners`` run shows in the Prefect UI: the leaderboard (from
``reports/selection.json``, written by ``select``) as a narrow markdown table with the champion
named and in bold, the stage outcomes as a table, and a markdown summary (the effective
parameters, any failure, and the head of ``reports/comparison.md``).

The pure functions (``leaderboard_rows``, ``leaderboard_markdown``, ``summary_markdown``) are tested on their own;
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


# The leaderboard's columns: (heading, path in a reports/selection.json leaderboard record). Few and
# narrow, so the table fits the Prefect UI's artifact pane; the rest is in reports/comparison.md.
COLUMNS = (("val RSUM", ("val_rsum",)), ("test RSUM", ("test", "rsum")), ("R@1 i2t", ("test", "i2t_r1")),
           ("R@1 t2i", ("test", "t2i_r1")), ("binding %", ("binding_probe", "mean")))


def _get(record: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        record = record.get(key) if isinstance(record, dict) else None
    return record


def _cell(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return "" if value is None else value
    return round(float(value), 1) if isinstance(value, (int, float)) else value


def leaderboard_rows(selection: dict[str, Any]) -> list[dict[str, Any]]:
    """``selection["leaderboard"]`` (a list of per-method records, best first, or a ``{method:
    record}`` mapping) as compact rows: rank, method, :data:`COLUMNS` (one decimal; blank where a
    record lacks the value), seeds, and "champion" on the champion's row."""
    board = selection.get("leaderboard")
    if board is None:
        raise ValueError(f"{SELECTION}: no 'leaderboard' key (keys: {sorted(selection)})")
    records = [{"method": m, **r} for m, r in board.items()] if isinstance(board, dict) else list(board)
    champion = selection.get("champion")
    rows = []
    for rank, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ValueError(f"{SELECTION}: leaderboard entry {record!r} is not a mapping")
        role = "champion" if record.get("method") == champion else "control" if record.get("control") else ""
        row = {"rank": rank, "method": record.get("method"), "role": role}
        row.update({name: _cell(_get(record, path)) for name, path in COLUMNS})
        row["seeds"] = len(record["seeds"]) if isinstance(record.get("seeds"), list) else ""
        rows.append(row)
    return rows


def leaderboard_markdown(selection: dict[str, Any]) -> str:
    """The leaderboard artifact: the champion named first, then the compact table with the
    champion's row in bold."""
    rows = leaderboard_rows(selection)
    champion = next((r for r in rows if r["role"] == "champion"), None)
    lines = [f"Champion: **{champion['method']}** (best validation RSUM"
             + (f", {champion['val RSUM']}" if champion["val RSUM"] != "" else "") + "); test columns are "
             "reported, never used to choose." if champion else "No champion.", ""]
    heads = ["rank", "method", *(name for name, _ in COLUMNS), "seeds"]
    lines += ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        name = f"**{r['method']}** (champion)" if r["role"] == "champion" else \
            f"{r['method']} (control)" if r["role"] == "control" else str(r["method"])
        cells = [str(r["rank"]), name, *(str(r[h]) for h in heads[2:])]
        lines.append("| " + " | ".join(f"**{c}**" if r["role"] == "champion" and i != 1 and c else c
                                      for i, c in enumerate(cells)) + " |")
    lines += ["", f"Every metric, the gains with their CIs, the binding probe and the figures: {REPORT}."]
    return "\n".join(lines)


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
        create_markdown_artifact(key="crossalign-leaderboard", markdown=leaderboard_markdown(selection),
                                 description=f"Leaderboard from {SELECTION}; champion: {selection.get('champion')}")
    create_table_artifact(key="crossalign-stages",
                          table=[{k: r[k] for k in ("stage", "outcome", "seconds", "gpu")} for r in stages],
                          description="DVC stages of this run: ran, skipped (up to date), failed or not run")
    create_markdown_artifact(key="crossalign-summary",
                             markdown=summary_markdown(effective, stages, failure,
                                                       _read_head(root / REPORT, REPORT_HEAD_LINES), seconds),
                             description="compare-aligners run summary and the head of reports/comparison.md")
    return selection
