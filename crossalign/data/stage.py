"""The ``data`` stage: write ``<raw_dir>/<dataset>/`` in COCO caption format.

Output contract (every later stage relies on it)::

    <raw_dir>/<dataset>/images/<file_name>                 (file_name may hold a sub-folder)
    <raw_dir>/<dataset>/annotations/captions_{train,val,test}.json   (official COCO caption schema)

The whole folder is built under a temporary name and renamed into place (``atomic_dir``), so an
interrupted run never leaves a dataset that looks whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from crossalign.config import Config, DataParams
from crossalign.io import atomic_dir

Builder = Callable[[DataParams, Path, Path], None]


def _builders() -> dict[str, Builder]:
    from crossalign.data import coco, flickr, folder, synthetic

    return {"synthetic": synthetic.build, "coco2017": coco.build_coco2017,
            "coco-karpathy": coco.build_karpathy, "coco-folder": folder.build,
            "flickr8k": flickr.build, "flickr30k": flickr.build}


def dataset_dir(cfg: Config, root: Path) -> Path:
    """``root/<raw_dir>/<dataset>``: where the stage writes."""
    return Path(root) / cfg.data.raw_dir / cfg.data.dataset


def run(cfg: Config, root: Path) -> Path:
    """Build the dataset named by ``cfg.data.dataset`` atomically; return its folder.

    ``root`` anchors every relative path of the config (raw_dir, coco.download_dir, folder)."""
    builders = _builders()
    if cfg.data.dataset not in builders:
        raise ValueError(f"data.dataset {cfg.data.dataset!r} is not one of {sorted(builders)}")
    dest = dataset_dir(cfg, root)
    with atomic_dir(dest) as tmp:
        builders[cfg.data.dataset](cfg.data, Path(root), tmp)
    return dest
