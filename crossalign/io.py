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
    text_tokens.npy       [T, Dt]      token states of all captions, concatenated, no padding
    text_offsets.npy      int64 [M + 1]  caption j's states are text_tokens[offsets[j]:offsets[j+1]]
                          (lengths = np.diff(offsets); offsets[0] = 0, offsets[M] = T)
    text_pooled.npy       [M, Dt]
    image_ids.npy, caption_image_index.npy, caption_ids.npy   copied from prepared
    meta.json             encoder names, input normalisation, dims, token layout
    format.json           {"format": "crossalign-features", "version": FEATURES_FORMAT}

Readers never pad a split: :meth:`PackedText.gather` reads a batch of captions and pads it to the
batch's own longest caption (zeros past each length). A split of another format version (or of none:
version 1 padded ``text_tokens.npy`` to ``[M, L, Dt]``) fails to load with a message naming the
version found, the one needed and the command that rebuilds it.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from crossalign import interrupt


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
        interrupt.check()  # an interrupt swallowed inside the block must not commit its output
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
        interrupt.check()  # an interrupt swallowed inside the block must not commit its output
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


def load_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (has the stage that writes it run?)")
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def drop_pages(array: np.ndarray) -> None:
    """Flush a memory-mapped array (if writable) and drop its pages from this process's resident
    set; the data stays in the file / page cache. A no-op for ordinary arrays."""
    mapping = getattr(array, "_mmap", None)
    if mapping is None or mapping.closed:
        return
    if array.flags.writeable:
        array.flush()
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def span_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row indices of the concatenated spans [starts[j], starts[j] + lengths[j]) -> (sum(lengths),)."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.cumsum(lengths) - lengths  # (B,) position of each span in the output
    return np.repeat(np.asarray(starts, np.int64) - first, lengths) + np.arange(total)  # (S,)


@dataclass
class PackedText:
    """Caption token states without padding: caption j is ``tokens[starts[j]:starts[j] + lengths[j]]``.

    ``tokens`` (T, Dt) is usually the memory-mapped ``text_tokens.npy``; ``starts`` / ``lengths``
    come from ``text_offsets.npy``. :meth:`select` makes a subset without touching token data.
    """

    tokens: np.ndarray  # (T, Dt) fp16
    starts: np.ndarray  # (M,) int64
    lengths: np.ndarray  # (M,) int32

    @classmethod
    def from_offsets(cls, tokens: np.ndarray, offsets: np.ndarray) -> "PackedText":
        offsets = np.asarray(offsets, np.int64)
        return cls(tokens, offsets[:-1], np.diff(offsets).astype(np.int32))

    @classmethod
    def from_padded(cls, padded: np.ndarray, lengths: np.ndarray) -> "PackedText":
        """Pack ``padded (M, L, Dt)`` (in memory) keeping ``lengths (M,)`` states per caption."""
        lengths = np.asarray(lengths, np.int32)
        mask = np.arange(padded.shape[1])[None, :] < lengths[:, None]  # (M, L)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return cls.from_offsets(np.asarray(padded)[mask], offsets)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[1])

    def select(self, rows) -> "PackedText":
        """The captions ``rows`` (index array or slice), sharing the token array."""
        return PackedText(self.tokens, self.starts[rows], self.lengths[rows])

    def gather(self, rows=slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Captions ``rows`` padded to their own longest -> (tokens (B, L, Dt) same dtype, lengths (B,)).

        Reads each caption's span once (from a memory map: only those pages); L >= 1."""
        starts, lengths = self.starts[rows], self.lengths[rows]
        width = max(int(lengths.max()) if len(lengths) else 0, 1)
        out = np.zeros((len(lengths), width, self.dim), self.tokens.dtype)  # (B, L, Dt)
        mask = np.arange(width)[None, :] < lengths[:, None]  # (B, L) row-major = span order
        out[mask] = self.tokens[span_index(starts, lengths)]
        return out, lengths

    def offsets(self) -> np.ndarray:
        """Offsets (M + 1,) of these captions packed back to back (as written to disk)."""
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])


