"""Shared fixtures: a tiny CPU config, tiny generated features, the shared COCO sample."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

for _k, _v in {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

from crossalign import config  # noqa: E402
from crossalign.io import atomic_file, write_features  # noqa: E402


def dump_params(cfg: config.Config) -> str:
    """A config as params.yaml text (tests write tiny projects with it)."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_npy(path, array: np.ndarray) -> None:
    """``np.save`` atomically."""
    with atomic_file(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """../shared/coco-sample: 80 real COCO train2017 images and their official captions."""
    path = SHARED / "coco-sample"
    if not (path / "annotations" / "captions_train2017.json").exists():
        pytest.skip(f"{path} is absent: the real-COCO tests need the shared sample beside the repo")
    return path


def tiny_config(tmp_path: Path, **overrides) -> config.Config:
    """A config for fast CPU tests, with MLflow in ``tmp_path``. ``overrides`` are nested dicts
    per section, e.g. ``train={"epochs": 2}``."""
    raw = {
        "data": {"synthetic": {"n_train": 48, "n_val": 16, "n_test": 16, "image_size": 64}},
        "preprocess": {"image_size": 32, "workers": 1, "batch_size": 16},
        "features": {"image_batch_size": 8, "text_batch_size": 32, "threads": 1, "device": "cpu"},
        "methods": {"embed_dim": 16, "cross_attention": {"heads": 2, "matcher": "cross"}, "joint": {"heads": 2, "hard_k": 4, "shortlist_k": 4}},
        # twin negatives need the binding-negative arrays, which features written by hand in tests lack
        # (tests/test_binding_methods.py turns them on)
        "train": {"epochs": 2, "batch_size": 16, "patience": 2, "device": "cpu", "threads": 1, "twin_negatives": False,
                  "caption_negatives": 0},
        "evaluate": {"device": "cpu", "block_images": 8, "block_texts": 16},
        "select": {"bootstrap": 50, "gallery": 2},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                     "artifact_location": str(tmp_path / "mlruns" / "artifacts")},
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return config.from_dict(raw, "tiny_config")


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> config.Config:
    return tiny_config(tmp_path)


def make_tiny_features(root: Path, n_images: int = 24, captions_per_image: int = 2, regions: int = 4,
                       image_dim: int = 12, text_dim: int = 10, max_len: int = 6, seed: int = 0,
                       noise: float = 0.3, twins: bool = True) -> Path:
    """Write one feature split (contract of crossalign.io) whose captions are noisy linear views
    of their image, so a method can learn the alignment. Returns ``root``. With ``twins`` the
    binding-negative arrays are added (crossalign.features.hardneg): images 2k and 2k+1 are binding twins, no
    perturbed captions (tests that need them write their own)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_images, 8)).astype(np.float32)
    w_img = rng.normal(size=(8, image_dim)).astype(np.float32)
    w_txt = rng.normal(size=(8, text_dim)).astype(np.float32)
    image_pooled = latent @ w_img
    image_tokens = image_pooled[:, None, :] + noise * rng.normal(size=(n_images, regions, image_dim))
    cap_img = np.repeat(np.arange(n_images), captions_per_image)
    m = cap_img.size
    text_pooled = latent[cap_img] @ w_txt + noise * rng.normal(size=(m, text_dim))
    lengths = rng.integers(2, max_len + 1, size=m).astype(np.int32)
    text_tokens = text_pooled[:, None, :] + noise * rng.normal(size=(m, max_len, text_dim))
    text_tokens[np.arange(max_len)[None, :] >= lengths[:, None]] = 0.0
    write_features(root, image_tokens=image_tokens, image_pooled=image_pooled, text_tokens=text_tokens,
                   text_lengths=lengths, text_pooled=text_pooled,
                   image_ids=np.arange(1000, 1000 + n_images), caption_image_index=cap_img,
                   caption_ids=np.arange(m),
                   meta={"image_encoder": {"name": "tiny"}, "text_encoder": {"name": "tiny"},
                         "image_dim": image_dim, "text_dim": text_dim})
    if twins:
        from crossalign.features import hardneg
        twin_row = np.arange(n_images) ^ 1  # 0<->1, 2<->3, ...
        twin_row[twin_row >= n_images] = -1
        hardneg.write(root, twin_row=twin_row, tokens=np.zeros((0, text_dim), np.float16),
                      offsets=np.zeros(1, np.int64), pooled=np.zeros((0, text_dim), np.float16),
                      source=np.zeros(0, np.int64), kind=np.zeros(0, np.int8), per_caption=0)
    return root


@pytest.fixture
def tiny_features(tmp_path: Path) -> Path:
    """``<tmp>/data/features/{train,val,test}`` of tiny learnable features; returns ``<tmp>``."""
    for i, split in enumerate(("train", "val", "test")):
        make_tiny_features(tmp_path / "data" / "features" / split, n_images=48 if split == "train" else 16, seed=i)
    return tmp_path
