"""The preprocess stage: raw COCO-format captions + images -> ``data/prepared/<split>/``.

Reads ``<data.raw_dir>/<data.dataset>/`` (``images/<file_name>`` and
``annotations/captions_{train,val,test}.json``, official COCO caption schema) and writes, for each
split, the arrays documented in :mod:`crossalign.io` plus ``data/prepared/skipped.json``.

- Images are decoded by :func:`crossalign.images.decode_image` in a process pool, in chunks, with
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
import re
import signal
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from crossalign import images as imagelib
from crossalign import tokenize as toklib
from crossalign.config import Config, PreprocessParams
from crossalign.io import atomic_dir

SPLITS = ("train", "val", "test")
PREPARED = Path("data/prepared")
BAD_LIST = Path("data/bad-input.txt")  # every bad record, when the error message lists only the first
MAX_LISTED = 20  # bad records an error message lists one by one


class BadInputError(ValueError):
    """Bad input records found with ``preprocess.on_bad_input: error``; the message lists them."""


@dataclass
class BadRecord:
    """One image or caption record left out, and why."""

    split: str
    kind: str  # "image" | "annotation"
    id: Any  # COCO id, or "#k" (position in the file) when the record has no usable id
    reason: str
    file_name: str | None = None

    def line(self) -> str:
        where = f" ({self.file_name})" if self.file_name else ""
        return f"  {self.split:<5} {self.kind} {self.id}{where}: {self.reason}"


@dataclass
class SplitPlan:
    """A split's well-formed records, before any pixel is decoded."""

    split: str
    images: list[dict] = field(default_factory=list)  # candidate image records, file order
    paths: list[Path] = field(default_factory=list)  # their files, same order
    annotations: list[dict] = field(default_factory=list)  # valid captions of candidate images
    bad: list[BadRecord] = field(default_factory=list)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _escapes(file_name: str) -> bool:
    parts = PurePosixPath(file_name.replace("\\", "/")).parts
    return file_name.startswith(("/", "\\")) or ".." in parts or (bool(parts) and ":" in parts[0])


def read_split(raw: Path, split: str) -> SplitPlan:
    """Validate ``annotations/captions_<split>.json`` record by record (no image is opened)."""
    ann_file = raw / "annotations" / f"captions_{split}.json"
    try:
        doc = json.loads(ann_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{ann_file}: not found; the data stage writes "
                                f"annotations/captions_{{train,val,test}}.json under {raw}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{ann_file}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise ValueError(f"{ann_file}: expected the COCO caption schema, an object with lists "
                         f"'images' and 'annotations'")
    plan = SplitPlan(split)
    records: dict[int, dict] = {}
    bad_images: set[int] = set()
    for k, rec in enumerate(doc["images"]):
        rid = rec.get("id") if isinstance(rec, dict) else None
        name = rec.get("file_name") if isinstance(rec, dict) else None
        label = rid if _is_id(rid) else f"#{k}"
        reason = None
        if not isinstance(rec, dict):
            reason = f"image record #{k} is not an object"
        elif not _is_id(rid):
            reason = f"image record #{k} has no integer 'id'"
        elif not isinstance(name, str) or not name.strip():
            reason = "no 'file_name'"
        elif _escapes(name):
            reason = "file_name escapes the images folder"
        elif rid in records or rid in bad_images:
            reason = "duplicate image id"
        if reason:
            plan.bad.append(BadRecord(split, "image", label, reason, name if isinstance(name, str) else None))
            if _is_id(rid) and rid not in records:
                bad_images.add(rid)
            continue
        records[rid] = rec
    n_captions: dict[int, int] = {rid: 0 for rid in records}
    valid: list[dict] = []
    n_bad_caps: dict[int, int] = {}
    seen_ann: set[int] = set()
    for k, ann in enumerate(doc["annotations"]):
        aid = ann.get("id") if isinstance(ann, dict) else None
        label = aid if _is_id(aid) else f"#{k}"
        img_id = ann.get("image_id") if isinstance(ann, dict) else None
        cap = ann.get("caption") if isinstance(ann, dict) else None
        reason = None
        if not isinstance(ann, dict):
            reason = f"annotation #{k} is not an object"
        elif not _is_id(aid):
            reason = f"annotation #{k} has no integer 'id'"
        elif aid in seen_ann:
            reason = "duplicate annotation id"
        elif img_id in bad_images:
            reason = f"its image record {img_id} is bad"
        elif not _is_id(img_id) or img_id not in records:
            reason = f"points at unknown image id {img_id!r}"
        elif not isinstance(cap, str):
            reason = f"caption is not a string ({type(cap).__name__})"
        elif not cap.strip():
            reason = "empty caption" if cap == "" else "whitespace-only caption"
        if _is_id(aid):
            seen_ann.add(aid)
        if reason:
            plan.bad.append(BadRecord(split, "annotation", label, reason))
            if _is_id(img_id) and img_id in records:
                n_bad_caps[img_id] = n_bad_caps.get(img_id, 0) + 1
            continue
        n_captions[img_id] += 1
        valid.append(ann)
    images_dir = raw / "images"
    for rid, rec in records.items():
        if not n_captions[rid]:
            bad_caps = n_bad_caps.get(rid, 0)
            why = f"no valid caption (its {bad_caps} captions are bad)" if bad_caps else "no caption"
            plan.bad.append(BadRecord(split, "image", rid, why, rec["file_name"]))
            continue
        plan.images.append(rec)
        plan.paths.append(images_dir / rec["file_name"])
    kept = {rec["id"] for rec in plan.images}
    plan.annotations = [a for a in valid if a["image_id"] in kept]
    return plan


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


