"""The binding probe: does the true image / caption beat its binding twin's? With 95 % CIs.

A *binding twin* is the same scene with one swap between its two focal objects (colour, size or
position; :mod:`crossalign.data.synthetic`); both twins' captions hold the same words. For each
unordered twin pair (a, b) and each side x in {a, b} with twin y:

- i2t: for image x, every true caption of x against every caption of y;
- t2i: for every caption of x, image x against image y.

A win scores 1, a tie 0.5; chance is 50 %. The comparisons of one pair share a scene, so they are
not independent: the **pair** is the unit. The 95 % CI is a percentile bootstrap that resamples
pairs with replacement (``RESAMPLES`` draws, fixed seed: the same scores give the same interval)
and recomputes the pooled win rate (sum of wins / sum of comparisons) of each direction and their
mean from the same draw. Kinds are summarised separately and together ("overall").

The probe's premise, that no test twin pair's image or scene was in train, is checked by the
features stage (:mod:`crossalign.features.leaks`).
"""
from __future__ import annotations

import numpy as np

CHANCE = 50.0
RESAMPLES = 2000
SEED = 0
LEVEL = 95.0


def pair_tallies(i2t_scores: np.ndarray, t2i_scores: np.ndarray, caption_image: np.ndarray,
                 twins: list[dict]) -> tuple[list[str], np.ndarray]:
    """Per unordered twin pair -> (kinds (P,), tallies (P, 4): i2t wins, i2t comparisons, t2i wins,
    t2i comparisons). ``i2t_scores`` / ``t2i_scores`` are (N, M) image x caption scores."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    caps = {int(i): np.flatnonzero(caption_image == i) for i in np.unique(caption_image)}
    seen: set[frozenset] = set()
    kinds: list[str] = []
    rows: list[list[float]] = []

    def win(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a > b) + 0.5 * (a == b)

    for j, twin in enumerate(twins):
        try:
            a, b, kind = int(twin["image"]), int(twin["twin"]), str(twin.get("swap") or "unknown")
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"twins[{j}] = {twin!r}: expected {{'image': row, 'twin': row, 'swap': kind}}") from None
        if a not in caps or b not in caps:
            raise ValueError(f"twins[{j}]: image row {a if a not in caps else b} has no caption in the split")
        if a == b or frozenset((a, b)) in seen:
            continue
        seen.add(frozenset((a, b)))
        t = [0.0, 0.0, 0.0, 0.0]
        for x, y in ((a, b), (b, a)):
            w = win(i2t_scores[x, caps[x]][:, None], i2t_scores[x, caps[y]][None, :])  # (cx, cy)
            t[0] += float(w.sum()); t[1] += w.size
            w = win(t2i_scores[x, caps[x]], t2i_scores[y, caps[x]])  # (cx,)
            t[2] += float(w.sum()); t[3] += w.size
        kinds.append(kind)
        rows.append(t)
    return kinds, np.asarray(rows, np.float64).reshape(-1, 4)


def bootstrap_index(n_pairs: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(B, P) pair indices drawn with replacement, from a generator seeded by ``seed`` only."""
    return np.random.default_rng(seed).integers(0, n_pairs, size=(resamples, n_pairs))


def interval(tallies: np.ndarray, index: np.ndarray, level: float = LEVEL) -> dict[str, list[float]]:
    """Percentile CIs (np.percentile, linear) of the pooled i2t, t2i and mean win rates (%) over the
    resamples ``index (B, P)`` of the pairs ``tallies (P, 4)``."""
    draws = tallies[index].sum(axis=1)  # (B, 4) summed over the resampled pairs
    with np.errstate(invalid="ignore", divide="ignore"):
        i2t = 100.0 * draws[:, 0] / draws[:, 1]  # (B,)
        t2i = 100.0 * draws[:, 2] / draws[:, 3]  # (B,)
    tail = (100.0 - level) / 2
    out = {}
    for name, x in (("i2t", i2t), ("t2i", t2i), ("mean", (i2t + t2i) / 2)):
        lo, hi = np.percentile(x, [tail, 100.0 - tail])
        out[name] = [float(lo), float(hi)]
    return out


def summarise(tallies: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Pooled win rates (%) of pairs ``tallies (P, 4)``, their mean, CIs and counts."""
    iw, i_n, tw, t_n = tallies.sum(axis=0)
    i2t, t2i = 100.0 * iw / i_n, 100.0 * tw / t_n
    return {"i2t": float(i2t), "t2i": float(t2i), "mean": float((i2t + t2i) / 2),
            "ci95": interval(tallies, bootstrap_index(len(tallies), resamples, seed)),
            "pairs": int(len(tallies)), "i2t_comparisons": int(i_n), "t2i_comparisons": int(t_n)}


def probe_from_tallies(kinds: list[str], tallies: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The probe record: ``overall`` and ``per_swap`` summaries (see the module docstring)."""
    kinds_arr = np.asarray(kinds, dtype=object)
    return {"chance": CHANCE, "unit": "twin pair", "resamples": resamples,
            "overall": summarise(tallies, resamples, seed),
            "per_swap": {k: summarise(tallies[kinds_arr == k], resamples, seed) for k in sorted(set(kinds))}}


def binding_probe(i2t_scores: np.ndarray, t2i_scores: np.ndarray, caption_image: np.ndarray,
                  twins: list[dict], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """How often the true item beats its binding twin's, overall and per swap kind, with pair-
    bootstrap 95 % CIs; raises on twins naming rows without captions or no pair at all."""
    kinds, tallies = pair_tallies(i2t_scores, t2i_scores, caption_image, twins)
    if not kinds:
        raise ValueError("binding_probe: no twin pair with two distinct images")
    return probe_from_tallies(kinds, tallies, resamples, seed)
