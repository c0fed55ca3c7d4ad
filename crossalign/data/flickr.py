"""``flickr8k`` and ``flickr30k``: Karpathy's splits from ``dataset_flickr8k.json`` /
``dataset_flickr30k.json``, read from the ``caption_datasets.zip`` that ``coco-karpathy`` uses
(``coco.karpathy_url``: checksummed, resumable, extracted once under ``coco.download_dir``), with
the images from ``data.folder`` (Flickr's images come with a licence form: the user brings them).

* Splits: each record's ``split`` (train / val / test; ``restval``, where present, joins train):
  Flickr8k 6,000 / 1,000 / 1,000 images, Flickr30k 29,000 / 1,014 / 1,000, five captions each.
  The 1,000-image test split is the usual 1K test protocol.
* Records: image id = ``imgid``, ``file_name`` = ``filename``; caption id = ``sentid``, caption =
  ``raw``.
* Images: ``<filename>`` is looked up in ``data.folder``'s ``images/``, the folder itself, then each
  sub-folder (the official zips' ``Flicker8k_Dataset/`` (sic) and ``flickr30k-images/`` among them),
  and hard-linked (copied across file systems) to ``images/<filename>``. Every image listed must be
  found: otherwise the stage stops before placing any, naming the first missing file and the count.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from crossalign.config import DataParams
from crossalign.data import cocofmt, folder
from crossalign.data.coco import KARPATHY_SPLITS, fetch, image_size

log = logging.getLogger(__name__)
RECORD_KEYS = ("filename", "imgid", "sentences", "split")
SENTENCE_KEYS = ("raw", "sentid")


@dataclass(frozen=True)
class Flickr:
    """What differs between the two datasets."""

    title: str
    json_name: str
    source: str  # where the images are obtained (a licence form)
    credit: str


FLICKR = {
    "flickr8k": Flickr("Flickr8k", "dataset_flickr8k.json", "http://hockenmaier.cs.illinois.edu/8k-pictures.html",
                       "M. Hodosh, P. Young, J. Hockenmaier (2013)"),
    "flickr30k": Flickr("Flickr30k", "dataset_flickr30k.json", "https://shannon.cs.illinois.edu/DenotationGraph/",
                        "P. Young, A. Lai, M. Hodosh, J. Hockenmaier (2014)"),
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_record(path: Path, i: int, rec: object) -> None:
    """Raise ValueError naming ``path`` and ``images[i]`` unless ``rec`` is a Karpathy record."""
    where = f"{path}: images[{i}]"
    if not isinstance(rec, dict):
        raise ValueError(f"{where} is a {type(rec).__name__}, expected an object with keys {list(RECORD_KEYS)}")
    name = rec.get("filename")
    if isinstance(name, str):
        where += f" ({name})"
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        raise ValueError(f"{where} lacks key(s) {missing}; expected Karpathy's keys {list(RECORD_KEYS)}")
    if cocofmt.safe_relative(name) is None:
        raise ValueError(f"{where}: filename {name!r} is not a relative path inside the image folder "
                         "(expected e.g. '1000268201_693b08cb0e.jpg')")
    if not _is_int(rec["imgid"]):
        raise ValueError(f"{where}: imgid {rec['imgid']!r} is not an integer")
    if rec["split"] not in KARPATHY_SPLITS:
        raise ValueError(f"{where}: split {rec['split']!r}, expected one of {list(KARPATHY_SPLITS)}")
    sentences = rec["sentences"]
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"{where}: sentences is {'empty' if sentences == [] else type(sentences).__name__}, "
                         "expected a list of {'raw', 'sentid', ...} objects")
    for k, sent in enumerate(sentences):
        lacks = [key for key in SENTENCE_KEYS if not isinstance(sent, dict) or key not in sent]
        if lacks:
            raise ValueError(f"{where}: sentences[{k}] lacks key(s) {lacks}; expected {list(SENTENCE_KEYS)}")
        if not _is_int(sent["sentid"]) or not isinstance(sent["raw"], str):
            raise ValueError(f"{where}: sentences[{k}] has sentid {sent['sentid']!r} / raw {sent['raw']!r}; "
                             "expected an integer and a string")


def read_flickr(path: Path, dataset: str) -> list[dict]:
    """The ``images`` of Karpathy's ``dataset_flickr{8k,30k}.json``, each record checked for the
    keys the conversion reads; no image id or file name twice. Errors name the file and record."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found in caption_datasets.zip (coco.karpathy_url); expected "
                                f"Karpathy's {path.name} there") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); expected Karpathy's {path.name}") from None
    images = raw.get("images") if isinstance(raw, dict) else None
    if not isinstance(images, list) or not images:
        found = "an empty list" if images == [] else "missing or not a list"
        raise ValueError(f"{path}: key 'images' is {found}; expected Karpathy's {path.name}")
    if isinstance(raw.get("dataset"), str) and raw["dataset"] != dataset:
        raise ValueError(f"{path}: 'dataset' is {raw['dataset']!r}, expected {dataset!r}")
    seen: dict[tuple[str, object], int] = {}
    for i, rec in enumerate(images):
        _check_record(path, i, rec)
        for key in ("imgid", "filename"):
            first = seen.setdefault((key, rec[key]), i)
            if first != i:
                raise ValueError(f"{path}: images[{i}] has the {key} {rec[key]!r} of images[{first}]; "
                                 "each image must be listed once")
    return images


