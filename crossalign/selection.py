"""``select``: the champion by validation RSUM, a leaderboard of test metrics, each method's gain
over the baseline with a paired bootstrap CI, the registry versions and the ``champion`` alias.

The test split never chooses: it is only reported. A method of ``train.methods`` without its
``metrics/<m>.json`` stops the stage (no champion is picked among the rest), so the registry's
previous champion stays in place.

Evaluation-only controls (``evaluate.controls``, e.g. ``contrastive+cross_attention``)
whose parts are all in ``train.methods`` and whose ``metrics/<control>.json`` exists are listed
beside the methods (``control: true``, with their gain CI) and never champion unless
``select.controls_compete``; ``joint`` is also compared with the control (``gain_over_control``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from crossalign import ensemble, registry, report
from crossalign.config import Config
from crossalign.io import load_npy, read_json, write_json
from crossalign.retrieval import METRIC_KEYS, RECALL_KS

log = logging.getLogger(__name__)
GAIN_KEYS = ("i2t_r1", "t2i_r1", "rsum")
_BOOT_CHUNK = 50  # bootstrap resamples drawn at once (bounds the (B, n_queries) index matrix)


def load_metrics(cfg: Config, root: Path) -> tuple[dict[str, dict], list[str]]:
    """method -> its metrics for every method of ``train.methods``; and the methods missing them."""
    found, missing = {}, []
    for method in cfg.train.methods:
        path = Path(root) / "metrics" / f"{method}.json"
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
    for control in cfg.evaluate.controls:
        if all(m in cfg.train.methods for m in ensemble.CONTROLS[control]):
            path = Path(root) / "metrics" / f"{control}.json"
            if path.exists():
                found[control] = read_json(path)
                if found[control].get("method") != control:
                    raise ValueError(f"{path}: method {found[control].get('method')!r}, expected {control!r}")
            else:
                log.warning("%s absent: the control %s is not listed (run evaluate_control)", path, control)
    return found, missing


def leaderboard(metrics: dict[str, dict]) -> list[dict]:
    """One row per method, best validation RSUM first: val RSUM, test metrics mean (± std)."""
    rows = []
    for method, m in metrics.items():
        std = m["test"].get("std", {})
        row = {"method": method, "val_rsum": m["val"]["rsum"], "seeds": m.get("seeds", []),
               "protocol": m.get("protocol", ""),
               "test": {k: m["test"][k] for k in (*METRIC_KEYS, "i2t_medr", "t2i_medr") if k in m["test"]},
               "test_std": {k: std[k] for k in METRIC_KEYS if std.get(k) is not None},
               "control": method in ensemble.CONTROLS}
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
    """Select the champion; write ``metrics/selection.json`` and ``reports/``; move the alias."""
    root = Path(root)
    metrics, missing = load_metrics(cfg, root)
    out_path = root / "metrics" / "selection.json"
    if missing:
        write_json(out_path, {"champion": None, "metric": cfg.select.metric, "missing": missing,
                              "leaderboard": leaderboard(metrics) if metrics else [],
                              "gain_over_baseline": {}, "registry": None})
        raise ValueError(f"no champion chosen: metrics/<method>.json missing for {missing} "
                         f"(train.methods = {cfg.train.methods}); run evaluate@<method> for them")
    board = leaderboard(metrics)
    champion = next(r["method"] for r in board if cfg.select.controls_compete or not r["control"])
    selection = {"champion": champion, "metric": f"val_{cfg.select.metric}", "leaderboard": board,
                 "gain_over_baseline": gains(cfg, root, metrics), "gain_over_control": {}, "missing": [],
                 "registry": None}
    for control in cfg.evaluate.controls:  # what joint training adds beyond the ensemble
        if control in metrics and "joint" in metrics:
            g = paired_bootstrap(query_hits(root, "joint", metrics["joint"]["seeds"]),
                                 query_hits(root, control, metrics[control]["seeds"]), cfg.select.bootstrap)
            selection["gain_over_control"]["joint"] = {**g, "text": gain_text(g), "control": control}
    files = report.run(cfg, root, selection)

    candidates = {}
    for method, m in metrics.items():
        if method in ensemble.CONTROLS:  # evaluation-only: no model of its own to register
            continue
        seed = m.get("scores_seed", m["seeds"][0] if m.get("seeds") else 0)
        run_id = (m.get("mlflow_run_ids") or {}).get(str(seed))
        if not run_id:
            raise ValueError(f"metrics/{method}.json names no MLflow run for seed {seed}: "
                             f"its model cannot be registered (did train@{method} log it?)")
        tags = {"val_rsum": m["val"]["rsum"], **{f"test_{k}": m["test"][k] for k in METRIC_KEYS}}
        candidates[method] = {"run_id": run_id, "seed": seed, "tags": tags}
    versions = registry.register_versions(cfg, root, candidates)
    if champion in versions:
        registry.set_champion(cfg, root, versions[champion])
    else:  # a competing control won: it has no model to point the alias at
        log.warning("champion %s is a control: the registry alias %s is not moved", champion, registry.CHAMPION)
    selection["registry"] = {"name": cfg.tracking.registered_model, "versions": versions,
                             "alias": registry.CHAMPION, "champion_version": versions.get(champion),
                             "uri": registry.champion_uri(cfg)}
    write_json(out_path, selection)
    best = next(r for r in board if r["method"] == champion)
    registry.log_selection(cfg, root, [out_path, *files],
                           {"champion_val_rsum": best["val_rsum"], "champion_test_rsum": best["test"]["rsum"]})
    log.info("champion: %s (val RSUM %.1f), version %s", champion, best["val_rsum"], versions.get(champion))
    return selection
