"""Training batches gathered from a feature split's fp16 arrays, never a float32 copy of the split.

A batch is a set of caption rows; each pair is (image of caption c, caption c). Two placements
(``train.placement``) hold the same numbers, so a CPU run gives bit-identical batches either way
(fp16 -> fp32 widening is exact):

- ``device``: the split in fp16 on the training device (RAM on the CPU, GPU memory on CUDA);
  a batch is gathered there, then widened to float32.
- ``stream``: nothing of the split is held; each batch's image rows (sorted, so adjacent rows are
  read in one call) and caption spans are read from the ``.npy`` files with positioned reads
  (:class:`crossalign.train.rows.NpyRows`, no memory map, so the resident set stays at the batch) on a
  prefetch thread, into pinned host buffers on CUDA, copied without blocking.
- ``auto``: ``device`` when the arrays the method reads fit with headroom (CUDA: a share of the
  free GPU memory; CPU: a share of the available RAM), else ``stream``.

Methods that do not read tokens (``Aligner.reads_tokens = False``: ``contrastive``,
``concat_mlp``) get empty token tensors, so they neither hold nor read the token arrays.

Binding negatives: with ``twin_caption`` (``train.twin_negatives`` on a split with
twins) each caption is followed in the epoch's order by its twin's same-plan caption
(:func:`pair_twins`), and every batch says where each pair's twin pair is (``Batch.twin``); with
``hard`` and ``caption_negatives`` k, each batch carries up to k perturbed captions per pair,
read from the ``neg_text_*`` arrays (:mod:`crossalign.features.hardneg`) the same way in both placements.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import psutil
import torch

from crossalign.features.hardneg import HardNegatives
from crossalign.io import FeatureSplit, drop_pages, span_index
from crossalign.methods.base import Batch
from crossalign.train.rows import NpyRows

PLACEMENTS = ("auto", "device", "stream")
CUDA_SHARE = 0.7  # auto: the split may take this share of the free GPU memory (model + activations need the rest)
RAM_SHARE = 0.5  # auto on the CPU: this share of the available RAM
PREFETCH = 2  # streamed batches read ahead


def held_bytes(split: FeatureSplit, tokens: bool) -> int:
    """Bytes of the arrays a ``device`` placement holds (pooled, plus token states when read)."""
    arrays = [split.image_pooled, split.text_pooled]
    total = sum(a.nbytes for a in arrays)
    if tokens:
        total += split.image_tokens.nbytes + int(split.text.lengths.sum()) * split.text.dim * split.text.tokens.itemsize
    return int(total)


def choose_placement(placement: str, split: FeatureSplit, device: torch.device, tokens: bool) -> str:
    """Resolve ``auto`` to ``device`` or ``stream`` (see the module docstring)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"train.placement = {placement!r}: expected one of {list(PLACEMENTS)}")
    if placement != "auto":
        return placement
    need = held_bytes(split, tokens)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return "device" if need <= CUDA_SHARE * free else "stream"
    return "device" if need <= RAM_SHARE * psutil.virtual_memory().available else "stream"