def by_split(records: list[BadRecord]) -> list[BadRecord]:
    """Records grouped by split (train, val, test), file order kept within a split."""
    return sorted(records, key=lambda b: SPLITS.index(b.split))


def reason_kind(record: BadRecord) -> str:
    """A record's reason without its particulars (ids, sizes, decoder text), for counting:
    ``"points at unknown image id 9999"`` -> ``"annotation: points at unknown image id N"``."""
    reason = re.sub(r"\s*[(:].*$", "", record.reason)
    return f"{record.kind}: {re.sub(r'[0-9]+', 'N', reason)}"


def bad_input_message(raw: Path, bad: list[BadRecord], full_list: Path | None = None) -> str:
    """The stage's error: every bad record when there are at most :data:`MAX_LISTED`; else the
    count per reason, the first :data:`MAX_LISTED` and where the full list was written."""
    ordered = by_split(bad)
    lines = [f"preprocess: {len(bad)} bad input record(s) in {raw}:"]
    if len(bad) <= MAX_LISTED or full_list is None:
        lines += [b.line() for b in ordered]
    else:
        counts = Counter(reason_kind(b) for b in ordered)
        lines.append("  by reason:")
        lines += [f"  {n:>8}  {kind}" for kind, n in counts.most_common()]
        lines.append(f"  the first {MAX_LISTED}:")
        lines += [b.line() for b in ordered[:MAX_LISTED]]
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more: every record is listed in {full_list}")
    lines.append("Fix them, or skip them with `preprocess.on_bad_input: skip` in params.yaml "
                 "(each skipped record is then listed in data/prepared/skipped.json).")
    return "\n".join(lines)


def write_bad_list(path: Path, raw: Path, bad: list[BadRecord]) -> Path:
    """Every bad record, one line each, to ``path`` (the full list behind a shortened message)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# preprocess: {len(bad)} bad input record(s) in {raw}\n" + "".join(b.line() + "\n" for b in by_split(bad))
    path.write_text(text)
    return path


def bad_input_error(raw: Path, bad: list[BadRecord], full_list: Path, prefix: str = "") -> BadInputError:
    """The :class:`BadInputError` to raise: a long list goes to ``full_list`` and is shortened."""
    listed = write_bad_list(full_list, raw, bad) if len(bad) > MAX_LISTED else None
    return BadInputError(prefix + bad_input_message(raw, bad, listed))


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
