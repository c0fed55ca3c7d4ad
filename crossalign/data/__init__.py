"""Stage ``data``: the raw dataset in COCO caption format.

Reads ``params.yaml:data`` (and, for real COCO, the official downloads under ``data.coco``).
Writes ``<raw_dir>/<dataset>/``: ``images/`` + ``annotations/captions_{train,val,test}.json``.
Entry: :func:`crossalign.data.stage.run` (``python -m tasks.data``). Builders: ``synthetic``
(embedded, offline), ``coco`` (2017 / Karpathy, checksummed downloads), ``folder`` (any COCO-format
folder); ``cocofmt`` writes and validates the caption files.
"""
