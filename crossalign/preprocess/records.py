"""The preprocess stage's input records: each split's COCO caption file validated record by record
(no image opened yet), and the one error that lists every bad record and how to skip them.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

SPLITS = ("train", "val", "test")
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
