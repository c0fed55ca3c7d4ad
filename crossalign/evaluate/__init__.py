"""Stages ``evaluate@<method>`` and ``evaluate_control``: the COCO retrieval numbers of one model.

Reads ``models/<method>/final/``, ``data/features/{val,test}``, ``eval/test_index.json``.
Writes ``metrics/<method>.json`` and ``eval/<method>/`` (results with CIs, per-query ranks).
Entry: :func:`crossalign.evaluate.stage.run`; ``binding`` is the binding probe (twin images and
captions), ``swap`` the caption-swap probe (true caption vs its cached word swaps: any captions),
``ensemble`` the evaluation-only control that re-ranks one model's shortlist with another's matcher.
"""
