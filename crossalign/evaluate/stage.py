"""``evaluate@<method>``: the COCO retrieval protocol on val and test for every trained seed.

Reads ``models/<m>/final/seed-<s>/`` (one per ``train.seeds``), ``data/features/{val,test}``
(with their perturbed captions for the caption-swap probe, :mod:`crossalign.evaluate.swap`),
``eval/test_index.json`` and ``eval/val_index.json`` (the val split's own binding twins: the probes
are recorded on val, where recipe choices may read them, as well as on test); writes

- ``eval/<m>/`` (the stage's out): ``results.json`` (every metric, seed mean / std / per seed, the
  binding and caption-swap probes in full, the protocol, the seeds, the seed whose scores were kept,
  each seed's weights sha256 and, for a re-ranking method, the ``fusion`` alpha chosen on val), the
  test score matrix of that seed, and per-query ranks of every seed;
- ``metrics/<m>.json``: the few numbers people compare, flat and rounded
  (:func:`metrics_summary`), so ``dvc metrics show`` stays one readable table.

A re-ranking method (``joint``, the control) is scored on val at every ``evaluate.fusion_alphas``
(shortlists and match scores computed once, re-fused per alpha); per seed the best val RSUM, ties
to the smaller alpha, ranks test (``[]``: the model's own alpha).

Nothing run-specific is written: each seed's MLflow run is found by its tags (method, seed,
weights sha256) and gets the ``eval_*`` metrics, and, when val chose another alpha than the trained
model's, a logged model ranking at it (which ``select`` registers); without tracking nothing is
logged. The same pure chain serves every method: encode -> score -> ranks -> metrics.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from crossalign.tracking import registry
from crossalign.tracking.registry import MODEL_ARTIFACT
from crossalign.tracking import runs as tracking
from crossalign.config import Config
from crossalign.io import FeatureSplit, atomic_dir, load_features, load_npy, read_json, write_json
from crossalign.methods import WEIGHTS
from crossalign.methods.mlflow_model import fused_model_name, log_fused_model
from crossalign.device import resolve_device
from crossalign.evaluate import swap as swap_probe
from crossalign.evaluate.binding import pair_tallies, probe_from_tallies
from crossalign.evaluate.swap import SwapPairs, score_pairs
from crossalign.features import hardneg
from crossalign.features.hardneg import HardNegatives
from crossalign.retrieval.protocol import METRIC_KEYS, coco_metrics, fold_slices
from crossalign.retrieval.scoring import (describe_protocol, encode_split, fold_scores, fold_shortlists,
                                         score_states, shortlists)

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
    end of its 95 % pair-bootstrap CI, and one key per swap kind; ``swap``, the test caption-swap
    probe's overall i2t accuracy. On data without binding twins (real captions: no twin probe)
    the caption-swap probe's kinds take the twin probe's per-kind keys (``colour``, ``number``,
    ``position``, ``size``: i2t accuracy, present kinds only). The upper ends, the per-kind CIs,
    the val probes, the caption-swap kinds beside the twins, the fusion alpha chosen on val and
    each R@K (``i2t_r1`` ...) are in ``eval/<m>/results.json``, MLflow and the report: with them
    ``dvc metrics show`` would not fit 140 columns (tests/test_metrics_files.py)."""
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
    swap = test.get("swap_probe")
    if swap and "i2t" in swap["overall"]:
        out["swap"] = swap["overall"]["i2t"]
        if not probe:  # no twins: the caption-swap probe is the binding number per kind
            out.update({kind: p["i2t"] for kind, p in sorted(swap["per_kind"].items()) if "i2t" in p})
    return {k: round(float(v), DECIMALS) for k, v in out.items()}


FUSION_RULE = ("best val RSUM over evaluate.fusion_alphas, ties to the smaller alpha; alpha 0 ranks the "
               "shortlist by its own similarity")


def fusion_record(fusion: dict[int, dict], grid: list[float], kept_seed: int) -> dict:
    """``results.json`` ``fusion``: the grid, the rule, the alpha of the kept seed (``scores_seed``:
    its test scores are saved and ``select`` registers its model), val RSUM at each grid alpha (seed
    mean) and each seed's own choice."""
    keys = list(next(iter(fusion.values()))["val_rsum"])
    return {"grid": [float(a) for a in grid], "rule": FUSION_RULE, "alpha": fusion[kept_seed]["alpha"],
            "val_rsum": {a: float(np.mean([f["val_rsum"][a] for f in fusion.values()])) for a in keys},
            "per_seed": {str(s): f for s, f in fusion.items()}}


