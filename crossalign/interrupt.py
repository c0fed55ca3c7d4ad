"""Ctrl-C that cannot be lost.

Python raises ``KeyboardInterrupt`` wherever the interpreter happens to be when SIGINT arrives. If
that is inside a garbage-collection callback or a ``__del__`` (SQLAlchemy registers weakref
callbacks, for one), the interpreter prints "Exception ignored in ..." and carries on as if nothing
happened: a stage would then finish its work and exit 0, writing the outputs of a run the user
stopped. :func:`install` keeps the usual ``KeyboardInterrupt`` and also remembers that the signal
came; :func:`check` raises it again at safe points (every training step, and before an atomic
write commits), so an interrupt swallowed once is raised at the next one, and the interpreter's
"Exception ignored" report of the swallowed one is left out (the stage says it was interrupted)."""
from __future__ import annotations

import signal
import sys
import threading

_pending = False
_unraisable = sys.unraisablehook


def _handler(signum: int, frame: object) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def _quiet_unraisable(unraisable) -> None:
    """The interpreter's report of an exception it could not raise ("Exception ignored in ...", with
    a traceback), less a ``KeyboardInterrupt`` this module remembered: it is raised again at the next
    safe point, and the stage reports the interruption itself, in one line."""
    if _pending and isinstance(unraisable.exc_value, KeyboardInterrupt):
        return
    _unraisable(unraisable)


def install() -> None:
    """Route SIGINT through the remembering handler (main thread only; elsewhere a no-op)."""
    global _pending
    _pending = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        sys.unraisablehook = _quiet_unraisable


def pending() -> bool:
    """True once SIGINT arrived in a process that :func:`install` ed the handler."""
    return _pending


def check() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived (even if its first raise was swallowed)."""
    if _pending:
        raise KeyboardInterrupt
