"""``evaluate@<method>``: the COCO retrieval protocol on val and test for every trained seed.

Reads ``models/<m>/final/seed-<s>/`` (one per ``train.seeds``), ``data/features/{val,test}``,
``eval/test_index.json`` and ``eval/val_index.json`` (the val split's own binding twins: the probe
is recorded on val, where recipe choices may read it, as well as on test); writes

- ``eval/<m>/`` (the stage's out): ``results.json`` (every metric, seed mean / std / per seed, the
  binding probe in full, the protocol, the seeds, the seed whose scores were kept and each seed's
  weights sha256), the test score matrix of that seed, and per-query ranks of every seed;
- ``metrics/<m>.json``: the few numbers people compare, flat and rounded
  (:func:`metrics_summary`), so ``dvc metrics show`` stays one readable table.

Nothing run-specific is written: each seed's MLflow run is found by its tags (method, seed,
weights sha256) and gets the ``eval_*`` metrics; without tracking the metrics are not logged.
The same pure chain serves every method: encode -> score -> ranks -> metrics.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from crossalign.tracking import registry
from crossalign.tracking import runs as tracking
from crossalign.config import Config
from crossalign.io import FeatureSplit, atomic_dir, load_features, read_json, write_json
from crossalign.methods import WEIGHTS
from crossalign.device import resolve_device
from crossalign.evaluate.binding import pair_tallies, probe_from_tallies
from crossalign.retrieval.protocol import METRIC_KEYS, coco_metrics, fold_slices
from crossalign.retrieval.scoring import describe_protocol, encode_split, fold_scores, score_states

log = logging.getLogger(__name__)
RESULTS = "results.json"  # eval/<m>/results.json: the full record selection and the report read
DECIMALS = 2  # metrics/<m>.json rounding: percentages to 0.01 (full precision in results.json)
Loader = Callable[[Path], tuple[Any, dict]]


def model_dir(root: Path, method: str, seed: int) -> Path:
    return Path(root) / "models" / method / "final" / f"seed-{seed}"


def results_path(root: Path, method: str) -> Path:
    return Path(root) / "eval" / method / RESULTS


def metrics_summary(result: dict) -> dict[str, float]:
    """The numbers of ``metrics/<m>.json`` (seed means, rounded): ``val_rsum`` (what selection
    ranks by), ``val_bind`` (the binding probe on the val twins, overall mean of both directions:
    the binding number a choice may read), ``test_rsum``, ``test_rsum_1k`` at 5K, and the test
    binding probe as the mean of its two directions: ``bind`` overall with ``bind_lo``, the lower
    end of its 95 % pair-bootstrap CI, and one key per swap kind. The upper ends, the per-kind CIs,
    the val probe per kind and each R@K (``i2t_r1`` ...) are in ``eval/<m>/results.json``, MLflow
    and the report: with them ``dvc metrics show`` would not fit 120 columns
    (tests/test_metrics_files.py)."""
    val, test = result["val"], result["test"]
    out = {"val_rsum": val["rsum"]}
    if val.get("binding_probe"):
        out["val_bind"] = (val["binding_probe"]["overall"]["i2t"] + val["binding_probe"]["overall"]["t2i"]) / 2
    out["test_rsum"] = test["rsum"]
    if "1k" in test:
        out["test_rsum_1k"] = test["1k"]["rsum"]
    probe = test.get("binding_probe")
    if probe:
        out["bind"] = (probe["overall"]["i2t"] + probe["overall"]["t2i"]) / 2
        if "ci95" in probe["overall"]:
            out["bind_lo"] = probe["overall"]["ci95"]["mean"][0]  # the bound a ">= 60" claim reads
        out.update({kind: (p["i2t"] + p["t2i"]) / 2 for kind, p in sorted(probe["per_swap"].items())})
    return {k: round(float(v), DECIMALS) for k, v in out.items()}


def check_test_index(index: dict, split: FeatureSplit, path: Path) -> None:
    """``eval/test_index.json`` (or ``eval/val_index.json``) must describe its split's features' row
    and column order."""
    for key in ("image_ids", "caption_image_ids"):
        if key not in index:
            raise ValueError(f"{path}: missing key {key!r} (expected image_ids, caption_image_ids, captions, twins)")
    image_ids = np.asarray(index["image_ids"], dtype=np.int64)
    caption_image_ids = np.asarray(index["caption_image_ids"], dtype=np.int64)
    if not np.array_equal(image_ids, np.asarray(split.image_ids)):
        raise ValueError(f"{path}: image_ids ({image_ids.size}) differ from {split.root}/image_ids.npy "
                         f"({split.n_images}): the score rows would not follow the index")
    expected = np.asarray(split.image_ids)[np.asarray(split.caption_image_index)]
    if not np.array_equal(caption_image_ids, expected):
        raise ValueError(f"{path}: caption_image_ids differ from the {split.root.name} features' caption order "
                         f"({caption_image_ids.size} vs {expected.size} captions)")


def _mean_std(values: list[Any]) -> tuple[Any, Any]:
    """Mean and sample std (ddof=1: the seeds are a sample of the runs one could train) of the
    numeric leaves of equally shaped nested dicts; the std is None for a single value."""
    if isinstance(values[0], dict):
        pairs = {k: _mean_std([v[k] for v in values]) for k in values[0]}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if any(v is None for v in values) or not isinstance(values[0], (int, float)):
        return values[0], None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _aggregate(per_seed: dict[int, dict]) -> dict:
    """Seed mean at the top level; ``std`` and ``per_seed`` beside it when there are several."""
    mean, std = _mean_std(list(per_seed.values()))
    out = dict(mean)
    if len(per_seed) > 1:
        out["std"] = std
        out["per_seed"] = {str(s): m for s, m in per_seed.items()}
    return out


def evaluate_model(model: torch.nn.Module, split: FeatureSplit, cfg: Config,
                   device: torch.device) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Score one split with one model -> (metrics, i2t scores, t2i scores, i2t ranks, t2i ranks).
    The 1K folds of a 5K split are re-scored on their own when the method re-ranks a shortlist."""
    ev = cfg.evaluate
    model, images, texts = encode_split(model, split, device)
    blocks = (ev.block_images, ev.block_texts, ev.pair_chunk)
    i2t, t2i = score_states(model, images, texts, *blocks)
    folds = fold_scores(model, images, texts, split.caption_image_index, *blocks)  # re-rankers: own shortlists
    del images, texts
    metrics, r_i2t, r_t2i = coco_metrics(i2t, t2i, split.caption_image_index, folds)
    metrics.update(n_images=split.n_images, n_captions=split.n_captions)
    return metrics, i2t, t2i, r_i2t, r_t2i


