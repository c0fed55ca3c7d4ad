"""``select``: the champion by validation RSUM, a leaderboard of test metrics, each method's gain
over the baseline and the champion's over every other method (bootstrap CIs over test images and
seeds), what the run was run on (:func:`run_facts`), the decision by need (:func:`decide`), serving
costs (parameters, pair-scorer calls and MACs per query: :func:`serving_costs`), the registry
versions and the ``champion`` alias.

Reads each method's ``eval/<m>/results.json``. Writes ``reports/selection.json`` (champion,
leaderboard, gains: a function of the evaluations) and ``metrics/selection.json`` (the champion's
name and its ``val_rsum`` / ``test_rsum``, the same keys as ``metrics/<m>.json``). Registry facts (version
numbers, run ids) change with every run, so they live in MLflow only: the model versions, the
alias and the ``select`` run's tags; :func:`run` returns them for the caller to print.

The test split never chooses: it is only reported (nor does it reach the tuned values, which
``tune@<method>`` scores on val; tests/test_choices_ignore_test.py replaces the test split and finds
the same tuned values, weights, ranking and champion). A method of ``train.methods`` without its
results stops the stage before anything is written (no champion is picked among the rest), so
the registry's previous champion and the previous selection files stay in place, consistent.

Evaluation-only controls (``evaluate.controls``, e.g. ``contrastive+cross_attention``) whose parts
are all in ``train.methods`` and whose ``eval/<control>/results.json`` exists are listed beside the
methods (``control: true``, with their gain CI) and never champion unless ``select.controls_compete``;
``joint`` is also compared with the control (``gain_over_control``): what joint training adds beyond
ensembling the two separately trained models.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from crossalign.select import costs
from crossalign.evaluate import ensemble
from crossalign.tracking import registry
from crossalign.select import report
from crossalign.train import tracker
from crossalign.config import Config
from crossalign.device import resolve_device
from crossalign.evaluate.stage import metrics_summary, results_path
from crossalign.io import load_features, load_npy, read_json, write_json
from crossalign.retrieval.protocol import METRIC_KEYS, RECALL_KS

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
    for control in cfg.evaluate.controls:
        if all(m in cfg.train.methods for m in ensemble.CONTROLS[control]):
            path = results_path(root, control)
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
            row["binding_probe"] = {k: probe["overall"][k] for k in ("i2t", "t2i", "mean", "ci95") if k in probe["overall"]}
        swap = (m["test"].get("swap_probe") or {}).get("overall") or {}
        if not swap.get("absent") and swap.get("i2t") is not None:  # i2t only: the image picks its caption
            row["swap_probe"] = {"mean": swap["i2t"], "ci95": {"mean": swap.get("ci95")}, "pairs": swap.get("pairs")}
        rows.append(row)
    order = {m: i for i, m in enumerate(metrics)}  # ties: the order of train.methods
    return sorted(rows, key=lambda r: (-r["val_rsum"], order[r["method"]]))


def caption_images(root: Path) -> np.ndarray:
    """(M,) image row of each test caption, from ``eval/test_index.json`` (``caption_image_ids``
    looked up in ``image_ids``): the unit the bootstrap resamples is the image, not the caption."""
    path = Path(root) / "eval" / "test_index.json"
    index = read_json(path)
    try:
        image_ids = np.asarray(index["image_ids"], dtype=np.int64)
        caption_ids = np.asarray(index["caption_image_ids"], dtype=np.int64)
    except KeyError as err:
        raise ValueError(f"{path}: missing key {err} (expected image_ids and caption_image_ids)") from None
    row_of = {int(i): r for r, i in enumerate(image_ids)}
    unknown = [j for j, c in enumerate(caption_ids) if int(c) not in row_of]
    if unknown:
        raise ValueError(f"{path}: caption_image_ids[{unknown[0]}] = {caption_ids[unknown[0]]} is not in image_ids "
                         f"({len(unknown)} captions name an unknown image)")
    rows = np.array([row_of[int(c)] for c in caption_ids], dtype=np.int64)  # (M,)
    return rows.astype(np.int64)


def query_hits(root: Path, method: str, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed, per-query hits on test: i2t (S, N, 3) and t2i (S, M, 3), K = 1/5/10, as 0/1 floats."""
    out = []
    for direction in ("i2t", "t2i"):
        per_seed = [np.asarray(load_npy(Path(root) / "eval" / method / "ranks" / f"seed-{s}" / f"test_{direction}.npy"))
                    for s in seeds]
        if len({r.shape for r in per_seed}) != 1:
            raise ValueError(f"eval/{method}/ranks: seeds disagree on the number of test {direction} queries")
        ranks = np.stack(per_seed)  # (S, Q)
        out.append(np.stack([ranks < k for k in RECALL_KS], axis=-1).astype(np.float64))  # (S, Q, 3)
    return out[0], out[1]