def _pad(flat: torch.Tensor, starts: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption states in ``flat (S + 1, Dt)`` fp16 whose last row is zeros; caption b is
    ``flat[starts[b]:starts[b] + lengths[b]]`` -> float32 (B, L, Dt) zero-padded to the longest
    (L >= 1) by one gather (padding reads the zero row), and the mask (B, L)."""
    width = max(int(lengths.max()) if len(lengths) else 0, 1)
    pos = np.arange(width)[None, :]  # (1, L)
    valid = pos < lengths[:, None]  # (B, L)
    index = np.where(valid, starts[:, None] + pos, flat.shape[0] - 1)  # (B, L)
    out = flat[torch.from_numpy(index).to(flat.device)].float()  # (B, L, Dt)
    return out, torch.from_numpy(valid).to(flat.device)


def twin_captions(caption_image: np.ndarray, twin_row: np.ndarray) -> np.ndarray | None:
    """(M,) int64: for each caption, the twin image's caption of the same rank among its image's
    captions (the synthetic twins' captions are rendered from the same plans, so rank k of one is
    rank k of the other with the binding swapped; modulo the twin's count); -1 without a twin.
    None when no image has a twin (nothing to pair)."""
    caption_image = np.asarray(caption_image, np.int64)
    twin_row = np.asarray(twin_row, np.int64)
    if not (twin_row >= 0).any():
        return None
    order = np.argsort(caption_image, kind="stable")  # captions grouped by image, row order kept
    counts = np.bincount(caption_image, minlength=len(twin_row))  # (N,)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # (N,) position of each image's first caption
    rank = np.empty(len(caption_image), np.int64)
    rank[order] = np.arange(len(caption_image)) - first[caption_image[order]]  # (M,) rank within its image
    twin = twin_row[caption_image]  # (M,)
    ok = (twin >= 0) & (counts[np.maximum(twin, 0)] > 0)
    safe = np.maximum(twin, 0)
    pos = first[safe] + rank % np.maximum(counts[safe], 1)
    return np.where(ok, order[np.minimum(pos, len(order) - 1)], -1)


def pair_twins(order: torch.Tensor, twin_caption: np.ndarray) -> torch.Tensor:
    """An epoch's caption order with each caption's twin caption moved right behind it (each
    caption still once), so twin pairs share a batch (a pair cut by a batch boundary is not)."""
    out, seen = [], np.zeros(len(twin_caption), bool)
    for c in order.tolist():
        if seen[c]:
            continue
        seen[c] = True
        out.append(c)
        t = int(twin_caption[c])
        if t >= 0 and not seen[t]:
            seen[t] = True
            out.append(t)
    return torch.tensor(out, dtype=order.dtype)


def twin_positions(rows: np.ndarray, twin_caption: np.ndarray | None) -> torch.Tensor | None:
    """(B,) long: batch position of each caption's twin caption, -1 when it is not in the batch."""
    if twin_caption is None:
        return None
    where = {int(r): b for b, r in enumerate(rows)}
    return torch.tensor([where.get(int(twin_caption[r]), -1) for r in rows], dtype=torch.long)


def caption_negatives(hard: HardNegatives | None, k: int, rows: np.ndarray, device: torch.device) -> dict:
    """Batch fields of up to ``k`` perturbed captions per caption ``rows`` (their first k), read
    from ``hard``'s arrays: tokens (Bn, Ln, Dt) float32, mask, pooled (Bn, Dt), owner (Bn,)."""
    if hard is None or k <= 0:
        return {}
    picks = [p[:k] for p in hard.for_captions(rows)]
    neg = np.concatenate(picks) if picks else np.zeros(0, np.int64)  # (Bn,)
    owner = np.repeat(np.arange(len(rows)), [len(p) for p in picks])  # (Bn,)
    if neg.size == 0:
        return {}
    tokens, lengths = hard.text.gather(neg)  # (Bn, Ln, Dt) fp16, (Bn,)
    pooled = np.array(hard.pooled[neg])  # (Bn, Dt): a copy, so the mapped pages can go
    drop_pages(hard.tokens)  # the mapped pages read for this batch leave the resident set: memory
    drop_pages(hard.pooled)  # stays bounded by a batch, not by the steps taken
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]  # (Bn, Ln)
    return {"neg_text_tokens": torch.from_numpy(tokens).to(device).float(),
            "neg_text_mask": torch.from_numpy(mask).to(device),
            "neg_text_pooled": torch.from_numpy(pooled).to(device).float(),
            "neg_owner": torch.from_numpy(owner.astype(np.int64)).to(device)}


def _empty_tokens(b: int, split: FeatureSplit, device: torch.device) -> dict[str, torch.Tensor]:
    return {"image_tokens": torch.zeros(b, 0, split.image_tokens.shape[-1], device=device),  # (B, 0, Di)
            "text_tokens": torch.zeros(b, 0, split.text.dim, device=device),  # (B, 0, Dt)
            "text_mask": torch.zeros(b, 0, dtype=torch.bool, device=device)}  # (B, 0)


class BatchSource:
    """What both placements share: the split, the binding negatives, and how a batch is assembled
    from the rows a placement gathered (float32 on the device)."""

    placement = ""

    def __init__(self, split: FeatureSplit, device: torch.device, tokens: bool, twin_caption: np.ndarray | None = None,
                 hard: HardNegatives | None = None, caption_negatives: int = 0):
        self.split, self.device, self.tokens = split, device, tokens
        self.twin_caption, self.hard, self.caption_negatives = twin_caption, hard, caption_negatives

    def batch(self, captions: torch.Tensor) -> Batch:
        """Pairs for caption rows ``captions`` (B,) -> float32 Batch on the device."""
        raise NotImplementedError

    def _assemble(self, rows: np.ndarray, image_index: torch.Tensor, image_pooled: torch.Tensor,
                  text_pooled: torch.Tensor, tok: dict[str, torch.Tensor] | None) -> Batch:
        """The Batch of caption ``rows`` from gathered fp16 pooled rows and (token readers) token
        tensors; methods that read no tokens get empty ones. Adds the binding-negative fields."""
        if tok is None:
            tok = _empty_tokens(len(rows), self.split, self.device)
        out = caption_negatives(self.hard, self.caption_negatives, rows, self.device)
        twin = twin_positions(rows, self.twin_caption)
        if twin is not None:
            out["twin"] = twin.to(self.device)
        return Batch(image_pooled=image_pooled.float(), text_pooled=text_pooled.float(), image_index=image_index,
                     **tok, **out)


class DeviceSplit(BatchSource):
    """The split in fp16 on ``device``; batches gathered there."""

    placement = "device"

    def __init__(self, split: FeatureSplit, device: torch.device, tokens: bool, twin_caption: np.ndarray | None = None,
                 hard: HardNegatives | None = None, caption_negatives: int = 0):
        super().__init__(split, device, tokens, twin_caption, hard, caption_negatives)
        self.caption_image = torch.from_numpy(np.array(split.caption_image_index, np.int64)).to(device)  # (M,)
        self.image_pooled = _to_device(split.image_pooled, device)  # (N, Di) fp16
        self.text_pooled = _to_device(split.text_pooled, device)  # (M, Dt) fp16
        if tokens:
            self.image_tokens = _to_device(split.image_tokens, device)  # (N, R, Di) fp16
            # the captions' own spans, packed back to back in caption order: (T', Dt) fp16
            rows = span_index(split.text.starts, split.text.lengths)
            contiguous = rows.size == split.text.tokens.shape[0] and (rows.size == 0 or (rows == np.arange(rows.size)).all())
            self.text_tokens = _to_device(split.text.tokens if contiguous else split.text.tokens[rows], device,
                                          extra_zero_row=True)  # (T' + 1, Dt): the last row pads
            self.text_starts = np.concatenate([[0], np.cumsum(split.text.lengths[:-1], dtype=np.int64)])  # (M,)

    def batch(self, captions: torch.Tensor) -> Batch:
        rows = captions.numpy() if captions.device.type == "cpu" else captions.cpu().numpy()
        captions = captions.to(self.device)
        img = self.caption_image[captions]  # (B,)
        tok = None
        if self.tokens:
            text, mask = _pad(self.text_tokens, self.text_starts[rows], self.split.text.lengths[rows])  # (B, L, Dt), (B, L)
            tok = {"image_tokens": self.image_tokens[img].float(), "text_tokens": text, "text_mask": mask}
        return self._assemble(rows, img, self.image_pooled[img], self.text_pooled[captions], tok)


def _to_device(array: np.ndarray, device: torch.device, chunk_bytes: int = 256 << 20,
               extra_zero_row: bool = False) -> torch.Tensor:
    """An fp16 array (often a memory map) as a tensor on ``device``, copied in chunks whose mapped
    pages are dropped after each, so the copy is the only thing that stays resident; with
    ``extra_zero_row`` one row of zeros is appended."""
    out = torch.empty((array.shape[0] + extra_zero_row,) + tuple(array.shape[1:]), dtype=torch.float16, device=device)
    if extra_zero_row:
        out[-1] = 0
    rows = max(1, chunk_bytes // max(1, array[:1].nbytes))
    for s in range(0, array.shape[0], rows):
        chunk = torch.from_numpy(np.array(array[s:s + rows], dtype=np.float16))
        out[s:s + chunk.shape[0]] = chunk.to(device)
        drop_pages(array)
    return out


def _rows_of(array: np.ndarray) -> NpyRows | None:
    """A positioned-read view of the ``.npy`` file behind a memory map of the whole file, else None."""
    name = getattr(array, "filename", None)
    if name is None:
        return None
    reader = NpyRows(name)
    if reader.shape != array.shape or int(getattr(array, "offset", -1)) != reader.offset:
        reader.close()
        return None
    return reader


class StreamSplit(BatchSource):
    """Nothing of the split held: each batch read from the files (or indexed, for in-memory arrays)."""

    placement = "stream"

    def __init__(self, split: FeatureSplit, device: torch.device, tokens: bool, twin_caption: np.ndarray | None = None,
                 hard: HardNegatives | None = None, caption_negatives: int = 0):
        super().__init__(split, device, tokens, twin_caption, hard, caption_negatives)
        self.pin = device.type == "cuda"
        self.caption_image = np.asarray(split.caption_image_index, np.int64)  # (M,)
        self.readers = {name: _rows_of(getattr(split, name)) for name in ("image_pooled", "text_pooled")}
        if tokens:
            self.readers["image_tokens"] = _rows_of(split.image_tokens)
            self.readers["text_tokens"] = _rows_of(split.text.tokens)

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float16, pin_memory=self.pin)

    def _read(self, name: str, array: np.ndarray, starts: np.ndarray, counts: np.ndarray,
              extra_zero_row: bool = False) -> torch.Tensor:
        """Spans of ``array`` (sorted starts) concatenated -> fp16 tensor (sum(counts), ...) on the
        host (plus a last row of zeros with ``extra_zero_row``)."""
        total = int(counts.sum())
        out = self._buffer((total + extra_zero_row,) + tuple(array.shape[1:]))
        reader = self.readers.get(name)
        if reader is not None:
            reader.read_spans(starts, counts, out.numpy())
        else:
            out.numpy()[:total] = array[span_index(starts, counts)]
        if extra_zero_row:
            out[total:] = 0
        return out

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.pin)

    def batch(self, captions: torch.Tensor) -> Batch:
        rows = captions.cpu().numpy().astype(np.int64)  # (B,)
        img = self.caption_image[rows]  # (B,)
        uimg, inv_img = np.unique(img, return_inverse=True)  # sorted image rows, batch -> unique
        ones = np.ones(len(uimg), np.int64)
        urows, inv_cap = np.unique(rows, return_inverse=True)  # sorted caption rows
        inv_img, inv_cap = torch.from_numpy(inv_img.reshape(-1)), torch.from_numpy(inv_cap.reshape(-1))
        image_pooled = self._to(self._read("image_pooled", self.split.image_pooled, uimg, ones))[inv_img]  # (B, Di)
        text_pooled = self._to(self._read("text_pooled", self.split.text_pooled, urows, np.ones(len(urows), np.int64)))[inv_cap]
        tok = None
        if self.tokens:
            text = self.split.text
            lengths = text.lengths[urows].astype(np.int64)  # (U,)
            flat = self._read("text_tokens", text.tokens, text.starts[urows], lengths, extra_zero_row=True)  # (S + 1, Dt)
            starts = np.cumsum(lengths) - lengths  # (U,) each caption's first row in flat
            padded, mask = _pad(self._to(flat), starts, lengths)  # (U, L, Dt), (U, L)
            inv_dev = inv_cap.to(self.device)
            tok = {"image_tokens": self._to(self._read("image_tokens", self.split.image_tokens, uimg, ones))[
                       inv_img.to(self.device)].float(),  # (B, R, Di)
                   "text_tokens": padded[inv_dev], "text_mask": mask[inv_dev]}  # (B, L, Dt), (B, L)
        return self._assemble(rows, torch.from_numpy(img).to(self.device), image_pooled, text_pooled, tok)


def open_split(split: FeatureSplit, placement: str, device: torch.device, tokens: bool,
               twin_caption: np.ndarray | None = None, hard: HardNegatives | None = None,
               caption_negatives: int = 0) -> BatchSource:
    """A batch source for ``split`` with ``placement`` (``auto`` resolved here); binding negatives
    as the module docstring says (None / 0 = off: batches of the pairs alone)."""
    chosen = choose_placement(placement, split, device, tokens)
    return (DeviceSplit if chosen == "device" else StreamSplit)(split, device, tokens, twin_caption, hard,
                                                                caption_negatives)


def iterate(source: BatchSource, index: Iterable[torch.Tensor]) -> Iterator[Batch]:
    """Batches for each caption-row tensor of ``index``, in order; a streamed source reads
    :data:`PREFETCH` batches ahead on a thread while the caller trains on the current one."""
    if isinstance(source, DeviceSplit):
        for idx in index:
            yield source.batch(idx)
        return
    pending: list[Future] = []
    items = iter(index)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches") as pool:
        for idx in items:
            pending.append(pool.submit(source.batch, idx))
            if len(pending) > PREFETCH:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()
