"""Stage ``preprocess``: decode, resize and tokenise the raw dataset once.

Reads ``data/raw/<dataset>/`` (COCO caption format) and ``params.yaml:preprocess``.
Writes ``data/prepared/<split>/``: uint8 image tensors ``[N,3,S,S]``, caption token ids + lengths,
the caption->image index, ``skipped.json`` (bad records and why).
Entry: :func:`crossalign.preprocess.stage.run` (``python -m tasks.preprocess``); ``records`` reads
and checks a split's records, ``images`` decodes any image mode, ``tokenize`` the captions.
"""
