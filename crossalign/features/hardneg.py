"""Cached binding negatives of a feature split: twin rows and encoded perturbed captions.

The ``features`` stage writes, per ``data/features/<split>/`` :

    twin_row.npy          int64 [N]       row (in this split) of each image's binding twin, -1 if none
    neg_text_tokens.npy   fp16 [T', Dt]   perturbed captions' token states, packed like text_tokens
    neg_text_offsets.npy  int64 [P + 1]   perturbed caption p is neg_text_tokens[offsets[p]:offsets[p+1]]
    neg_text_pooled.npy   fp16 [P, Dt]
    neg_source.npy        int64 [P]       row of the real caption it was made from (ascending)
    neg_kind.npy          int8 [P]        kind code, names in meta.json ``perturbations.kinds``

:class:`NegTextWriter` streams the perturbed captions (same code path as the real ones:
``crossalign.features.stage.encode_texts``); :func:`load` opens them memory-mapped for training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossalign.io import PackedText, drop_pages, load_npy, read_json, span_index

NEG_ARRAYS = ("twin_row", "neg_text_tokens", "neg_text_offsets", "neg_text_pooled", "neg_source", "neg_kind")
RERUN = "rerun the features stage (`dvc repro features` or `python -m tasks.features`)"


def twin_row_array(records: list[dict], image_ids: np.ndarray) -> np.ndarray:
    """(N,) int64: the row of each image's ``twin_id`` in this split, -1 when it has none here."""
    row_of = {int(i): r for r, i in enumerate(image_ids)}
    out = np.full(len(image_ids), -1, np.int64)
    for r, record in enumerate(records):
        twin = record.get("twin_id")
        if twin is not None and row_of.get(int(twin), r) != r:
            out[r] = row_of[int(twin)]
    return out


class NegTextWriter:
    """Streams perturbed captions into ``neg_text_*.npy`` under ``root`` (packed like
    :class:`crossalign.io.FeatureWriter`'s captions): ``write_texts(rows, states, pooled)`` puts
    rows by their offsets; pages are dropped every ~``release`` bytes."""

    def __init__(self, root: Path, lengths: np.ndarray, text_dim: int, release: int = 64 << 20):
        from numpy.lib.format import open_memmap

        self.root, self.release, self._written = Path(root), release, 0
        self.root.mkdir(parents=True, exist_ok=True)
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))])  # (P + 1,)
        p, t = len(lengths), int(self.offsets[-1])
        if p:  # np.memmap cannot map an empty file
            self.tokens = open_memmap(self.root / "neg_text_tokens.npy", "w+", np.float16, (t, text_dim))
            self.pooled = open_memmap(self.root / "neg_text_pooled.npy", "w+", np.float16, (p, text_dim))
        else:
            self.tokens, self.pooled = np.zeros((0, text_dim), np.float16), np.zeros((0, text_dim), np.float16)

    def drop(self) -> None:
        for array in (self.tokens, self.pooled):
            drop_pages(array)

    def write_texts(self, rows: np.ndarray, states: np.ndarray, pooled: np.ndarray) -> None:
        """Perturbed captions ``rows (b,)``: states (b, l, Dt) padded, pooled (b, Dt)."""
        rows = np.asarray(rows, np.int64)
        starts, lengths = self.offsets[rows], np.diff(self.offsets)[rows]  # (b,), (b,)
        mask = np.arange(states.shape[1])[None, :] < lengths[:, None]  # (b, l)
        self.tokens[span_index(starts, lengths)] = states[mask]
        self.pooled[rows] = pooled
        self._written += int(lengths.sum()) * self.tokens.shape[1] * 2 + pooled.nbytes
        if self._written >= self.release:
            self.drop()
            self._written = 0

    def close(self, source: np.ndarray, kind: np.ndarray, twin_row: np.ndarray) -> None:
        """Flush the token files and write offsets, source, kind and twin_row."""
        if isinstance(self.tokens, np.memmap):
            for array in (self.tokens, self.pooled):
                array.flush()
                drop_pages(array)
        else:
            np.save(self.root / "neg_text_tokens.npy", self.tokens)
            np.save(self.root / "neg_text_pooled.npy", self.pooled)
        del self.tokens, self.pooled
        np.save(self.root / "neg_text_offsets.npy", self.offsets)
        np.save(self.root / "neg_source.npy", np.asarray(source, np.int64))
        np.save(self.root / "neg_kind.npy", np.asarray(kind, np.int8))
        np.save(self.root / "twin_row.npy", np.asarray(twin_row, np.int64))