def _missing_error(dataset: str, missing: list[str], total: int, data_folder: str, dirs: list[Path]) -> str:
    spec = FLICKR[dataset]
    shown = ", ".join(str(d) for d in dirs[:6]) + (f" and {len(dirs) - 6} more sub-folders" if len(dirs) > 6 else "")
    return (f"{dataset}: {len(missing):,} of the {total:,} images {spec.json_name} lists are not in "
            f"data.folder = {data_folder!r} (looked in {shown}); first missing: {missing[0]}. Put all "
            f"{total:,} {spec.title} images (obtained with the licence form at {spec.source}) in that folder, "
            "flat or in a sub-folder such as images/, or set data.folder to the folder that holds them. "
            "The dataset was not written.")


def build(data: DataParams, root: Path, out: Path) -> None:
    """``data`` stage builder for ``flickr8k`` and ``flickr30k`` (``data.dataset`` picks)."""
    dataset = data.dataset
    spec = FLICKR[dataset]
    if not data.folder:
        raise ValueError(f"data.folder: required for dataset {dataset!r}: the folder holding the {spec.title} "
                         f"images (licence form at {spec.source})")
    base = Path(data.folder) if Path(data.folder).is_absolute() else Path(root) / data.folder
    if not base.is_dir():
        raise FileNotFoundError(f"data.folder = {data.folder!r}: {base} is not a folder; expected the folder "
                                f"holding the {spec.title} images")
    split_dir = fetch(data.coco.karpathy_url, data.coco, root)
    records = read_flickr(split_dir / spec.json_name, dataset)
    dirs = folder.image_dirs(base)
    sources = {rec["filename"]: folder.find_image(cocofmt.safe_relative(rec["filename"]), dirs) for rec in records}
    missing = [name for name, src in sources.items() if src is None]
    if missing:
        raise FileNotFoundError(_missing_error(dataset, missing, len(records), data.folder, dirs))
    info = {"description": f"{spec.title} captions, Karpathy split ({spec.json_name})",
            "url": "https://cs.stanford.edu/people/karpathy/deepimagesent/", "version": "1.0", "year": 2015,
            "contributor": f"{spec.credit}; split by A. Karpathy", "date_created": ""}
    parts = {s: cocofmt.caption_file([], [], info, []) for s in cocofmt.SPLITS}
    for rec in records:
        width, height = image_size(sources[rec["filename"]])
        part = parts[KARPATHY_SPLITS[rec["split"]]]
        part["images"].append({"id": rec["imgid"], "file_name": rec["filename"], "width": width, "height": height})
        part["annotations"].extend({"id": s["sentid"], "image_id": rec["imgid"], "caption": s["raw"]}
                                   for s in rec["sentences"])
    counts = {"link": 0, "copy": 0}
    for rec in records:
        counts[cocofmt.link_or_copy(sources[rec["filename"]], out / "images" / rec["filename"])] += 1
    cocofmt.write_splits(out, parts, f"{spec.json_name} (Karpathy split)")
    log.info("%s: %s images (train / val / test), %d linked, %d copied from %s", dataset,
             " / ".join(f"{len(parts[s]['images']):,}" for s in cocofmt.SPLITS), counts["link"], counts["copy"], base)