def run(cfg: Config, method: str, root: Path, loader: Loader | None = None, metrics_file: bool = True) -> dict:
    """Evaluate every seed of ``method``; write ``eval/<method>/`` and (unless ``metrics_file`` is
    False: an evaluation-only control, reported by ``select`` but not a row of ``dvc metrics show``)
    ``metrics/<method>.json``."""
    root = Path(root)
    own_loader = loader is not None  # a custom loader (e.g. crossalign.evaluate.ensemble) finds its own files
    if loader is None:
        from crossalign.methods import load_aligner as loader
    device = resolve_device(cfg.evaluate.device, "evaluate.device")
    val = load_features(root / "data" / "features" / "val")
    test = load_features(root / "data" / "features" / "test")
    index_path = root / "eval" / "test_index.json"
    index = read_json(index_path)
    check_test_index(index, test, index_path)
    twins = index.get("twins") or []
    val_index_path = root / "eval" / "val_index.json"
    val_twins: list[dict] = []
    if val_index_path.exists():  # written by the features stage beside test_index.json
        val_index = read_json(val_index_path)
        check_test_index(val_index, val, val_index_path)
        val_twins = val_index.get("twins") or []
    else:
        log.warning("%s absent: no binding probe on val (rerun the features stage)", val_index_path)

    per_seed = {"val": {}, "test": {}}
    ranks: dict[int, dict[str, np.ndarray]] = {}
    hashes: dict[str, str] = {}
    protocol, best = None, None  # best: (val rsum, seed, test i2t scores, test t2i scores)
    kinds, tallies = [], {}  # binding probe: twin pair kinds, per seed (P, 4) win / comparison tallies
    val_kinds, val_tallies = [], {}  # the same on the val twins
    for seed in cfg.train.seeds:
        path = model_dir(root, method, seed)
        if not own_loader and not (path / "model.json").exists():
            raise FileNotFoundError(f"{path}/model.json: no trained model for method {method!r} seed {seed} "
                                    f"(train.seeds = {cfg.train.seeds}; has train@{method} run?)")
        model, meta = loader(path)
        if meta.get("method", method) != method:
            raise ValueError(f"{path}/model.json: method {meta.get('method')!r}, expected {method!r}")
        protocol = describe_protocol(model, cfg.evaluate.block_images, cfg.evaluate.block_texts)
        if not own_loader:  # a control (crossalign.evaluate.ensemble) has no weights of its own, nor a training run
            hashes[str(seed)] = tracking.weights_sha256(path / WEIGHTS)
        v_metrics, v_s_i2t, v_s_t2i, v_i2t, v_t2i = evaluate_model(model, val, cfg, device)
        if val_twins:
            val_kinds, val_tallies[seed] = pair_tallies(v_s_i2t, v_s_t2i, val.caption_image_index, val_twins)
            v_metrics["binding_probe"] = probe_from_tallies(val_kinds, val_tallies[seed])
        del v_s_i2t, v_s_t2i
        t_metrics, s_i2t, s_t2i, t_i2t, t_t2i = evaluate_model(model, test, cfg, device)
        if twins:
            kinds, tallies[seed] = pair_tallies(s_i2t, s_t2i, test.caption_image_index, twins)  # (P, 4)
            t_metrics["binding_probe"] = probe_from_tallies(kinds, tallies[seed])
        per_seed["val"][seed], per_seed["test"][seed] = v_metrics, t_metrics
        ranks[seed] = {"val_i2t": v_i2t, "val_t2i": v_t2i, "test_i2t": t_i2t, "test_t2i": t_t2i}
        if best is None or v_metrics["rsum"] > best[0]:
            best = (v_metrics["rsum"], seed, s_i2t, s_t2i)
        log.info("%s seed %d: val rsum %.1f, test rsum %.1f", method, seed, v_metrics["rsum"], t_metrics["rsum"])

    folds = (" + 1K (mean of 5 folds, each scored on its own: shortlists from the fold's similarities)"
             if fold_slices(test.n_images) else "")
    result = {
        "method": method,
        "protocol": f"{protocol}; COCO {'5K' if folds else 'full split'}{folds}; i2t hit when any "
                    "caption is in the top K; ties count against the query",
        "seeds": list(cfg.train.seeds),
        "scores_seed": best[1],
        "weights_sha256": hashes,
        "val": _aggregate(per_seed["val"]),
        "test": _aggregate(per_seed["test"]),
    }
    if tallies:  # several seeds: one CI over the twin pairs, each pair's comparisons pooled over seeds
        result["test"]["binding_probe"] = probe_from_tallies(kinds, sum(tallies.values()))
    if val_tallies:
        result["val"]["binding_probe"] = probe_from_tallies(val_kinds, sum(val_tallies.values()))
    for seed, sha in hashes.items():
        flat = {f"eval_{split}_{k}": per_seed[split][int(seed)][k] for split in ("val", "test") for k in METRIC_KEYS}
        if not registry.log_to_seed_run(cfg, root, method, int(seed), sha, flat):
            log.warning("%s seed %s: no finished MLflow run with these weights (sha256 %s) in %s; "
                        "metrics not logged (trained with tracking off?)", method, seed, sha[:12],
                        tracking.resolve_uri(cfg.tracking.tracking_uri, root))

    with atomic_dir(root / "eval" / method) as tmp:
        np.save(tmp / "test_scores.npy", best[2].astype(np.float32))
        if best[3] is not best[2]:
            np.save(tmp / "test_scores_t2i.npy", best[3].astype(np.float32))
        for seed, arrays in ranks.items():
            (tmp / "ranks" / f"seed-{seed}").mkdir(parents=True)
            for name, arr in arrays.items():
                np.save(tmp / "ranks" / f"seed-{seed}" / f"{name}.npy", arr.astype(np.int64))
        write_json(tmp / RESULTS, result)
    if metrics_file:
        write_json(root / "metrics" / f"{method}.json", metrics_summary(result))
    return result