@dataclass
class FeatureSplit:
    """The frozen-encoder features of one split, memory-mapped (see the module docstring)."""

    root: Path
    image_tokens: np.ndarray  # (N, R, Di) fp16
    image_pooled: np.ndarray  # (N, Di) fp16
    text: PackedText  # M captions, token states (T, Dt) fp16
    text_pooled: np.ndarray  # (M, Dt) fp16
    image_ids: np.ndarray  # (N,) int64
    caption_image_index: np.ndarray  # (M,) int64
    caption_ids: np.ndarray  # (M,) int64
    meta: dict

    @property
    def text_lengths(self) -> np.ndarray:  # (M,) int32
        return self.text.lengths

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

    def first_images(self, n: int) -> "FeatureSplit":
        """The first ``n`` images and their captions (the whole split when n is 0 or not below its
        size); no token data is copied."""
        if not n or n >= self.n_images:
            return self
        sub = self.select_captions(np.flatnonzero(np.asarray(self.caption_image_index) < n))  # (M',)
        sub.image_tokens, sub.image_pooled, sub.image_ids = self.image_tokens[:n], self.image_pooled[:n], self.image_ids[:n]
        return sub

    def select_captions(self, rows) -> "FeatureSplit":
        """The same images with only the captions ``rows`` (no token data copied)."""
        return FeatureSplit(root=self.root, meta=self.meta, image_tokens=self.image_tokens,
                            image_pooled=self.image_pooled, text=self.text.select(rows),
                            text_pooled=self.text_pooled[rows], image_ids=self.image_ids,
                            caption_image_index=self.caption_image_index[rows], caption_ids=self.caption_ids[rows])


FEATURE_ARRAYS = ("image_tokens", "image_pooled", "text_tokens", "text_offsets", "text_pooled",
                  "image_ids", "caption_image_index", "caption_ids")
RERUN = "rerun the features stage (`dvc repro features` or `python -m tasks.features`)"


TEXT_LAYERS_FILE = "text_layers.safetensors"  # training split: the trainable text layers' pretrained weights
FEATURES_FORMAT = 2  # 1: text_tokens padded [M, L, Dt] + text_lengths; 2: packed [T, Dt] + text_offsets
FORMAT_FILE = "format.json"


def check_format(root: Path) -> None:
    """Refuse a feature split whose ``format.json`` names another version (or that has none)."""
    path = root / FORMAT_FILE
    if not (root / "meta.json").exists():
        return  # not a feature split at all: the missing files are named by whoever reads them
    found = read_json(path).get("version") if path.exists() else None
    if found != FEATURES_FORMAT:
        what = f"version {found}" if found is not None else "no format.json (version 1, padded captions)"
        raise ValueError(f"{root}: feature cache of {what}; this crossalign reads version {FEATURES_FORMAT}: {RERUN}")


def load_features(root: str | Path, mmap: bool = True) -> FeatureSplit:
    """Open ``data/features/<split>/``; checks shapes agree and names the file that does not."""
    root = Path(root)
    check_format(root)
    arrays = {name: load_npy(root / f"{name}.npy", mmap) for name in FEATURE_ARRAYS}
    meta = read_json(root / "meta.json")
    tokens, offsets = arrays.pop("text_tokens"), np.asarray(arrays.pop("text_offsets"), np.int64)
    if tokens.ndim != 2:
        raise ValueError(f"{root / 'text_tokens.npy'}: shape {list(tokens.shape)}, expected [T, Dt] "
                         f"(packed captions): {RERUN}")
    n, m = arrays["image_pooled"].shape[0], arrays["text_pooled"].shape[0]
    if offsets.shape != (m + 1,) or offsets[0] != 0 or offsets[-1] != tokens.shape[0] or (np.diff(offsets) < 0).any():
        raise ValueError(f"{root / 'text_offsets.npy'}: expected {m + 1} non-decreasing offsets from 0 to "
                         f"{tokens.shape[0]} (rows of text_tokens.npy), got shape {list(offsets.shape)}"
                         + (f" from {offsets[0]} to {offsets[-1]}" if offsets.size else ""))
    expect = {"image_tokens": n, "image_ids": n, "caption_image_index": m, "caption_ids": m}
    for name, rows in expect.items():
        if arrays[name].shape[0] != rows:
            raise ValueError(f"{root / (name + '.npy')}: {arrays[name].shape[0]} rows, expected {rows}")
    return FeatureSplit(root=root, meta=meta, text=PackedText.from_offsets(tokens, offsets), **arrays)


