"""The preprocess stage: raw COCO-format captions + images -> ``data/prepared/<split>/``.

Reads ``<data.raw_dir>/<data.dataset>/`` (``images/<file_name>`` and
``annotations/captions_{train,val,test}.json``, official COCO caption schema) and writes, for each
split, the arrays documented in :mod:`crossalign.io` plus ``data/prepared/skipped.json``.

- Images are decoded by :func:`crossalign.preprocess.images.decode_image` in a process pool, in chunks, with
  at most ``preprocess.batch_size`` images in flight, and streamed into an
  ``np.lib.format.open_memmap`` file: the 118K-image COCO train split is never held in RAM.
- Captions are tokenised in batches by the fast tokenizer, truncated at ``max_length`` and stored
  without padding (flat ``tokens`` + ``offsets``).
- Bad input is never dropped silently. Every bad record (a missing, empty, truncated, oversized or
  non-image file; a malformed record; an annotation pointing at an unknown image; an empty or
  whitespace caption; an image left with no caption) is collected over all splits; then the stage
  either stops with one :class:`BadInputError` listing them and how to skip them (over
  :data:`MAX_LISTED`: the count per reason and the first ones; all of them in ``data/bad-input.txt``), or, with
  ``preprocess.on_bad_input: skip``, leaves them out and lists each one (and each caption dropped
  with its image) in ``skipped.json``.
- The whole ``data/prepared`` is built under a temporary name and renamed into place at the end
  (:func:`crossalign.io.atomic_dir`), so an interrupted or failed run leaves no half-written output.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import multiprocessing
import os
import signal
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from crossalign.preprocess import images as imagelib
from crossalign.preprocess import tokenize as toklib
from crossalign.config import Config, PreprocessParams
from crossalign.io import atomic_dir
from crossalign.preprocess.records import (BAD_LIST, BadInputError, BadRecord, SplitPlan, bad_input_error, by_split,
                                          read_split)

SPLITS = ("train", "val", "test")
PREPARED = Path("data/prepared")


def decode_chunk(task: tuple[str, int, list[str], int, str, int]) -> tuple[np.ndarray, dict[int, str]]:
    """Worker: decode a chunk of paths straight into rows ``start..`` of the ``.npy`` memmap at
    ``npy`` (no pixels travel through a pipe) -> (ok mask ``(n,)``, ``{position: reason}`` of
    the failures). Any decoder exception marks that file bad rather than crashing the stage."""
    npy, start, paths, size, resize, max_pixels = task
    rows = np.load(npy, mmap_mode="r+")  # (N, 3, S, S), shared page cache, no flush needed
    ok = np.zeros(len(paths), dtype=bool)
    reasons: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            rows[start + i] = imagelib.decode_image(path, size, resize, max_pixels)  # type: ignore[arg-type]
            ok[i] = True
        except imagelib.BadImage as err:
            reasons[i] = str(err)
        except Exception as err:  # noqa: BLE001 - a malformed file is bad input, not a crash
            reasons[i] = f"decoder error ({type(err).__name__}: {err})"
    del rows
    return ok, reasons


def ignore_interrupt() -> None:
    """Pool worker initializer: Ctrl-C is the parent's to handle (it stops the pool); a worker
    that took it too would print its own KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def pool_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where available, else ``spawn``: workers start from a clean interpreter, so a
    caller that has already run torch (OpenMP) or the Rust tokenizer threads cannot hand them a
    lock held by a thread that a plain ``fork`` would not copy (a known deadlock)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def ordered_map(fn: Callable, tasks: Iterable, pool: Any, window: int) -> Iterator:
    """``map(fn, tasks)`` in order; with a pool, at most ``window`` tasks in flight (bounds memory)."""
    if pool is None:
        yield from map(fn, tasks)
        return
    it = iter(tasks)
    pending = deque(pool.apply_async(fn, (t,)) for t in itertools.islice(it, window))
    while pending:
        result = pending.popleft().get()
        for task in itertools.islice(it, 1):
            pending.append(pool.apply_async(fn, (task,)))
        yield result


def truncate_npy(path: Path, rows: int) -> None:
    """Shrink a C-order ``.npy`` file to its first ``rows`` rows, in place when the new header has
    the same length (it nearly always has), else by copying rows into a new file."""
    with open(path, "r+b") as fh:
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fh))
        offset = fh.tell()
        header = io.BytesIO()
        new_shape = (int(rows), *shape[1:])
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran, "shape": new_shape})
        if version == (1, 0) and len(header.getvalue()) == offset and not fortran:
            fh.seek(0)
            fh.write(header.getvalue())
            fh.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
            return
    src = np.load(path, mmap_mode="r")
    tmp = path.with_name(path.name + ".shrink")
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=new_shape)
    for start in range(0, rows, 1024):
        dst[start:start + 1024] = src[start:min(rows, start + 1024)]
    dst.flush()
    del dst, src
    os.replace(tmp, path)


def compact_rows(path: Path, ok: np.ndarray, block: int = 256) -> int:
    """Move the rows flagged in ``ok`` to the front of the ``.npy`` file, in order, and cut the
    file to them -> their count. Runs of rows move in blocks, so memory stays bounded."""
    rows = np.load(path, mmap_mode="r+")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
    kept = 0
    for run_start, run_end in zip(edges[::2], edges[1::2]):
        for s in range(run_start, run_end, block):
            e = min(run_end, s + block)
            if s != kept:
                rows[kept:kept + e - s] = rows[s:e]
            kept += int(e - s)
    rows.flush()
    del rows
    truncate_npy(path, kept)
    return kept