@dataclass
class HardNegatives:
    """One split's binding negatives (see the module docstring); token arrays memory-mapped."""

    root: Path
    twin_row: np.ndarray  # (N,) int64, -1 = no twin
    tokens: np.ndarray  # (T', Dt) fp16 memmap
    offsets: np.ndarray  # (P + 1,) int64
    pooled: np.ndarray  # (P, Dt) fp16
    source: np.ndarray  # (P,) int64 ascending: real caption row of each perturbed caption
    kind: np.ndarray  # (P,) int8
    kinds: tuple[str, ...]  # kind names by code
    per_caption: int  # features.perturbations the split was written with

    def __len__(self) -> int:
        return int(self.source.shape[0])

    @property
    def text(self) -> PackedText:
        """The perturbed captions as :class:`PackedText` (``.gather(rows)`` pads a batch)."""
        return PackedText.from_offsets(self.tokens, self.offsets)

    def for_captions(self, rows: np.ndarray) -> list[np.ndarray]:
        """For each real caption row, the rows (into tokens/pooled/source/kind) of its perturbations."""
        rows = np.asarray(rows, np.int64)
        lo = np.searchsorted(self.source, rows, "left")  # (B,)
        hi = np.searchsorted(self.source, rows, "right")  # (B,)
        return [np.arange(a, b, dtype=np.int64) for a, b in zip(lo, hi)]


def load(split_dir: str | Path) -> HardNegatives:
    """Open ``data/features/<split>/``'s negatives; a split written without them (features written
    by hand, as in tests) fails naming the missing file and how to rebuild them."""
    root = Path(split_dir)
    for name in NEG_ARRAYS:
        if not (root / f"{name}.npy").exists():
            raise FileNotFoundError(f"{root / (name + '.npy')}: not found; this feature split has no binding "
                                    f"negatives: {RERUN}")
    meta = read_json(root / "meta.json")
    info = meta.get("perturbations")
    if not isinstance(info, dict) or not {"kinds", "per_caption", "count"} <= set(info):
        raise ValueError(f"{root / 'meta.json'}: no 'perturbations' {{kinds, per_caption, count}} entry: {RERUN}")
    arrays = {name: load_npy(root / f"{name}.npy") for name in NEG_ARRAYS}
    offsets = np.asarray(arrays["neg_text_offsets"], np.int64)
    source, kind = np.asarray(arrays["neg_source"], np.int64), np.asarray(arrays["neg_kind"], np.int8)
    tokens, pooled = arrays["neg_text_tokens"], arrays["neg_text_pooled"]
    p = int(info["count"])
    checks = {"neg_source": source.shape == (p,), "neg_kind": kind.shape == (p,),
              "neg_text_pooled": pooled.shape[0] == p,
              "twin_row": arrays["twin_row"].shape == (int(meta.get("n_images", arrays["twin_row"].shape[0])),),
              "neg_text_offsets": offsets.shape == (p + 1,) and offsets[0] == 0 and offsets[-1] == tokens.shape[0]}
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{root / (name + '.npy')}: shape {list(arrays[name].shape)} does not fit "
                             f"{p} perturbed captions and {meta.get('n_images')} images (meta.json), "
                             f"{tokens.shape[0]} token rows: {RERUN}")
    if p and (np.diff(source) < 0).any():
        raise ValueError(f"{root / 'neg_source.npy'}: not sorted ascending")
    if p and (kind.min() < 0 or kind.max() >= len(info["kinds"])):
        raise ValueError(f"{root / 'neg_kind.npy'}: codes outside 0..{len(info['kinds']) - 1}")
    return HardNegatives(root=root, twin_row=np.asarray(arrays["twin_row"], np.int64), tokens=tokens,
                         offsets=offsets, pooled=pooled, source=source, kind=kind,
                         kinds=tuple(info["kinds"]), per_caption=int(info["per_caption"]))


def write(root: str | Path, *, twin_row: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, pooled: np.ndarray,
          source: np.ndarray, kind: np.ndarray, per_caption: int, kinds: tuple[str, ...] | None = None) -> None:
    """Add in-memory negatives to an existing feature split ``root`` (tests, benches and tiny
    splits; the features stage streams through :class:`NegTextWriter`): the arrays of the module
    docstring, plus the meta.json ``perturbations`` entry."""
    from crossalign.io import write_json
    from crossalign.features.perturb import KINDS

    root = Path(root)
    offsets = np.asarray(offsets, np.int64)
    writer = NegTextWriter(root, np.diff(offsets), np.asarray(tokens).shape[1])
    if len(offsets) > 1:
        padded, _ = PackedText.from_offsets(np.asarray(tokens, np.float16), offsets).gather()
        writer.write_texts(np.arange(len(offsets) - 1), padded, np.asarray(pooled, np.float16))
    writer.close(source, kind, twin_row)
    meta = read_json(root / "meta.json")
    meta["perturbations"] = {"kinds": list(kinds or KINDS), "per_caption": int(per_caption), "count": len(offsets) - 1}
    write_json(root / "meta.json", meta)
