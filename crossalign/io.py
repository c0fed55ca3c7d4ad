"""Atomic output and the on-disk contracts between stages.

A stage builds its output under a temporary sibling name and renames it into place at the end, so
an interrupted stage never leaves a half-written output that looks whole.

Contracts (all arrays are ``.npy`` files, memory-mappable with ``np.load(..., mmap_mode="r")``):

``data/prepared/<split>/`` (preprocess)
    images.npy            uint8  [N, 3, S, S]
    image_ids.npy         int64  [N]        COCO image ids, row order of images.npy
    images.json           list of the N image records (``id``, ``file_name`` and any extra keys
                          such as the synthetic ``twin_id`` / ``swap``)
    tokens.npy            int32  [T]        WordPiece ids of all captions, concatenated, no padding
    offsets.npy           int64  [M + 1]    caption j is tokens[offsets[j]:offsets[j+1]]
    caption_image_index.npy int64 [M]       row in images.npy of caption j's image
    caption_ids.npy       int64  [M]        COCO annotation ids
    captions.json         list of the M caption strings
    meta.json             image_size, resize, tokenizer, max_length, n_images, n_captions

``data/features/<split>/`` (features), fp16 unless noted
    image_tokens.npy      [N, R, Di]   grid / region tokens
    image_pooled.npy      [N, Di]
    text_tokens.npy       [M, L, Dt]   token states, zero past each caption's length
    text_lengths.npy      int32 [M]
    text_pooled.npy       [M, Dt]
    image_ids.npy, caption_image_index.npy, caption_ids.npy   copied from prepared
    meta.json             encoder names, input normalisation, dims, token layout
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = _tmp_sibling(path)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file that replaces ``path`` (by ``os.replace``) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (sorted keys off, 2-space indent)."""
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (has the stage that writes it run?)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` atomically."""
    with atomic_file(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))


def load_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (has the stage that writes it run?)")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


@dataclass
class FeatureSplit:
    """The frozen-encoder features of one split, memory-mapped (see the module docstring)."""

    root: Path
    image_tokens: np.ndarray  # (N, R, Di) fp16
    image_pooled: np.ndarray  # (N, Di) fp16
    text_tokens: np.ndarray  # (M, L, Dt) fp16
    text_lengths: np.ndarray  # (M,) int32
    text_pooled: np.ndarray  # (M, Dt) fp16
    image_ids: np.ndarray  # (N,) int64
    caption_image_index: np.ndarray  # (M,) int64
    caption_ids: np.ndarray  # (M,) int64
    meta: dict

    @property
    def n_images(self) -> int:
        return int(self.image_pooled.shape[0])

    @property
    def n_captions(self) -> int:
        return int(self.text_pooled.shape[0])

    @property
    def image_dim(self) -> int:
        return int(self.image_pooled.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text_pooled.shape[1])


FEATURE_ARRAYS = ("image_tokens", "image_pooled", "text_tokens", "text_lengths", "text_pooled",
                  "image_ids", "caption_image_index", "caption_ids")


def load_features(root: str | Path, mmap: bool = True) -> FeatureSplit:
    """Open ``data/features/<split>/``; checks shapes agree and names the file that does not."""
    root = Path(root)
    arrays = {name: load_npy(root / f"{name}.npy", mmap) for name in FEATURE_ARRAYS}
    meta = read_json(root / "meta.json")
    n, m = arrays["image_pooled"].shape[0], arrays["text_pooled"].shape[0]
    expect = {"image_tokens": n, "image_ids": n, "text_tokens": m, "text_lengths": m,
              "caption_image_index": m, "caption_ids": m}
    for name, rows in expect.items():
        if arrays[name].shape[0] != rows:
            raise ValueError(f"{root / (name + '.npy')}: {arrays[name].shape[0]} rows, expected {rows}")
    return FeatureSplit(root=root, meta=meta, **arrays)


def write_features(root: str | Path, *, image_tokens: np.ndarray, image_pooled: np.ndarray,
                   text_tokens: np.ndarray, text_lengths: np.ndarray, text_pooled: np.ndarray,
                   image_ids: np.ndarray, caption_image_index: np.ndarray, caption_ids: np.ndarray,
                   meta: dict) -> None:
    """Write one feature split atomically (used by tests and small splits; the features stage
    streams into ``np.lib.format.open_memmap`` files inside an :func:`atomic_dir`)."""
    with atomic_dir(root) as tmp:
        np.save(tmp / "image_tokens.npy", image_tokens.astype(np.float16))
        np.save(tmp / "image_pooled.npy", image_pooled.astype(np.float16))
        np.save(tmp / "text_tokens.npy", text_tokens.astype(np.float16))
        np.save(tmp / "text_lengths.npy", text_lengths.astype(np.int32))
        np.save(tmp / "text_pooled.npy", text_pooled.astype(np.float16))
        np.save(tmp / "image_ids.npy", image_ids.astype(np.int64))
        np.save(tmp / "caption_image_index.npy", caption_image_index.astype(np.int64))
        np.save(tmp / "caption_ids.npy", caption_ids.astype(np.int64))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