def write_images(out: Path, plan: SplitPlan, params: PreprocessParams, pool: Any,
                 workers: int) -> tuple[list[int], list[BadRecord]]:
    """Decode ``plan.paths`` into ``out/images.npy`` (good images only, in order) ->
    (positions in ``plan.images`` that were kept, a :class:`BadRecord` per bad file).

    Workers write their rows straight into the memmap; at most ``batch_size`` images are in
    flight (``2 * workers`` chunks of ``batch_size / (2 * workers)``)."""
    n, size = len(plan.paths), params.image_size
    npy = out / "images.npy"
    if n == 0:
        np.save(npy, np.zeros((0, 3, size, size), dtype=np.uint8))
        return [], []
    np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(n, 3, size, size)).flush()  # (N, 3, S, S)
    chunk = params.batch_size if pool is None else max(1, math.ceil(params.batch_size / (2 * workers)))
    tasks = ((str(npy), s, list(map(str, plan.paths[s:s + chunk])), size, params.resize, params.max_pixels)
             for s in range(0, n, chunk))
    ok_all = np.zeros(n, dtype=bool)
    bad: list[BadRecord] = []
    start = 0
    with tqdm(total=n, desc=f"preprocess {plan.split}", unit="img", mininterval=1.0) as bar:
        for ok, reasons in ordered_map(decode_chunk, tasks, pool, 2 * workers):
            ok_all[start:start + len(ok)] = ok
            for i, reason in sorted(reasons.items()):
                rec = plan.images[start + i]
                bad.append(BadRecord(plan.split, "image", rec["id"], reason, rec["file_name"]))
            start += len(ok)
            bar.update(len(ok))
    if not ok_all.all():
        compact_rows(npy, ok_all)
    return np.flatnonzero(ok_all).tolist(), bad


def prepare_split(out: Path, plan: SplitPlan, params: PreprocessParams, tok: Any, pool: Any,
                  workers: int, meta: dict) -> tuple[list[BadRecord], list[BadRecord], int]:
    """Write one ``data/prepared/<split>/`` -> (bad image files, captions dropped with them,
    number of images written)."""
    out.mkdir(parents=True)
    kept, bad = write_images(out, plan, params, pool, workers)
    images = [plan.images[i] for i in kept]
    row = {rec["id"]: r for r, rec in enumerate(images)}
    dropped = [BadRecord(plan.split, "annotation", a["id"], f"its image {a['image_id']} is bad")
               for a in plan.annotations if a["image_id"] not in row]
    anns = [a for a in plan.annotations if a["image_id"] in row]
    tokens, offsets = toklib.tokenize(tok, [a["caption"] for a in anns], params.max_length)
    np.save(out / "image_ids.npy", np.array([rec["id"] for rec in images], dtype=np.int64))  # (N,)
    np.save(out / "tokens.npy", tokens)  # (T,) int32
    np.save(out / "offsets.npy", offsets)  # (M + 1,) int64
    np.save(out / "caption_image_index.npy", np.array([row[a["image_id"]] for a in anns], dtype=np.int64))
    np.save(out / "caption_ids.npy", np.array([a["id"] for a in anns], dtype=np.int64))  # (M,)
    (out / "images.json").write_text(json.dumps(images) + "\n")
    (out / "captions.json").write_text(json.dumps([a["caption"] for a in anns]) + "\n")
    split_meta = {**meta, "split": plan.split, "n_images": len(images), "n_captions": len(anns),
                  "n_tokens": int(tokens.size)}
    (out / "meta.json").write_text(json.dumps(split_meta, indent=2) + "\n")
    return bad, dropped, len(images)


def run(cfg: Config, root: Path) -> Path:
    """Preprocess ``root/<data.raw_dir>/<data.dataset>`` into ``root/data/prepared``; returns it."""
    params = cfg.preprocess
    raw = Path(root) / cfg.data.raw_dir / cfg.data.dataset
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: raw dataset not found; run the data stage first (python -m tasks.data)")
    plans = [read_split(raw, split) for split in SPLITS]
    workers = params.workers or os.cpu_count() or 1
    bad: list[BadRecord] = [b for p in plans for b in p.bad]
    dropped: list[BadRecord] = []
    meta = {"dataset": cfg.data.dataset, "image_size": params.image_size, "resize": params.resize,
            "resample": imagelib.RESAMPLE_NAME, "alpha": imagelib.ALPHA_POLICY, "jpeg_draft": True,
            "max_length": params.max_length}
    target = Path(root) / PREPARED
    full_list = Path(root) / BAD_LIST
    full_list.unlink(missing_ok=True)  # a list from an earlier failed run would mislead
    pool = pool_context().Pool(workers, ignore_interrupt) if workers > 1 else None
    try:
        tok = toklib.load_tokenizer(params.tokenizer)
        meta.update(toklib.tokenizer_meta(tok, params.tokenizer))
        with atomic_dir(target) as tmp:
            empty = []
            for plan in plans:
                split_bad, split_dropped, n_images = prepare_split(tmp / plan.split, plan, params, tok,
                                                                   pool, workers, meta)
                bad.extend(split_bad)
                dropped.extend(split_dropped)
                if n_images == 0:
                    empty.append(plan.split)
            if bad and params.on_bad_input == "error":
                raise bad_input_error(raw, bad, full_list)
            if empty:
                prefix = f"preprocess: no usable image left in split(s) {empty} of {raw}"
                if bad:
                    raise bad_input_error(raw, bad, full_list, prefix + "\n")
                raise BadInputError(prefix)
            (tmp / "skipped.json").write_text(json.dumps([asdict(b) for b in by_split(bad + dropped)], indent=1) + "\n")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return target
