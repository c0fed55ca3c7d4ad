"""Stage ``features``: the frozen encoders' outputs, computed once and cached by DVC.

Reads ``data/prepared/<split>/`` and ``params.yaml:features``.
Writes ``data/features/<split>/`` (fp16 image grid tokens + pooled, caption token states packed
flat + offsets + pooled, binding negatives) and ``eval/test_index.json``.
Entry: :func:`crossalign.features.stage.run` (``python -m tasks.features``); ``encoders`` defines
the offline image and text encoders, ``perturb`` the word-swap captions, ``hardneg`` their cache,
``leaks`` the split checks run before anything is written.
"""
