"""``select``: the champion by validation RSUM, a leaderboard of test metrics, each method's gain
over the baseline with a paired bootstrap CI, the registry versions and the ``champion`` alias.

Reads each method's ``eval/<m>/results.json``. Writes ``reports/selection.json`` (champion,
leaderboard, gains: a function of the evaluations) and ``metrics/selection.json`` (the champion's
``val_rsum`` / ``test_rsum`` only, the same keys as ``metrics/<m>.json``). Registry facts (version
numbers, run ids) change with every run, so they live in MLflow only: the model versions, the
alias and the ``select`` run's tags; :func:`run` returns them for the caller to print.

The test split never chooses: it is only reported. A method of ``train.methods`` without its
results stops the stage before anything is written (no champion is picked among the rest), so
the registry's previous champion and the previous selection files stay in place, consistent.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from crossalign import registry, report, tracking
from crossalign.config import Config
from crossalign.evaluation import metrics_summary, results_path
from crossalign.io import load_npy, read_json, write_json
from crossalign.retrieval import METRIC_KEYS, RECALL_KS

log = logging.getLogger(__name__)
GAIN_KEYS = ("i2t_r1", "t2i_r1", "rsum")
_BOOT_CHUNK = 50  # bootstrap resamples drawn at once (bounds the (B, n_queries) index matrix)


def load_metrics(cfg: Config, root: Path) -> tuple[dict[str, dict], list[str]]:
    """method -> its evaluation results (``eval/<m>/results.json``) for every method of
    ``train.methods``; and the methods missing them."""
    found, missing = {}, []
    for method in cfg.train.methods:
        path = results_path(root, method)
        if not path.exists():
            missing.append(method)
            continue
        metrics = read_json(path)
        for split in ("val", "test"):
            absent = [k for k in METRIC_KEYS if k not in metrics.get(split, {})]
            if absent:
                raise ValueError(f"{path}: {split} lacks {absent} (expected keys {list(METRIC_KEYS)})")
        if metrics.get("method") != method:
            raise ValueError(f"{path}: method {metrics.get('method')!r}, expected {method!r}")
        found[method] = metrics
    return found, missing


def leaderboard(metrics: dict[str, dict]) -> list[dict]:
    """One row per method, best validation RSUM first: val RSUM, test metrics mean (± std)."""
    rows = []
    for method, m in metrics.items():
        std = m["test"].get("std", {})
        row = {"method": method, "val_rsum": m["val"]["rsum"], "seeds": m.get("seeds", []),
               "protocol": m.get("protocol", ""),
               "test": {k: m["test"][k] for k in (*METRIC_KEYS, "i2t_medr", "t2i_medr") if k in m["test"]},
               "test_std": {k: std[k] for k in METRIC_KEYS if std.get(k) is not None}}
        if "1k" in m["test"]:
            row["test_1k"] = {k: m["test"]["1k"][k] for k in METRIC_KEYS}
        probe = m["test"].get("binding_probe")
        if probe:
            row["binding_probe"] = {"i2t": probe["overall"]["i2t"], "t2i": probe["overall"]["t2i"]}
        rows.append(row)
    order = {m: i for i, m in enumerate(metrics)}  # ties: the order of train.methods
    return sorted(rows, key=lambda r: (-r["val_rsum"], order[r["method"]]))


def query_hits(root: Path, method: str, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-query hit rates on test, averaged over seeds: i2t (N, 3) and t2i (M, 3), K = 1/5/10."""
    out = []
    for direction in ("i2t", "t2i"):
        per_seed = [np.asarray(load_npy(Path(root) / "eval" / method / "ranks" / f"seed-{s}" / f"test_{direction}.npy"))
                    for s in seeds]
        if len({r.shape for r in per_seed}) != 1:
            raise ValueError(f"eval/{method}/ranks: seeds disagree on the number of test {direction} queries")
        ranks = np.stack(per_seed)  # (S, Q)
        out.append(np.stack([(ranks < k).mean(0) for k in RECALL_KS], axis=1).astype(np.float64))  # (Q, 3)
    return out[0], out[1]


def paired_bootstrap(method_hits: tuple[np.ndarray, np.ndarray], base_hits: tuple[np.ndarray, np.ndarray],
                     resamples: int, seed: int = 0) -> dict[str, dict]:
    """Gain of a method over the baseline on R@1 (both directions) and RSUM, in points, with a
    95% percentile CI from resampling the test queries with replacement (same resample for both
    methods: paired). i2t queries are images, t2i queries captions; each resampled separately."""
    if method_hits[0].shape != base_hits[0].shape or method_hits[1].shape != base_hits[1].shape:
        raise ValueError(f"test queries differ from the baseline's: {method_hits[0].shape}/{method_hits[1].shape} "
                         f"vs {base_hits[0].shape}/{base_hits[1].shape}")
    d_i2t = method_hits[0] - base_hits[0]  # (N, 3)
    d_t2i = method_hits[1] - base_hits[1]  # (M, 3)
    rng = np.random.default_rng(seed)
    boot_i2t, boot_t2i = [], []
    for start in range(0, resamples, _BOOT_CHUNK):
        b = min(_BOOT_CHUNK, resamples - start)
        boot_i2t.append(d_i2t[rng.integers(0, len(d_i2t), (b, len(d_i2t)))].mean(1))  # (b, 3)
        boot_t2i.append(d_t2i[rng.integers(0, len(d_t2i), (b, len(d_t2i)))].mean(1))  # (b, 3)
    bi, bt = 100 * np.concatenate(boot_i2t), 100 * np.concatenate(boot_t2i)  # (B, 3) points
    samples = {"i2t_r1": bi[:, 0], "t2i_r1": bt[:, 0], "rsum": bi.sum(1) + bt.sum(1)}
    point = {"i2t_r1": 100 * d_i2t[:, 0].mean(), "t2i_r1": 100 * d_t2i[:, 0].mean(),
             "rsum": 100 * (d_i2t.mean(0).sum() + d_t2i.mean(0).sum())}
    out = {}
    for key in GAIN_KEYS:
        lo, hi = np.percentile(samples[key], [2.5, 97.5])
        out[key] = {"delta": float(point[key]), "ci95": [float(lo), float(hi)],
                    "significant": bool(lo > 0 or hi < 0)}
    return out