def _seed_weights(rng: np.random.Generator, b: int, n_seeds: int) -> np.ndarray:
    """(b, S) weights of a resample of the seeds with replacement (each row sums to 1)."""
    draws = rng.integers(0, n_seeds, (b, n_seeds))  # (b, S)
    return np.stack([np.bincount(row, minlength=n_seeds) for row in draws]) / n_seeds


def _image_counts(rng: np.random.Generator, b: int, n_images: int) -> np.ndarray:
    """(b, N) how often each image is drawn in a resample of the N test images with replacement."""
    draws = rng.integers(0, n_images, (b, n_images))  # (b, N)
    counts = np.zeros((b, n_images))
    np.add.at(counts, (np.arange(b)[:, None], draws), 1.0)
    return counts


def paired_bootstrap(method_hits: tuple[np.ndarray, np.ndarray], base_hits: tuple[np.ndarray, np.ndarray],
                     caption_image: np.ndarray, resamples: int, seed: int = 0) -> dict[str, dict]:
    """Gain of a method over another on R@1 (both directions) and RSUM, in points, with a 95 %
    percentile CI from a hierarchical paired bootstrap.

    Hits are ``(i2t (S, N, 3), t2i (S, M, 3))`` per seed (see :func:`query_hits`); ``caption_image``
    (M,) maps each caption to its image row. Each resample draws the seeds of each method with
    replacement (independent training runs: not paired), then the test **images** with replacement,
    the same images for both methods (paired); an image's captions travel with it and i2t and t2i
    come from the same resample, so the correlation between an image's captions, between the two
    directions and between seeds is kept. t2i recall of a resample is its captions' hit rate
    (images weighted by their caption count). The point estimate is the seed mean on the full split.
    """
    (m_i2t, m_t2i), (b_i2t, b_t2i) = method_hits, base_hits
    caption_image = np.asarray(caption_image, dtype=np.int64)
    n, m = m_i2t.shape[1], m_t2i.shape[1]
    if (b_i2t.shape[1], b_t2i.shape[1]) != (n, m):
        raise ValueError(f"test queries differ from the other method's: {n} images / {m} captions "
                         f"vs {b_i2t.shape[1]} / {b_t2i.shape[1]}")
    if caption_image.shape != (m,) or (m and (caption_image.min() < 0 or caption_image.max() >= n)):
        raise ValueError(f"caption_image {caption_image.shape} must map each of the {m} test captions "
                         f"to an image row in [0, {n})")

    def per_image(t2i: np.ndarray) -> np.ndarray:  # (S, M, 3) -> (S, N, 3): hits summed per image
        out = np.zeros((t2i.shape[0], n, t2i.shape[2]))
        np.add.at(out, (slice(None), caption_image), t2i)
        return out

    m_img, b_img = per_image(m_t2i), per_image(b_t2i)  # (S, N, 3), (S', N, 3)
    n_caps = np.bincount(caption_image, minlength=n).astype(np.float64)  # (N,)
    if (n_caps == 0).any():
        raise ValueError(f"test images {np.flatnonzero(n_caps == 0)[:10].tolist()} have no caption "
                         "(the COCO protocol needs at least one per image)")
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, _BOOT_CHUNK):
        b = min(_BOOT_CHUNK, resamples - start)
        u, v = _seed_weights(rng, b, m_i2t.shape[0]), _seed_weights(rng, b, b_i2t.shape[0])  # (b, S), (b, S')
        w = _image_counts(rng, b, n)  # (b, N)

        def mean_gain(mh: np.ndarray, bh: np.ndarray) -> np.ndarray:  # (S, N, 3), (S', N, 3) -> (b, 3)
            return (np.einsum("bs,bsk->bk", u, np.einsum("bn,snk->bsk", w, mh))
                    - np.einsum("bs,bsk->bk", v, np.einsum("bn,snk->bsk", w, bh)))

        i2t = mean_gain(m_i2t, b_i2t) / n  # (b, 3)
        t2i = mean_gain(m_img, b_img) / (w @ n_caps)[:, None]  # (b, 3)
        draws.append(np.concatenate([i2t, t2i], axis=1))  # (b, 6)
    boot = 100 * np.concatenate(draws)  # (B, 6) points
    samples = {"i2t_r1": boot[:, 0], "t2i_r1": boot[:, 3], "rsum": boot.sum(1)}
    d_i2t = m_i2t.mean((0, 1)) - b_i2t.mean((0, 1))  # (3,)
    d_t2i = m_t2i.mean((0, 1)) - b_t2i.mean((0, 1))  # (3,)
    point = {"i2t_r1": 100 * d_i2t[0], "t2i_r1": 100 * d_t2i[0], "rsum": 100 * (d_i2t.sum() + d_t2i.sum())}
    out = {}
    for key in GAIN_KEYS:
        lo, hi = np.percentile(samples[key], [2.5, 97.5])
        out[key] = {"delta": float(point[key]), "ci95": [float(lo), float(hi)],
                    "significant": bool(lo > 0 or hi < 0)}  # the CI excludes 0
    return out


