"""Stage ``select``: the verdict.

Reads every ``metrics/<method>.json`` and ``eval/<method>/``, ``tuned/``, the MLflow runs.
Writes ``metrics/selection.json``, ``reports/`` (``comparison.md``, figures, ``selection.json``)
and moves the MLflow registry alias ``champion``. Entry: :func:`crossalign.select.stage.run`;
``report`` renders the report, ``costs`` measures what each method costs, ``search`` answers a
query with the champion (``crossalign search``).
"""