def fusion_protocol(protocol: str, fusion: dict[int, dict], grid: list[float]) -> str:
    """The re-ranking protocol with how its alpha was chosen: "shortlist k=16 re-rank alpha=0.5,
    chosen on val ... (val RSUM at alpha 0, the shortlist's similarity ranking: X; at 0.5: Y)"."""
    chosen = {s: f["alpha"] for s, f in fusion.items()}
    if len(set(chosen.values())) > 1:
        protocol = re.sub(r"alpha=\S+", "alpha per seed " + ", ".join(f"{a:g} (seed {s})" for s, a in chosen.items()),
                          protocol)
    rsum = fusion_record(fusion, grid, next(iter(fusion)))["val_rsum"]
    alphas = ", ".join(f"{float(a):g}" for a in grid)
    text = f"{protocol}, chosen on val from alphas [{alphas}] by RSUM, ties to the smaller"
    shown = [f"at alpha 0, the shortlist's own similarity ranking: {rsum['0']:.1f}"] if "0" in rsum else []
    shown += [f"at {a:g}: {rsum[f'{a:g}']:.1f}" for a in sorted(set(chosen.values())) if a != 0]
    return f"{text} (val RSUM{', seed mean' if len(chosen) > 1 else ''} {'; '.join(shown)})"


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


@dataclass
class SplitEvaluation:
    """One model on one split: metrics, score matrices, per-query ranks, and where they apply the
    fusion alpha chosen on this split (``alpha_rsum``: RSUM at each grid alpha) and the scored
    caption-swap pairs."""

    metrics: dict
    i2t: np.ndarray  # (N, M) image -> text scores
    t2i: np.ndarray  # (N, M) text -> image scores (the same array unless the method re-ranks)
    r_i2t: np.ndarray  # (N,) rank of each image's best true caption
    r_t2i: np.ndarray  # (M,) rank of each caption's image
    alpha_rsum: dict[float, float] | None = None
    swap: SwapPairs | None = None


def evaluate_split(model: torch.nn.Module, split: FeatureSplit, cfg: Config, device: torch.device,
                   alphas: list[float] | tuple[float, ...] = (),
                   negatives: HardNegatives | None = None) -> SplitEvaluation:
    """Score one split with one model. The 1K folds of a 5K split are re-scored on their own when
    the method re-ranks a shortlist.

    ``alphas`` (a re-ranking method only): score the split at each fusion alpha (the shortlists and
    their match scores computed once, re-fused per alpha), keep the best RSUM, ties to the smaller
    alpha, and set ``model.rerank`` to it: the model is then ranked at that alpha wherever it goes
    next (the test split, the probes). ``negatives``: the split's perturbed captions, scored for the
    caption-swap probe (:mod:`crossalign.evaluate.swap`)."""
    ev = cfg.evaluate
    model, images, texts = encode_split(model, split, device)
    blocks = (ev.block_images, ev.block_texts, ev.pair_chunk)
    caption_image = split.caption_image_index
    alpha_rsum = None
    if alphas and model.rerank is not None:
        parts = shortlists(model, images, texts, ev.block_images, ev.pair_chunk)
        fold_parts = fold_shortlists(model, images, texts, caption_image, ev.block_images, ev.pair_chunk)
        alpha_rsum = {}
        for alpha in sorted({float(a) for a in alphas}):  # ascending: a tie keeps the smaller alpha
            folds = [f.scores(alpha) for f in fold_parts] if fold_parts else None
            alpha_rsum[alpha] = coco_metrics(*parts.scores(alpha), caption_image, folds)[0]["rsum"]
            del folds
        chosen = max(alpha_rsum, key=lambda a: (alpha_rsum[a], -a))
        model.rerank = replace(model.rerank, alpha=chosen)
        i2t, t2i = parts.scores(chosen)
        folds = [f.scores(chosen) for f in fold_parts] if fold_parts else None
        del parts, fold_parts
    else:
        i2t, t2i = score_states(model, images, texts, *blocks)
        folds = fold_scores(model, images, texts, caption_image, *blocks)  # re-rankers: own shortlists
    swap = (score_pairs(model, images, texts, split, negatives, device, ev.pair_chunk)
            if negatives is not None else None)
    del images, texts
    metrics, r_i2t, r_t2i = coco_metrics(i2t, t2i, caption_image, folds)
    metrics.update(n_images=split.n_images, n_captions=split.n_captions)
    return SplitEvaluation(metrics, i2t, t2i, r_i2t, r_t2i, alpha_rsum, swap)


