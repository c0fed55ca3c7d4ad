"""The COCO caption format shared by every dataset builder: read (with pycocotools, checked),
split by a seeded carve-out, write ``annotations/captions_<split>.json``, place image files.

Schema (official): ``{"info": {...}, "licenses": [...], "images": [{"id", "file_name", "width",
"height", "license", ...}], "annotations": [{"id", "image_id", "caption"}]}``. Records are passed
through untouched, bad ones included (an annotation pointing at no image, an empty caption): the
preprocess stage reports them. Only a file that is not this format at all is an error here.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from crossalign.io import write_json

SPLITS = ("train", "val", "test")
IMAGE_KEYS = ("id", "file_name")
ANNOTATION_KEYS = ("id", "image_id", "caption")


def caption_file(images: list[dict], annotations: list[dict], info: dict | None = None,
                 licenses: list | None = None) -> dict[str, Any]:
    """A caption file in the official key order."""
    return {"info": info or {}, "licenses": licenses or [], "images": images, "annotations": annotations}


def caption_path(out: Path, split: str) -> Path:
    return Path(out) / "annotations" / f"captions_{split}.json"


def write_captions(out: Path, split: str, data: dict[str, Any]) -> Path:
    """Write ``out/annotations/captions_<split>.json`` atomically."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    path = caption_path(out, split)
    write_json(path, data)
    return path


def split_leaks(parts: dict[str, dict[str, Any]]) -> list[str]:
    """Every image id or ``file_name`` found in more than one split, described (e.g. ``"image id 42
    (000000000042.jpg) in train and test"``); empty when the splits are disjoint. An image in two
    splits would be trained on and tested on: the test numbers would not measure retrieval of
    unseen images."""
    where_id: dict[Any, list[str]] = {}
    where_file: dict[str, list[str]] = {}
    names: dict[Any, str] = {}
    for split, part in parts.items():
        for img in part.get("images", []):
            if split not in where_id.setdefault(img.get("id"), []):
                where_id[img.get("id")].append(split)
            names.setdefault(img.get("id"), str(img.get("file_name")))
            name = img.get("file_name")
            if isinstance(name, str) and split not in where_file.setdefault(name, []):
                where_file[name].append(split)
    leaks = [f"image id {i} ({names[i]}) in {' and '.join(s)}" for i, s in where_id.items() if len(s) > 1]
    leaks += [f"file {f} in {' and '.join(s)}" for f, s in where_file.items() if len(s) > 1]
    return leaks


def check_disjoint(parts: dict[str, dict[str, Any]], where: str) -> None:
    """Stop when an image is in two splits (by id or by file), naming the images (the first 10)
    and ``where`` the splits came from."""
    leaks = split_leaks(parts)
    if leaks:
        more = f" (and {len(leaks) - 10} more)" if len(leaks) > 10 else ""
        raise ValueError(f"{where}: {len(leaks)} image(s) in more than one split: {'; '.join(leaks[:10])}{more}; "
                         "each image (id and file) must belong to exactly one of train/val/test")


def write_splits(out: Path, parts: dict[str, dict[str, Any]], where: str) -> None:
    """:func:`check_disjoint`, then write every split's caption file."""
    check_disjoint(parts, where)
    for split, part in parts.items():
        write_captions(out, split, part)


def load_coco(path: Path) -> COCO:
    """Load a caption file with pycocotools, after checking it is one: JSON, an object with
    ``images`` and ``annotations`` lists whose records carry the keys the pipeline reads.
    Errors name the file, the key and, for a record, its position."""
    path = Path(path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected a COCO caption file") from None
    except AssertionError:
        raise ValueError(f"{path}: top level is not a JSON object; expected a COCO caption file "
                         "with 'images' and 'annotations'") from None
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: an annotation lacks key {err} (or is not an object); expected "
                         f"keys {list(ANNOTATION_KEYS)}") from None
    for key, required in (("images", IMAGE_KEYS), ("annotations", ANNOTATION_KEYS)):
        records = coco.dataset.get(key)
        if not isinstance(records, list):
            found = "missing" if records is None else f"a {type(records).__name__}"
            raise ValueError(f"{path}: key '{key}' is {found}; expected a list of records")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: {key}[{i}] is a {type(rec).__name__}, expected an object")
            missing = [k for k in required if k not in rec]
            if missing:
                raise ValueError(f"{path}: {key}[{i}] lacks key(s) {missing}; expected {list(required)}")
    return coco


def carve(ids: list[int], n_val: int, n_test: int, seed: int, where: str = "carve") -> dict[int, str]:
    """Assign each id to train/val/test: a seeded permutation of the *sorted* ids puts the first
    ``n_val`` in val, the next ``n_test`` in test, the rest in train (independent of file order)."""
    unique = sorted(set(ids))
    if n_val + n_test >= len(unique):
        raise ValueError(f"{where}: cannot carve {n_val} val + {n_test} test images out of {len(unique)}: "
                         "train would be empty")
    order = np.random.default_rng(seed).permutation(len(unique))
    split = {}
    for rank, j in enumerate(order):
        split[unique[j]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return split


def split_by(data: dict[str, Any], assignment: dict[int, str], default: str = "train") -> dict[str, dict]:
    """Split one caption file by image id; an annotation whose image is unknown goes to
    ``default`` (passed through for preprocess to report)."""
    parts = {s: caption_file([], [], data.get("info"), data.get("licenses")) for s in SPLITS}
    for img in data["images"]:
        parts[assignment.get(img["id"], default)]["images"].append(img)
    for ann in data["annotations"]:
        parts[assignment.get(ann["image_id"], default)]["annotations"].append(ann)
    return parts


def safe_relative(file_name: object) -> PurePosixPath | None:
    """``file_name`` as a relative path that stays inside the images folder, or None for one that
    does not (absolute, ``..``, a drive, not a string): such a record is passed through unlinked
    and the preprocess stage reports it."""
    if not isinstance(file_name, str) or not file_name:
        return None
    rel = PurePosixPath(file_name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or ":" in rel.parts[0]:
        return None
    return rel


def link_or_copy(src: Path, dst: Path) -> str:
    """Place ``src`` at ``dst`` by hard link, or by copy where a link is impossible (another file
    system, a file we may not link). Returns "link" or "copy"."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return "link"
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP):
            raise
    shutil.copy2(src, dst)
    return "copy"