class FeatureWriter:
    """Streams one feature split into ``open_memmap`` files under ``root`` (a directory inside an
    :func:`atomic_dir`): images by row range, captions by row set into their packed spans.
    ``lengths (M,)`` fixes the offsets up front. Pages are dropped every ~``release`` bytes so
    memory is set by the batches, not the split."""

    def __init__(self, root: Path, n_images: int, regions: int, image_dim: int, lengths: np.ndarray,
                 text_dim: int, release: int = 64 << 20):
        from numpy.lib.format import open_memmap

        self.root, self.release, self._written = Path(root), release, 0
        self.root.mkdir(parents=True, exist_ok=True)
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))])  # (M + 1,)
        m, t = len(lengths), int(self.offsets[-1])
        self.image_tokens = open_memmap(self.root / "image_tokens.npy", "w+", np.float16, (n_images, regions, image_dim))
        self.image_pooled = open_memmap(self.root / "image_pooled.npy", "w+", np.float16, (n_images, image_dim))
        self.text_tokens = open_memmap(self.root / "text_tokens.npy", "w+", np.float16, (t, text_dim))
        self.text_pooled = open_memmap(self.root / "text_pooled.npy", "w+", np.float16, (m, text_dim))

    def _count(self, nbytes: int) -> None:
        self._written += nbytes
        if self._written >= self.release:
            self.drop()
            self._written = 0

    def drop(self) -> None:
        for array in (self.image_tokens, self.image_pooled, self.text_tokens, self.text_pooled):
            drop_pages(array)

    def write_images(self, start: int, tokens: np.ndarray, pooled: np.ndarray) -> None:
        """Rows start.. of image tokens (b, R, Di) and pooled (b, Di)."""
        self.image_tokens[start:start + len(tokens)] = tokens
        self.image_pooled[start:start + len(pooled)] = pooled
        self._count(tokens.nbytes + pooled.nbytes)

    def write_texts(self, rows: np.ndarray, states: np.ndarray, pooled: np.ndarray) -> None:
        """Captions ``rows (b,)``: states (b, l, Dt) padded (l >= each caption's length; the
        first ``length`` states of each are kept) and pooled (b, Dt)."""
        rows = np.asarray(rows, np.int64)
        starts, lengths = self.offsets[rows], np.diff(self.offsets)[rows]  # (b,), (b,)
        mask = np.arange(states.shape[1])[None, :] < lengths[:, None]  # (b, l)
        if len(rows) and (np.diff(rows) == 1).all():  # consecutive captions: one contiguous span
            self.text_tokens[starts[0]:starts[-1] + lengths[-1]] = states[mask]
        else:
            self.text_tokens[span_index(starts, lengths)] = states[mask]
        self.text_pooled[rows] = pooled
        self._count(int(lengths.sum()) * self.text_tokens.shape[1] * 2 + pooled.nbytes)

    def close(self, image_ids: np.ndarray, caption_image_index: np.ndarray, caption_ids: np.ndarray,
              meta: dict) -> None:
        """Flush the token files and write the small arrays and ``meta.json``."""
        for array in (self.image_tokens, self.image_pooled, self.text_tokens, self.text_pooled):
            array.flush()
            drop_pages(array)
        del self.image_tokens, self.image_pooled, self.text_tokens, self.text_pooled
        np.save(self.root / "text_offsets.npy", self.offsets)
        np.save(self.root / "image_ids.npy", np.asarray(image_ids, np.int64))
        np.save(self.root / "caption_image_index.npy", np.asarray(caption_image_index, np.int64))
        np.save(self.root / "caption_ids.npy", np.asarray(caption_ids, np.int64))
        (self.root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        (self.root / FORMAT_FILE).write_text(json.dumps({"format": "crossalign-features", "version": FEATURES_FORMAT}) + "\n")


def write_features(root: str | Path, *, image_tokens: np.ndarray, image_pooled: np.ndarray,
                   text_tokens: np.ndarray, text_pooled: np.ndarray, image_ids: np.ndarray,
                   caption_image_index: np.ndarray, caption_ids: np.ndarray, meta: dict,
                   text_lengths: np.ndarray | None = None, text_offsets: np.ndarray | None = None) -> None:
    """Write one feature split atomically from in-memory arrays (tests and small splits; the
    features stage and bench/scale.py stream through :class:`FeatureWriter`). Captions either
    packed (``text_tokens (T, Dt)`` + ``text_offsets``) or padded (``text_tokens (M, L, Dt)`` +
    ``text_lengths``: states past each length are dropped)."""
    if (text_lengths is None) == (text_offsets is None):
        raise ValueError("write_features: give text_lengths (padded [M, L, Dt] tokens) or text_offsets (packed [T, Dt])")
    packed = (PackedText.from_padded(text_tokens, text_lengths) if text_lengths is not None
              else PackedText.from_offsets(text_tokens, text_offsets))
    image_tokens = np.asarray(image_tokens)
    with atomic_dir(root) as tmp:
        writer = FeatureWriter(tmp, image_tokens.shape[0], image_tokens.shape[1], image_tokens.shape[2],
                               packed.lengths, packed.dim)
        writer.write_images(0, image_tokens.astype(np.float16), np.asarray(image_pooled).astype(np.float16))
        if len(packed):
            tokens, _ = packed.gather()
            writer.write_texts(np.arange(len(packed)), tokens.astype(np.float16),
                               np.asarray(text_pooled).astype(np.float16))
        writer.close(image_ids, caption_image_index, caption_ids, meta)
