"""How a comparison's stages ended, in one row each, and the flow's failure message: shared by the
single-host flow (flows/compare.py) and the distributed one (flows/dispatch.py)."""
from __future__ import annotations

from typing import Any

from prefect.futures import PrefectFuture, wait
from prefect.states import State


class StageFailed(RuntimeError):
    """A stage command exited non-zero; the message holds its last output lines."""


class PipelineFailed(RuntimeError):
    """Some stages failed or could not run; the message names them."""


def outcomes(futures: dict[str, PrefectFuture]) -> list[dict[str, Any]]:
    """One row per stage: outcome (ran / skipped / failed / not run) and the failure message."""
    wait(list(futures.values()))
    return [{**fut.result(), "message": ""} if fut.state.is_completed() else unfinished_row(name, fut)
            for name, fut in futures.items()]


def unfinished_row(name: str, fut: PrefectFuture) -> dict[str, Any]:
    """The outcome row of a stage whose future did not complete: failed (its error as the message)
    or not run (upstream failed)."""
    state: State = fut.state
    if state.is_failed() or state.is_crashed():
        try:
            fut.result()
            message = state.message or ""
        except Exception as err:  # noqa: BLE001 - the task's own error is the message
            message = str(err) or repr(err)
        return {"stage": name, "outcome": "failed", "seconds": None, "gpu": None, "message": message}
    return {"stage": name, "outcome": "not run", "seconds": None, "gpu": None,
            "message": state.message or f"upstream failed ({state.name})"}


def failure_message(rows: list[dict[str, Any]]) -> str | None:
    """The flow's failure message: the failed stages with their last output line, the skipped ones."""
    failed = [r for r in rows if r["outcome"] == "failed"]
    if not failed:
        return None
    lines = [f"{len(failed)} stage(s) failed: {', '.join(r['stage'] for r in failed)}"]
    for r in failed:
        last = [ln for ln in r["message"].splitlines() if ln.strip()]
        lines.append(f"  {r['stage']}: {last[-1] if last else 'failed'}")
    not_run = [r["stage"] for r in rows if r["outcome"] == "not run"]
    if not_run:
        lines.append(f"  not run (upstream failed): {', '.join(not_run)}")
    return "\n".join(lines)