def gain_text(gain: dict[str, dict]) -> str:
    """The article's form: '+3.2 R@1 (i2t) [95% CI +1.0, +5.1]; ...; +12.0 RSUM [...]'."""
    names = {"i2t_r1": "R@1 (i2t)", "t2i_r1": "R@1 (t2i)", "rsum": "RSUM"}
    return "; ".join(f"{g['delta']:+.1f} {names[k]} [95% CI {g['ci95'][0]:+.1f}, {g['ci95'][1]:+.1f}]"
                     for k, g in gain.items())


def gains(cfg: Config, root: Path, metrics: dict[str, dict]) -> dict[str, dict]:
    base = cfg.select.baseline
    base_hits = query_hits(root, base, metrics[base]["seeds"])
    out = {}
    for method, m in metrics.items():
        if method == base:
            continue
        try:
            g = paired_bootstrap(query_hits(root, method, m["seeds"]), base_hits, cfg.select.bootstrap)
        except ValueError as err:
            raise ValueError(f"eval/{method} vs eval/{base}: {err}") from None
        out[method] = {**g, "text": gain_text(g), "baseline": base}
    return out


def run(cfg: Config, root: Path) -> dict:
    """Select the champion; write ``reports/`` and ``metrics/selection.json``; register every
    method's kept seed and move the alias -> the selection with its ``registry`` facts."""
    root = Path(root)
    metrics, missing = load_metrics(cfg, root)
    if missing:
        raise ValueError(f"no champion chosen: eval/<method>/results.json missing for {missing} "
                         f"(train.methods = {cfg.train.methods}); run evaluate@<method> for them")
    candidates = {method: _candidate(cfg, root, method, m) for method, m in metrics.items()}
    board = leaderboard(metrics)
    champion = board[0]["method"]
    selection = {"champion": champion, "metric": f"val_{cfg.select.metric}", "leaderboard": board,
                 "gain_over_baseline": gains(cfg, root, metrics), "missing": []}
    files = report.run(cfg, root, selection)
    facts_path = root / "reports" / "selection.json"
    write_json(facts_path, selection)
    numbers = selection_metrics(metrics[champion])
    out_path = root / "metrics" / "selection.json"
    write_json(out_path, numbers)

    versions = registry.register_versions(cfg, root, candidates)
    registry.set_champion(cfg, root, versions[champion])
    facts = {"name": cfg.tracking.registered_model, "versions": versions, "alias": registry.CHAMPION,
             "champion_version": versions[champion], "uri": registry.champion_uri(cfg),
             "run_ids": {m: c["run_id"] for m, c in candidates.items()}}
    registry.log_selection(cfg, root, [out_path, facts_path, *files],
                           {f"champion_{k}": v for k, v in numbers.items()},
                           tags={"champion": champion, "champion_version": versions[champion],
                                 **{f"version.{m}": v for m, v in versions.items()}})
    log.info("champion: %s (val RSUM %.1f), version %s", champion, board[0]["val_rsum"], versions[champion])
    return {**selection, "registry": facts}


def selection_metrics(champion_results: dict) -> dict[str, float]:
    """``metrics/selection.json``: the champion's ``val_rsum`` and ``test_rsum`` under the keys of
    ``metrics/<m>.json`` (so ``dvc metrics show`` adds no column for it); its name is in
    ``reports/selection.json``."""
    summary = metrics_summary(champion_results)
    return {k: summary[k] for k in ("val_rsum", "test_rsum")}


def _candidate(cfg: Config, root: Path, method: str, m: dict) -> dict:
    """The registry candidate of a method: the training run of its kept seed, found by the sha256
    of that seed's weights (``results.json``), with its tags and one-line description."""
    seed = m.get("scores_seed", m["seeds"][0] if m.get("seeds") else 0)
    sha = (m.get("weights_sha256") or {}).get(str(seed))
    if not sha:
        raise ValueError(f"{results_path(root, method)}: no weights_sha256 for seed {seed} (expected "
                         f"{{seed: sha256}}); rerun evaluate@{method}")
    run_id = registry.seed_run_id(cfg, root, method, seed, sha)
    if not run_id:
        raise ValueError(f"no MLflow run of {method} seed {seed} with weights sha256 {sha[:12]} in "
                         f"{registry.tracking_uri(cfg, root)}: its model cannot be registered "
                         f"(was train@{method} run with tracking on, against this store?)")
    val, test = m["val"]["rsum"], m["test"]["rsum"]
    return {"run_id": run_id, "seed": seed,
            "tags": {"val_rsum": val, **{f"test_{k}": m["test"][k] for k in METRIC_KEYS}, "weights_sha256": sha},
            "description": tracking.version_description(
                method, seed, f"val RSUM {val:.1f} (selection), test RSUM {test:.1f}", sha)}