def gain_text(gain: dict[str, dict]) -> str:
    """The article's form: '+3.2 R@1 (i2t) [95% CI +1.0, +5.1]; ...; +12.0 RSUM [...]'."""
    names = {"i2t_r1": "R@1 (i2t)", "t2i_r1": "R@1 (t2i)", "rsum": "RSUM"}
    return "; ".join(f"{g['delta']:+.1f} {names[k]} [95% CI {g['ci95'][0]:+.1f}, {g['ci95'][1]:+.1f}]"
                     for k, g in gain.items())


class _Hits:
    """Per-seed test hits of each method, loaded once and shared by every comparison."""

    def __init__(self, root: Path, metrics: dict[str, dict]):
        self.root, self.metrics, self.cache = Path(root), metrics, {}
        self.caption_image = caption_images(root)

    def __getitem__(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        if method not in self.cache:
            self.cache[method] = query_hits(self.root, method, self.metrics[method]["seeds"])
        return self.cache[method]


def compare(hits: _Hits, method: str, other: str, resamples: int) -> dict:
    """``method`` minus ``other``: the bootstrap gain, its text and which method it is against."""
    try:
        g = paired_bootstrap(hits[method], hits[other], hits.caption_image, resamples)
    except ValueError as err:
        raise ValueError(f"eval/{method} vs eval/{other}: {err}") from None
    return {**g, "text": gain_text(g), "baseline": other}


def gains(cfg: Config, root: Path, metrics: dict[str, dict], hits: _Hits | None = None) -> dict[str, dict]:
    """Each method's gain over ``select.baseline`` (test, image-level bootstrap CI)."""
    hits = hits or _Hits(root, metrics)
    base = cfg.select.baseline
    return {m: compare(hits, m, base, cfg.select.bootstrap) for m in metrics if m != base}


def champion_gains(cfg: Config, root: Path, metrics: dict[str, dict], champion: str,
                   hits: _Hits | None = None) -> dict[str, dict]:
    """The champion's gain over every other method (is the runner-up really behind?)."""
    hits = hits or _Hits(root, metrics)
    return {m: compare(hits, champion, m, cfg.select.bootstrap) for m in metrics if m != champion}


def run(cfg: Config, root: Path) -> dict:
    """Select the champion; write ``reports/`` and ``metrics/selection.json``; register every
    method's kept seed and move the alias -> the selection with its ``registry`` facts."""
    root = Path(root)
    metrics, missing = load_metrics(cfg, root)
    if missing:
        raise ValueError(f"no champion chosen: eval/<method>/results.json missing for {missing} "
                         f"(train.methods = {cfg.train.methods}); run evaluate@<method> for them")
    candidates = {method: _candidate(cfg, root, method, m) for method, m in metrics.items()
                  if method not in ensemble.CONTROLS}  # a control has no model of its own to register
    board = leaderboard(metrics)
    champion = next(r["method"] for r in board if cfg.select.controls_compete or not r["control"])
    hits = _Hits(root, metrics)
    selection = {"champion": champion, "metric": f"val_{cfg.select.metric}", "leaderboard": board,
                 "gain_over_baseline": gains(cfg, root, metrics, hits),
                 "champion_vs": champion_gains(cfg, root, metrics, champion, hits),
                 "gain_over_control": {}, "missing": []}
    for control in cfg.evaluate.controls:  # what joint training adds beyond the ensemble
        if control in metrics and "joint" in metrics:
            selection["gain_over_control"]["joint"] = {**compare(hits, "joint", control, cfg.select.bootstrap),
                                                       "control": control}
    selection["tuning"] = tuning_boards(root, cfg.train.methods)
    models = costs.load_models(root, {m: x for m, x in metrics.items() if m not in ensemble.CONTROLS})
    test = load_features(root / "data" / "features" / "test")
    selection["serving"] = serving_costs(cfg, models, costs.query_shape(test), [r["method"] for r in board])
    for row in board:  # trainable parameters: a control counts both of its separately trained models
        row["params"] = (selection["serving"].get(row["method"]) or {}).get("params")
    selection["run"] = run_facts(cfg, root)
    selection["decision"] = decide(cfg, selection)
    device = resolve_device(cfg.evaluate.device, "evaluate.device")
    measured = costs.measure(cfg, root, models, metrics, test, device)  # timings: never in reports/
    machine = costs.machine(device)
    files = report.run(cfg, root, selection, measured=(measured, machine))
    facts_path = root / "reports" / "selection.json"
    write_json(facts_path, selection)
    numbers = selection_metrics(metrics[champion])
    out_path = root / "metrics" / "selection.json"
    write_json(out_path, selection_file(champion, numbers))

    versions = registry.register_versions(cfg, root, candidates)
    if champion in versions:
        registry.set_champion(cfg, root, versions[champion])
    else:  # a competing control won: it has no model to point the alias at
        log.warning("champion %s is a control: the registry alias %s is not moved", champion, registry.CHAMPION)
    facts = {"name": cfg.tracking.registered_model, "versions": versions, "alias": registry.CHAMPION,
             "champion_version": versions.get(champion), "uri": registry.champion_uri(cfg),
             "run_ids": {m: c["run_id"] for m, c in candidates.items()}}
    cost_files = costs.write(root, measured, machine)  # not a DVC out: timings vary
    registry.log_selection(cfg, root, [out_path, facts_path, *files, *cost_files],
                           {**{f"champion_{k}": v for k, v in numbers.items()}, **costs.mlflow_metrics(measured)},
                           tags={"champion": champion, "champion_version": str(versions.get(champion)),
                                 **{f"version.{m}": v for m, v in versions.items()}})
    best = next(r for r in board if r["method"] == champion)
    log.info("champion: %s (val RSUM %.1f), version %s", champion, best["val_rsum"], versions.get(champion))
    return {**selection, "registry": facts}


# ------------------------------------------------------------------ what the run was run on
SPLITS = ("train", "val", "test")
SAMPLER_NAMES = {"tpe": "TPE", "random": "random search", "qmc": "quasi-random (Sobol)"}


def split_facts(root: Path, split: str) -> dict | None:
    """Images, captions and caption token states of one feature split, from its ``meta.json``
    (written by the features stage); None when the split has no features. A count the file lacks
    is None (said as unknown in the report); a count that is not a whole number is an error."""
    path = Path(root) / "data" / "features" / split / "meta.json"
    if not path.exists():
        return None
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object (the features stage's split meta)")
    out = {}
    for key, name in (("n_images", "images"), ("n_captions", "captions"), ("n_text_tokens", "text_tokens")):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{path}: {key} = {value!r}, expected a count (a whole number >= 0)")
        out[name] = value
    return out


def base_name(path: str) -> str:
    """The last part of a path (either separator), without a trailing separator."""
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def public_name(name: Any) -> str | None:
    """An encoder name without the machine's path: an absolute, home-relative or drive path (after
    an optional ``kind:`` prefix such as ``hf:``) keeps only its last part."""
    if name is None:
        return None
    text = str(name)
    prefix, sep, rest = text.partition(":")
    if not sep or len(prefix) == 1 or any(c in prefix for c in "/\\"):  # no kind prefix (or a drive letter)
        prefix, rest = "", text
    if rest.startswith(("/", "~", "\\")) or re.match(r"[A-Za-z]:[\\/]", rest):
        rest = base_name(rest)
    return f"{prefix}:{rest}" if prefix else rest


def _encoder(meta: dict, key: str, configured: str) -> dict:
    """The encoder the features were made with (their meta.json), else the configured name."""
    enc = meta.get(key) if isinstance(meta.get(key), dict) else {}
    out = {"name": public_name(enc.get("name") or configured), "dim": enc.get("dim")}
    if key == "image_encoder":
        out["tokens"] = enc.get("tokens", meta.get("regions"))
        out["grid"] = enc.get("grid")
    elif enc.get("token_states"):
        out["token_states"] = enc["token_states"].split(" (")[0]  # "output of layer 3 of 6"
    return out


def run_facts(cfg: Config, root: Path) -> dict:
    """What the comparison was run on, for the top of the report: dataset (for a folder dataset
    its base name, never its path), images / captions / tokens per split, the encoders, the seeds,
    the tuning budget and the training epochs. Read from params and ``data/features/<split>/meta.json``
    (select's deps in dvc.yaml); a function of them, no machine path."""
    root = Path(root)
    dataset = cfg.data.dataset
    if dataset == "coco-folder" and cfg.data.folder:
        dataset = f"{dataset} ({base_name(cfg.data.folder)})"  # its base name: never the machine's path
    test_meta = root / "data" / "features" / "test" / "meta.json"
    meta = read_json(test_meta) if test_meta.exists() else {}
    meta = meta if isinstance(meta, dict) else {}
    t = cfg.tune
    return {"dataset": dataset, "splits": {s: split_facts(root, s) for s in SPLITS},
            "image_encoder": _encoder(meta, "image_encoder", cfg.features.image_encoder),
            "text_encoder": _encoder(meta, "text_encoder", cfg.features.text_encoder),
            "seeds": list(cfg.train.seeds), "train_epochs": cfg.train.epochs,
            "tuning": {"trials": t.trials, "epochs": t.epochs, "sampler": SAMPLER_NAMES.get(t.sampler, t.sampler)}}


# ------------------------------------------------------------------ costs that are functions of the inputs
def serving_costs(cfg: Config, models: dict[str, Any], shape: costs.QueryShape, methods: list[str]) -> dict[str, dict]:
    """method -> trainable params, how it serves (``index`` words and ``kind``), pair-scorer calls
    and MACs per text query at the test split's ``shape``; a control (``ensemble.CONTROLS``) is
    costed as the composite it is evaluated as (params: both of its trained models)."""
    out = {}
    for method in methods:
        if method in models:
            model = models[method]
        elif method in ensemble.CONTROLS and all(p in models for p in ensemble.CONTROLS[method]):
            model = ensemble.build(cfg, *(models[p] for p in ensemble.CONTROLS[method]))
        else:
            continue
        out[method] = {"params": costs.trainable_params(model), "index": costs.serving(model),
                       "kind": costs.serving_kind(model), **costs.query_costs(model, shape)}
    shape_text = shape.text()
    for entry in out.values():
        entry["shape"] = shape_text
    return out


# ------------------------------------------------------------------ the decision, by need
def cost_key(entry: dict | None) -> tuple[float, float, float]:
    """Cheaper first: fewer pair-scorer calls per query, then fewer MACs per query, then fewer
    trainable parameters (an unknown count sorts last)."""
    entry = entry or {}
    return tuple(float("inf") if entry.get(k) is None else float(entry[k]) for k in ("pairs", "macs", "params"))


def _rsum(gain: dict | None) -> dict | None:
    return None if gain is None else {k: gain["rsum"][k] for k in ("delta", "ci95", "significant")}


def binding_need(board: list[dict], allowed: list[str]) -> dict | None:
    """The *binding / compositional sensitivity* row: the method of ``allowed`` with the best
    binding probe mean, its 95 % CI, the next best and whether their CIs are apart.

    Evidence, first found: the twin probe (the leaderboard's ``binding_probe``: true scene vs its
    binding twin, on data with twins), else the caption-swap probe (``swap_probe``: an image's true
    caption vs its word-swap perturbations, i2t, any captions). None when neither was measured
    for a method of ``allowed``."""
    for key, name in (("binding_probe", "twin"), ("swap_probe", "caption-swap")):
        rows = sorted((r for r in board if r["method"] in allowed and (r.get(key) or {}).get("mean") is not None),
                      key=lambda r: -r[key]["mean"])
        if rows:
            break
    else:
        return None

    def cell(row: dict) -> dict:
        p = row[key]
        ci = (p.get("ci95") or {}).get("mean")
        return {"method": row["method"], "mean": p["mean"], "ci95": list(ci) if ci else None}

    best = cell(rows[0])
    out = {"probe": name, **best, "above_chance": bool(best["ci95"] and best["ci95"][0] > 50.0), "next": None}
    if len(rows) > 1:
        nxt = cell(rows[1])
        out["next"] = nxt
        out["apart"] = bool(best["ci95"] and nxt["ci95"] and best["ci95"][0] > nxt["ci95"][1])
    return out


def decide(cfg: Config, selection: dict) -> dict:
    """Which method for which need, each with its evidence (the report's decision table).

    Only methods that may be recommended compete (evaluation-only controls do not, unless
    ``select.controls_compete``); controls are listed apart. Rows: best retrieval quality (the
    champion; a tie when the champion's test RSUM lead over the runner-up, by val RSUM, has a CI
    containing 0, and then the cheaper of the two by :func:`cost_key`), the best method servable
    from an embedding index and its gap to the champion, the best binding probe
    (:func:`binding_need`), and the cheapest method per query among those within noise of the
    champion (the champion and every method whose RSUM difference to it has a CI containing 0)."""
    board, champ = selection["leaderboard"], selection["champion"]
    vs, serving = selection.get("champion_vs") or {}, selection.get("serving") or {}
    allowed = [r["method"] for r in board if cfg.select.controls_compete or not r.get("control")]
    val = {r["method"]: r["val_rsum"] for r in board}
    quality = {"method": champ, "val_rsum": val[champ], "runner_up": None, "rsum": None, "tie": False, "pick": champ}
    others = [m for m in allowed if m != champ]
    if others:
        runner = others[0]  # the board is sorted by val RSUM
        gain = _rsum(vs.get(runner))
        tie = gain is not None and not gain["significant"]
        pick = min((champ, runner), key=lambda m: cost_key(serving.get(m))) if tie else champ
        quality.update(runner_up=runner, runner_up_val_rsum=val[runner], rsum=gain, tie=tie, pick=pick)
    index = [m for m in allowed if (serving.get(m) or {}).get("kind") == "index"]
    best_index = {"method": index[0], "val_rsum": val[index[0]], "is_champion": index[0] == champ,
                  "gap": None if index[0] == champ else _rsum(vs.get(index[0]))} if index else None
    near = [champ] + [m for m in others if vs.get(m) and not vs[m]["rsum"]["significant"]]
    cheapest = min(near, key=lambda m: cost_key(serving.get(m)))
    controls = [{"method": r["method"], "val_rsum": r["val_rsum"], "vs_champion": _rsum(vs.get(r["method"]))}
                for r in board if r.get("control") and r["method"] not in allowed]
    single = [r["method"] for r in board if r["method"] in allowed and len(r.get("seeds") or []) <= 1]
    return {"recommendable": allowed, "quality": quality, "index": best_index,
            "binding": binding_need(board, allowed),
            "cost": {"method": cheapest, "within_noise": near}, "controls": controls, "single_seed": single}


def tuning_boards(root: Path, methods: list[str]) -> dict | None:
    """The defaults and tuned rankings of ``tune@<method>`` (:func:`crossalign.train.tuning.leaderboards`),
    or None when no method has a ``tuned/<m>.json`` (select run outside the DAG)."""
    from crossalign.train import tuning

    if not any(tuning.tuned_path(root, m).exists() for m in methods):
        return None
    return tuning.leaderboards(root, methods)


def selection_metrics(champion_results: dict) -> dict[str, float]:
    """The champion's ``val_rsum`` and ``test_rsum`` under the keys of ``metrics/<m>.json`` (so
    ``dvc metrics show`` adds no column for them)."""
    summary = metrics_summary(champion_results)
    return {k: summary[k] for k in ("val_rsum", "test_rsum")}


def selection_file(champion: str, numbers: dict[str, float]) -> dict[str, str | float]:
    """``metrics/selection.json``: the champion's name (``dvc metrics show`` prints a string
    metric in its own ``champion`` column) and its :func:`selection_metrics`. A function of the
    evaluations: no run id, version or timing."""
    return {"champion": champion, **numbers}


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
    candidate = {"run_id": run_id, "seed": seed,
                 "tags": {"val_rsum": val, **{f"test_{k}": m["test"][k] for k in METRIC_KEYS}, "weights_sha256": sha},
                 "description": tracker.version_description(
                     method, seed, f"val RSUM {val:.1f} (selection), test RSUM {test:.1f}", sha)}
    fusion = (m.get("fusion") or {}).get("per_seed", {}).get(str(seed))
    if fusion:  # a re-ranking method: register the run's model that ranks at the alpha val chose
        candidate["artifact"] = fusion.get("mlflow_model", registry.MODEL_ARTIFACT)
        candidate["tags"]["fusion_alpha"] = fusion["alpha"]
        candidate["description"] += f"; fusion alpha {fusion['alpha']:g} chosen on val"
    return candidate
