"""``coco-folder``: any folder in COCO caption format, loaded with pycocotools.

Accepted layouts (``data.folder`` relative to the repository root, or absolute):

* ``[annotations/]captions_{train,val,test}.json``: the three splits, used as they are;
* one caption file (``[annotations/]captions_*.json``, or the only ``*.json``), e.g. the shared
  sample's ``annotations/captions_train2017.json``: val and test are carved out with
  ``data.val_fraction`` / ``data.test_fraction`` and ``data.seed``.

Images are looked up as ``<dir>/<file_name>`` in ``images/``, the folder itself, then each other
sub-folder (``train2017/`` ...), and hard-linked (copied across file systems) to
``images/<file_name>``. Bad records are passed through for preprocess to report: an image file
that is missing, a file_name leaving the images folder (never looked up), an annotation pointing
at no image, an empty caption.
"""
from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from crossalign.config import DataParams
from crossalign.data import cocofmt

log = logging.getLogger(__name__)


def find_caption_files(folder: Path) -> dict[str, Path] | Path:
    """Either the three split files ``{split: path}`` or the single caption file to carve."""
    ann_dir = folder / "annotations" if (folder / "annotations").is_dir() else folder
    per_split = {s: ann_dir / f"captions_{s}.json" for s in cocofmt.SPLITS}
    if all(p.is_file() for p in per_split.values()):
        return per_split
    candidates = sorted(ann_dir.glob("captions_*.json")) or sorted(ann_dir.glob("*.json"))
    if len(candidates) == 1:
        return candidates[0]
    found = [p.name for p in candidates] or "no .json file"
    raise FileNotFoundError(f"{ann_dir}: found {found}; expected captions_train.json, captions_val.json and "
                            "captions_test.json, or a single COCO caption file to split")


def image_dirs(folder: Path) -> list[Path]:
    """Where images may lie, in lookup order."""
    dirs = [folder / "images", folder]
    dirs += sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in ("images", "annotations"))
    return [d for d in dirs if d.is_dir()]


def find_image(rel: PurePosixPath, dirs: list[Path]) -> Path | None:
    """The first ``<dir>/<rel>`` that is a file, in the order of ``dirs``; None when none is."""
    return next((d / rel for d in dirs if (d / rel).is_file()), None)


def place_images(images: list[dict], dirs: list[Path], out: Path) -> dict[str, int]:
    """Link every record's image to ``out/images/<file_name>``; counts of link/copy/missing
    (missing includes a file_name that would leave the images folder: never looked up)."""
    counts = {"link": 0, "copy": 0, "missing": 0}
    for rec in images:
        rel = cocofmt.safe_relative(rec["file_name"])
        if rel is None:
            counts["missing"] += 1
            continue
        dst = out / "images" / rel
        if dst.exists():
            continue
        src = find_image(rel, dirs)
        if src is None:
            counts["missing"] += 1
            continue
        counts[cocofmt.link_or_copy(src, dst)] += 1
    return counts


def build(data: DataParams, root: Path, out: Path) -> None:
    """``data`` stage builder for ``coco-folder``."""
    if not data.folder:
        raise ValueError("data.folder: required for dataset 'coco-folder'")
    folder = Path(data.folder) if Path(data.folder).is_absolute() else Path(root) / data.folder
    if not folder.is_dir():
        raise FileNotFoundError(f"data.folder = {data.folder!r}: {folder} is not a folder")
    files = find_caption_files(folder)
    if isinstance(files, dict):
        parts = {}
        for split, path in files.items():
            ds = cocofmt.load_coco(path).dataset
            parts[split] = cocofmt.caption_file(ds["images"], ds["annotations"], ds.get("info"),
                                                ds.get("licenses"))
    else:
        ds = cocofmt.load_coco(files).dataset
        n = len({img["id"] for img in ds["images"]})
        n_val, n_test = max(1, round(n * data.val_fraction)), max(1, round(n * data.test_fraction))
        assignment = cocofmt.carve([img["id"] for img in ds["images"]], n_val, n_test, data.seed, str(files))
        parts = cocofmt.split_by(ds, assignment)
    dirs = image_dirs(folder)
    total = {"link": 0, "copy": 0, "missing": 0}
    where = str(folder) if isinstance(files, dict) else str(files)
    cocofmt.check_disjoint(parts, where)  # before any image is placed
    for split, part in parts.items():
        counts = place_images(part["images"], dirs, out)
        total = {k: total[k] + counts[k] for k in total}
    cocofmt.write_splits(out, parts, where)
    log.info("coco-folder %s: %d images linked, %d copied, %d missing (passed through for preprocess to report)",
             folder, total["link"], total["copy"], total["missing"])
