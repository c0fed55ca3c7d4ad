"""Builders shared by the evaluation/selection/registry/report/cli tests: a tiny project on disk
(features, test index with twins, saved models, MLflow runs with a logged model)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import make_tiny_features, save_npy
from crossalign.tracking import registry
from crossalign.config import Config
from crossalign.evaluate.stage import metrics_summary, results_path
from crossalign.io import load_features, write_json
from crossalign.methods import WEIGHTS, build_aligner, method_params, save_aligner
from crossalign.tracking.runs import weights_sha256

IMAGE_DIM, TEXT_DIM = 12, 10


def write_split_features(root: Path, n_val: int = 16, n_test: int = 16, captions_per_image: int = 2) -> None:
    """data/features/{val,test}, eval/test_index.json (twins pair image 2k with 2k+1) and
    eval/val_index.json (twins pair image 2k+1 with 2k+2, kinds size / colour)."""
    for i, (split, n) in enumerate((("val", n_val), ("test", n_test))):
        make_tiny_features(root / "data" / "features" / split, n_images=n, seed=i + 1,
                           captions_per_image=captions_per_image, image_dim=IMAGE_DIM, text_dim=TEXT_DIM)
    test = load_features(root / "data" / "features" / "test")
    kinds = ("colour", "position")
    twins = [{"image": 2 * k, "twin": 2 * k + 1, "swap": kinds[k % 2]} for k in range(n_test // 2)]
    write_json(root / "eval" / "test_index.json", {
        "image_ids": test.image_ids.tolist(),
        "caption_image_ids": test.image_ids[test.caption_image_index].tolist(),
        "captions": [f"caption {j}" for j in range(test.n_captions)],
        "twins": twins})
    val = load_features(root / "data" / "features" / "val")
    write_json(root / "eval" / "val_index.json", {
        "image_ids": val.image_ids.tolist(),
        "caption_image_ids": val.image_ids[val.caption_image_index].tolist(),
        "captions": [f"val caption {j}" for j in range(val.n_captions)],
        "twins": [{"image": 2 * k + 1, "twin": 2 * k + 2, "swap": ("size", "colour")[k % 2]}
                  for k in range((n_val - 1) // 2)]})


def write_prepared_test(root: Path, size: int = 16) -> None:
    """data/prepared/test with coloured squares matching the test features' rows (for the gallery)."""
    test = load_features(root / "data" / "features" / "test")
    out = root / "data" / "prepared" / "test"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(test.n_images, 3, size, size), dtype=np.uint8)
    save_npy(out / "images.npy", images)
    save_npy(out / "caption_image_index.npy", np.asarray(test.caption_image_index))
    save_npy(out / "image_ids.npy", np.asarray(test.image_ids))
    write_json(out / "images.json", [{"id": int(i), "file_name": f"{int(i):012d}.png"} for i in test.image_ids])
    write_json(out / "captions.json", [f"a caption number {j} of image {int(c)}"
                                       for j, c in enumerate(test.caption_image_index)])


def log_model_run(cfg: Config, root: Path, method: str, seed: int, model_dir: Path) -> str:
    """A finished MLflow run logged by the training tracker (pyfunc model at ``model``, tagged
    with the weights' sha256)."""
    from crossalign.train.tracker import MlflowTracker

    with registry.using(cfg, root):
        tracker = MlflowTracker(cfg, root)
        run_id = tracker.start(method, seed, None)
        tracker.finish(model_dir, model_dir / "no-checkpoint", [])
    return run_id


def save_model(cfg: Config, root: Path, method: str, seed: int, mlflow_run: bool = True,
               init_seed: int | None = None) -> Path:
    """A randomly initialised ``method`` model at models/<m>/final/seed-<s>/ (+ its MLflow run,
    found again by :func:`run_of`)."""
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = build_aligner(cfg, method, IMAGE_DIM, TEXT_DIM)
    path = root / "models" / method / "final" / f"seed-{seed}"
    meta = {"method": method, "seed": seed, "image_dim": IMAGE_DIM, "text_dim": TEXT_DIM,
            "methods": method_params(cfg, method)}
    save_aligner(model, path, meta)
    if mlflow_run:
        log_model_run(cfg, root, method, seed, path)
    return path


def run_of(cfg: Config, root: Path, method: str, seed: int) -> str | None:
    """The MLflow run that logged models/<m>/final/seed-<s>/ (by the tags the tracker sets)."""
    sha = weights_sha256(root / "models" / method / "final" / f"seed-{seed}" / WEIGHTS)
    return registry.seed_run_id(cfg, root, method, seed, sha)


def write_eval_outputs(root: Path, method: str, val_rsum: float,
                       test_ranks: dict[int, tuple[np.ndarray, np.ndarray]], models_root: Path | None = None) -> dict:
    """Hand-made evaluate outputs from given test ranks: eval/<m>/results.json (each seed's
    weights sha256 from ``models_root``/models/<m>/final when saved there, else a hash no run
    has), ranks files, scores, and metrics/<m>.json from the stage's own :func:`metrics_summary`."""
    from crossalign.retrieval.protocol import metrics_from_ranks

    seeds = sorted(test_ranks)
    per = {s: metrics_from_ranks(*test_ranks[s]) for s in seeds}
    test = {k: float(np.mean([per[s][k] for s in seeds])) for k in per[seeds[0]]}
    if len(seeds) > 1:
        test["std"] = {k: float(np.std([per[s][k] for s in seeds])) for k in per[seeds[0]]}
    val = {k: 0.0 for k in per[seeds[0]]}
    val["rsum"] = val_rsum
    for s in seeds:
        d = root / "eval" / method / "ranks" / f"seed-{s}"
        save_npy(d / "test_i2t.npy", test_ranks[s][0])
        save_npy(d / "test_t2i.npy", test_ranks[s][1])
    n, m = len(test_ranks[seeds[0]][0]), len(test_ranks[seeds[0]][1])
    save_npy(root / "eval" / method / "test_scores.npy", np.zeros((n, m), np.float32))
    weights = {s: (models_root or root) / "models" / method / "final" / f"seed-{s}" / WEIGHTS for s in seeds}
    hashes = {str(s): weights_sha256(w) if w.exists() else "0" * 64 for s, w in weights.items()}
    results = {"method": method, "protocol": "hand-made", "seeds": seeds, "scores_seed": seeds[0],
               "weights_sha256": hashes, "val": val, "test": test}
    write_json(results_path(root, method), results)
    write_json(root / "metrics" / f"{method}.json", metrics_summary(results))
    return results
