"""``coco2017`` and ``coco-karpathy``: the official archives, downloaded, verified, extracted, and
converted to the stage's layout (``images/<file_name>`` + ``annotations/captions_<split>.json``).

* ``coco2017``: train = train2017 minus a seeded carve-out of ``coco.val_images`` images (val),
  test = val2017 (5,000 images). ``file_name`` gains its folder: ``train2017/000000391895.jpg``.
* ``coco-karpathy``: the Karpathy split of COCO 2014 from ``dataset_coco.json`` (train + restval
  = 113,287 train, 5,000 val, 5,000 test), images from train2014.zip / val2014.zip; caption ids
  are Karpathy's ``sentid``, image ids the COCO ``cocoid``.

Archives are kept under ``coco.download_dir`` and extracted once beside them; images reach the
dataset folder by hard link, so a rebuild does not copy 19 GB again.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from PIL import Image

from crossalign.config import CocoParams, DataParams
from crossalign.data import cocofmt, download

log = logging.getLogger(__name__)
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def fetch(url: str, coco: CocoParams, root: Path) -> Path:
    """Download one archive (checksum from the registry, by file name) and extract it once;
    returns the extraction folder."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    downloads = root / coco.download_dir
    archive = download.download(url, downloads / name, download.checksum_for(name), retries=coco.retries,
                                timeout=coco.timeout_s, retry_wait=coco.retry_wait_s)
    return download.extract_cached(archive, downloads / "extracted" / name.removesuffix(".zip"))


def _place_images(records: list[dict], source_dir: Path, out: Path) -> int:
    """Link ``source_dir/<file_name>`` to ``out/images/<file_name>`` for each record (file_name is
    ``<folder>/<name>``, as laid out in the archive); returns how many were missing."""
    missing = 0
    for rec in records:
        rel = cocofmt.safe_relative(rec["file_name"])
        src = source_dir / rel if rel is not None else None
        if src is not None and src.is_file():
            cocofmt.link_or_copy(src, out / "images" / rel)
        else:
            missing += 1
    return missing


def _with_folder(images: list[dict], folder: str) -> list[dict]:
    return [{**img, "file_name": f"{folder}/{img['file_name']}"} for img in images]


def build_coco2017(data: DataParams, root: Path, out: Path) -> None:
    """``data`` stage builder for ``coco2017``."""
    coco, base = data.coco, data.coco.base_url.rstrip("/")
    ann_dir = fetch(f"{base}/annotations/annotations_trainval2017.zip", coco, root)
    sources = {folder: fetch(f"{base}/zips/{folder}.zip", coco, root) for folder in ("train2017", "val2017")}
    parts: dict[str, dict] = {}
    for folder in ("train2017", "val2017"):
        loaded = cocofmt.load_coco(ann_dir / "annotations" / f"captions_{folder}.json").dataset
        loaded = {**loaded, "images": _with_folder(loaded["images"], folder)}
        missing = _place_images(loaded["images"], sources[folder], out)
        if missing:
            log.warning("%s: %d images listed in the captions are not in the archive (passed through)",
                        folder, missing)
        if folder == "train2017":
            ids = [img["id"] for img in loaded["images"]]
            split = cocofmt.split_by(loaded, cocofmt.carve(ids, coco.val_images, 0, coco.split_seed,
                                                            "coco.val_images"))
            parts["train"], parts["val"] = split["train"], split["val"]
        else:
            parts["test"] = cocofmt.caption_file(loaded["images"], loaded["annotations"], loaded.get("info"),
                                                 loaded.get("licenses"))
    cocofmt.write_splits(out, parts, "coco2017 (train2017 carve-out + val2017)")


def read_karpathy(path: Path) -> list[dict]:
    """The ``images`` of ``dataset_coco.json``, checked for the keys the conversion reads."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found in caption_datasets.zip") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    images = raw.get("images") if isinstance(raw, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path}: key 'images' is missing or not a list; expected Karpathy's dataset_coco.json")
    for i, img in enumerate(images):
        missing = [k for k in ("filepath", "filename", "split", "cocoid", "sentences") if k not in img]
        if missing:
            raise ValueError(f"{path}: images[{i}] lacks key(s) {missing}")
        if img["split"] not in KARPATHY_SPLITS:
            raise ValueError(f"{path}: images[{i}].split = {img['split']!r}, expected one of {list(KARPATHY_SPLITS)}")
    return images


def image_size(path: Path) -> tuple[int | None, int | None]:
    """(width, height) from the file header, or (None, None) for a missing/unreadable file (the
    preprocess stage reports those)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError):
        return None, None


def build_karpathy(data: DataParams, root: Path, out: Path) -> None:
    """``data`` stage builder for ``coco-karpathy``."""
    coco, base = data.coco, data.coco.base_url.rstrip("/")
    split_dir = fetch(coco.karpathy_url, coco, root)
    sources = {folder: fetch(f"{base}/zips/{folder}.zip", coco, root) for folder in ("train2014", "val2014")}
    info = {"description": "COCO 2014 captions, Karpathy split (dataset_coco.json)",
            "url": "https://cs.stanford.edu/people/karpathy/deepimagesent/", "version": "1.0", "year": 2015,
            "contributor": "COCO Consortium; split by A. Karpathy", "date_created": ""}
    parts = {s: cocofmt.caption_file([], [], info, []) for s in cocofmt.SPLITS}
    missing = 0
    for img in read_karpathy(split_dir / "dataset_coco.json"):
        folder = img["filepath"]
        if folder not in sources:
            raise ValueError(f"dataset_coco.json: image {img['cocoid']} has filepath {folder!r}, "
                             f"expected one of {sorted(sources)}")
        file_name = f"{folder}/{img['filename']}"
        rel = cocofmt.safe_relative(file_name)
        width, height = image_size(sources[folder] / rel) if rel is not None else (None, None)
        record = {"id": img["cocoid"], "file_name": file_name, "width": width, "height": height,
                  "license": 0, "coco_url": f"http://images.cocodataset.org/{file_name}"}
        part = parts[KARPATHY_SPLITS[img["split"]]]
        part["images"].append(record)
        part["annotations"].extend({"id": s.get("sentid"), "image_id": img["cocoid"], "caption": s.get("raw", "")}
                                   for s in img["sentences"])
        missing += _place_images([record], sources[folder], out)
    if missing:
        log.warning("coco-karpathy: %d images of dataset_coco.json are not in the archives (passed through)",
                    missing)
    cocofmt.write_splits(out, parts, "dataset_coco.json (Karpathy split)")