def evaluate_model(model: torch.nn.Module, split: FeatureSplit, cfg: Config,
                   device: torch.device) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Score one split with one model at its own ranking -> (metrics, i2t scores, t2i scores, i2t
    ranks, t2i ranks); see :func:`evaluate_split`."""
    out = evaluate_split(model, split, cfg, device)
    return out.metrics, out.i2t, out.t2i, out.r_i2t, out.r_t2i


def train_fit_split(root: Path, n_images: int) -> tuple[FeatureSplit, list[dict]] | None:
    """The first ``n_images`` training images with their captions, and the binding twin pairs
    among them (``twin_row.npy`` of the train features, each pair's swap kind from
    ``data/prepared/train/images.json``): what the train-twin fit is scored on. None when
    ``n_images`` is 0 or no twin pair lies among them (data without twins)."""
    feats = root / "data" / "features" / "train"
    if not n_images or not (feats / "twin_row.npy").exists():
        return None
    twin_row = np.asarray(load_npy(feats / "twin_row.npy"), np.int64)[:n_images]  # (n,) partner row or -1
    rows = [(r, int(t)) for r, t in enumerate(twin_row) if r < t < n_images]  # a pair once: the unit the CI resamples
    if not rows:
        return None
    path = root / "data" / "prepared" / "train" / "images.json"
    records = read_json(path) if path.exists() else None  # the swap kinds; without them every pair is a "twin"
    if records is not None and (not isinstance(records, list) or len(records) < len(twin_row)
                                or not all(isinstance(r, dict) for r in records[:len(twin_row)])):
        raise ValueError(f"{path}: expected a list of at least {len(twin_row)} image records (one per train "
                         "feature row)")
    twins = [{"image": r, "twin": t, "swap": (records[r].get("swap") if records else None) or "twin"} for r, t in rows]
    return load_features(feats).first_images(n_images), twins


def load_negatives(split: FeatureSplit) -> HardNegatives | None:
    """The split's cached perturbed captions for the caption-swap probe; None (with a warning: no
    probe on that split) when the feature split was written without them."""
    try:
        return hardneg.load(split.root)
    except FileNotFoundError as err:
        log.warning("no caption-swap probe on %s: %s", split.root.name, err)
        return None


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

    negatives = {"val": load_negatives(val), "test": load_negatives(test)}  # caption-swap probe pairs
    fit = train_fit_split(root, cfg.evaluate.fit_images)  # the train-twin fit beside the test probe
    fit_kinds, fit_tallies = [], {}
    grid = list(cfg.evaluate.fusion_alphas)  # re-ranking methods: fusion alpha chosen on val ([]: the model's own)

    per_seed = {"val": {}, "test": {}}
    ranks: dict[int, dict[str, np.ndarray]] = {}
    hashes: dict[str, str] = {}
    protocol, best = None, None  # best: (val rsum, seed, test i2t scores, test t2i scores)
    kinds, tallies = [], {}  # binding probe: twin pair kinds, per seed (P, 4) win / comparison tallies
    val_kinds, val_tallies = [], {}  # the same on the val twins
    swaps: dict[str, SwapPairs] = {}  # caption-swap probe: each split's pairs (the same for every seed)
    swap_tallies: dict[str, dict[int, np.ndarray]] = {"val": {}, "test": {}}  # per seed (P, 2)
    fusion: dict[int, dict] = {}  # re-ranking methods: the alpha each seed's val chose
    for seed in cfg.train.seeds:
        path = model_dir(root, method, seed)
        if not own_loader and not (path / "model.json").exists():
            raise FileNotFoundError(f"{path}/model.json: no trained model for method {method!r} seed {seed} "
                                    f"(train.seeds = {cfg.train.seeds}; has train@{method} run?)")
        model, meta = loader(path)
        if meta.get("method", method) != method:
            raise ValueError(f"{path}/model.json: method {meta.get('method')!r}, expected {method!r}")
        if not own_loader:  # a control (crossalign.evaluate.ensemble) has no weights of its own, nor a training run
            hashes[str(seed)] = tracking.weights_sha256(path / WEIGHTS)
        trained_alpha = model.rerank.alpha if model.rerank is not None else None
        v = evaluate_split(model, val, cfg, device, grid, negatives["val"])  # a re-ranker leaves at val's alpha
        if v.alpha_rsum is not None:
            fusion[seed] = {"alpha": model.rerank.alpha, "val_rsum": {f"{a:g}": r for a, r in v.alpha_rsum.items()}}
            if not own_loader:  # the MLflow model that ranks as evaluated (select registers it)
                fusion[seed]["mlflow_model"] = (MODEL_ARTIFACT if model.rerank.alpha == trained_alpha
                                                else fused_model_name(model.rerank.alpha))
        protocol = describe_protocol(model, cfg.evaluate.block_images, cfg.evaluate.block_texts)
        if val_twins:
            val_kinds, val_tallies[seed] = pair_tallies(v.i2t, v.t2i, val.caption_image_index, val_twins)
            v.metrics["binding_probe"] = probe_from_tallies(val_kinds, val_tallies[seed])
        v.i2t = v.t2i = None  # val's (N, M) score matrices are read no further: freed before test is scored
        if fit is not None:  # twins the model was trained on, ranked as test is (at the alpha val chose)
            f = evaluate_split(model, fit[0], cfg, device)
            fit_kinds, fit_tallies[seed] = pair_tallies(f.i2t, f.t2i, fit[0].caption_image_index, fit[1])
            del f
        t = evaluate_split(model, test, cfg, device, (), negatives["test"])  # at the alpha val chose
        if twins:
            kinds, tallies[seed] = pair_tallies(t.i2t, t.t2i, test.caption_image_index, twins)  # (P, 4)
            t.metrics["binding_probe"] = probe_from_tallies(kinds, tallies[seed])
        for split, e in (("val", v), ("test", t)):
            if e.swap is not None:
                swaps[split], swap_tallies[split][seed] = e.swap, swap_probe.tallies(e.swap.wins(model))
                if len(cfg.train.seeds) > 1:  # one seed: its record is the pooled one below
                    e.metrics["swap_probe"] = swap_probe.probe(e.swap, swap_tallies[split][seed])
        per_seed["val"][seed], per_seed["test"][seed] = v.metrics, t.metrics
        ranks[seed] = {"val_i2t": v.r_i2t, "val_t2i": v.r_t2i, "test_i2t": t.r_i2t, "test_t2i": t.r_t2i}
        if best is None or v.metrics["rsum"] > best[0]:
            best = (v.metrics["rsum"], seed, t.i2t, t.t2i)
        log.info("%s seed %d: val rsum %.1f, test rsum %.1f%s", method, seed, v.metrics["rsum"], t.metrics["rsum"],
                 f" (fusion alpha {fusion[seed]['alpha']:g}, chosen on val)" if seed in fusion else "")
        del v, t

    folds = (" + 1K (mean of 5 folds, each scored on its own: shortlists from the fold's similarities)"
             if fold_slices(test.n_images) else "")
    result = {
        "method": method,
        "protocol": f"{fusion_protocol(protocol, fusion, grid) if fusion else protocol}; "
                    f"COCO {'5K' if folds else 'full split'}{folds}; i2t hit when any "
                    "caption is in the top K; ties count against the query",
        "seeds": list(cfg.train.seeds),
        "scores_seed": best[1],
        "weights_sha256": hashes,
        "val": _aggregate(per_seed["val"]),
        "test": _aggregate(per_seed["test"]),
    }
    if fusion:
        result["fusion"] = fusion_record(fusion, grid, best[1])
    if tallies:  # several seeds: one CI over the twin pairs, each pair's comparisons pooled over seeds
        result["test"]["binding_probe"] = probe_from_tallies(kinds, sum(tallies.values()))
    if val_tallies:
        result["val"]["binding_probe"] = probe_from_tallies(val_kinds, sum(val_tallies.values()))
    if fit_tallies:  # how well the training twins are fitted: beside the test probe, overfitting shows
        result["train_fit"] = {"images": fit[0].n_images, "captions": fit[0].n_captions,
                               "binding_probe": probe_from_tallies(fit_kinds, sum(fit_tallies.values()))}
    for split, pairs in swaps.items():  # one CI over the images, each pair's comparisons pooled over seeds
        result[split]["swap_probe"] = swap_probe.probe(pairs, sum(swap_tallies[split].values()))
    for seed, sha in hashes.items():
        flat = {f"eval_{split}_{k}": per_seed[split][int(seed)][k] for split in ("val", "test") for k in METRIC_KEYS}
        for split, per in swap_tallies.items():
            if int(seed) in per and per[int(seed)].size:
                flat[f"eval_{split}_swap"] = 100.0 * per[int(seed)][:, 0].sum() / per[int(seed)][:, 1].sum()
        if int(seed) in fusion:
            flat["eval_fusion_alpha"] = fusion[int(seed)]["alpha"]
        if int(seed) in fit_tallies:
            iw, i_n, tw, t_n = fit_tallies[int(seed)].sum(axis=0)  # the overall mean of both directions
            flat["eval_train_fit_bind"] = 50.0 * (iw / i_n + tw / t_n)
        run_id = registry.log_to_seed_run(cfg, root, method, int(seed), sha, flat)
        if not run_id:
            log.warning("%s seed %s: no finished MLflow run with these weights (sha256 %s) in %s; "
                        "metrics not logged (trained with tracking off?)", method, seed, sha[:12],
                        tracking.resolve_uri(cfg.tracking.tracking_uri, root))
        elif fusion.get(int(seed), {}).get("mlflow_model", MODEL_ARTIFACT) != MODEL_ARTIFACT:
            with registry.using(cfg, root):
                log_fused_model(run_id, model_dir(root, method, int(seed)), fusion[int(seed)]["alpha"],
                                {"chosen_on": "val RSUM", "grid": grid, "val_rsum": fusion[int(seed)]["val_rsum"]})

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
