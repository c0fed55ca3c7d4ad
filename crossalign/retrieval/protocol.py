"""The COCO retrieval protocol: ranks and recall over score matrices (pure numpy functions).

``scores`` is always ``[n_images, n_captions]`` (higher = better match) and
``caption_image`` maps each caption column to its image row, so images may have any number of
captions (COCO has 5-7): image->text scores a hit at K if **any** of the image's captions ranks in
the top K. The 1K protocol is the mean over five 1,000-image folds of a 5,000-image split.

Ties are broken against the query everywhere (a true item tied with a false one ranks below
it), so a constant scorer scores chance, never R@1 = 100.
"""
from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
FOLD_IMAGES = 1000  # COCO 1K protocol: five folds of 1,000 images of the 5K test split
FOLDS = 5
_ROW_CHUNK = 512  # image rows ranked at once (bounds the (rows, M) comparison masks)


def _check(scores: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float32)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if scores.ndim != 2 or caption_image.ndim != 1 or scores.shape[1] != caption_image.shape[0]:
        raise ValueError(f"scores {scores.shape} must be [n_images, n_captions] with one caption_image "
                         f"entry per column, got caption_image {caption_image.shape}")
    if caption_image.size and (caption_image.min() < 0 or caption_image.max() >= scores.shape[0]):
        raise ValueError(f"caption_image holds rows outside [0, {scores.shape[0]}): "
                         f"min {caption_image.min()}, max {caption_image.max()}")
    missing = np.setdiff1d(np.arange(scores.shape[0]), caption_image)
    if missing.size:
        raise ValueError(f"images {missing[:10].tolist()} have no caption; every image needs at least one")
    if np.isnan(scores).any():
        bad = np.argwhere(np.isnan(scores))[0].tolist()
        raise ValueError(f"scores contain NaN (first at image row {bad[0]}, caption column {bad[1]})")
    return scores, caption_image


def i2t_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of each image's best-ranked true caption -> (n_images,).

    A true caption's rank is the number of captions scoring strictly higher plus the number of
    *false* captions scoring equal (pessimistic ties).
    """
    scores, caption_image = _check(scores, caption_image)
    n, m = scores.shape
    own = scores[caption_image, np.arange(m)]  # (M,) score of each caption with its own image
    best = np.full(n, -np.inf, dtype=np.float32)
    np.maximum.at(best, caption_image, own)  # (N,) best true-caption score per image
    ranks = np.empty(n, dtype=np.int64)
    for s in range(0, n, _ROW_CHUNK):
        rows = scores[s:s + _ROW_CHUNK]  # (C, M)
        b = best[s:s + _ROW_CHUNK, None]  # (C, 1)
        false = caption_image[None, :] != np.arange(s, s + rows.shape[0])[:, None]  # (C, M)
        ranks[s:s + rows.shape[0]] = (rows > b).sum(1) + ((rows == b) & false).sum(1)
    return ranks


def t2i_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of each caption's image among all images -> (n_captions,); ties pessimistic."""
    scores, caption_image = _check(scores, caption_image)
    true = scores[caption_image, np.arange(scores.shape[1])]  # (M,)
    higher = (scores > true[None, :]).sum(0)  # (M,)
    ties = (scores == true[None, :]).sum(0) - 1  # (M,) other images tied with the true one
    return (higher + ties).astype(np.int64)


def recall_from_ranks(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@1/5/10 (percent) and the 1-based median rank of one direction's per-query ranks."""
    ranks = np.asarray(ranks)
    out = {f"{prefix}_r{k}": float(100.0 * (ranks < k).mean()) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    return out


def metrics_from_ranks(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """The COCO metrics from per-query ranks of both directions (used again by the bootstrap)."""
    out = recall_from_ranks(i2t, "i2t")
    out.update(recall_from_ranks(t2i, "t2i"))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out


def retrieval_metrics(scores: np.ndarray, caption_image: np.ndarray,
                      scores_t2i: np.ndarray | None = None) -> dict[str, float]:
    """COCO protocol: i2t R@1/5/10 (hit when *any* caption of the image is in the top K),
    t2i R@1/5/10, RSUM (sum of the six, max 600) and median ranks (1-based).

    ``scores_t2i``: a separate matrix for text->image when the method ranks the two directions
    differently (shortlist re-rank); defaults to ``scores``.
    """
    t2i_scores = scores if scores_t2i is None else scores_t2i
    if np.shape(t2i_scores) != np.shape(scores):
        raise ValueError(f"scores_t2i {np.shape(t2i_scores)} differs from scores {np.shape(scores)}")
    return metrics_from_ranks(i2t_ranks(scores, caption_image), t2i_ranks(t2i_scores, caption_image))


def fold_slices(n_images: int) -> list[slice]:
    """The 1K folds of the COCO protocol: five 1,000-image slices when the split has 5,000
    images, else none (the 1K numbers only mean something on the 5K test split)."""
    if n_images != FOLD_IMAGES * FOLDS:
        return []
    return [slice(f * FOLD_IMAGES, (f + 1) * FOLD_IMAGES) for f in range(FOLDS)]


def coco_metrics(i2t_scores: np.ndarray, t2i_scores: np.ndarray, caption_image: np.ndarray,
                 folds: list[tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Full-split metrics (5K when N = 5,000) plus ``"1k"``: the mean over the five 1K folds,
    each fold with its own images' captions. ``folds``: each fold's own (i2t, t2i) scores when
    they are not sub-matrices of the full ones (re-ranking: :func:`fold_scores`); by default cut
    out of the full matrices. Returns (metrics, i2t ranks, t2i ranks)."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    i2t, t2i = i2t_ranks(i2t_scores, caption_image), t2i_ranks(t2i_scores, caption_image)
    out: dict = metrics_from_ranks(i2t, t2i)
    per_fold = []
    for f, rows in enumerate(fold_slices(np.shape(i2t_scores)[0])):
        cols = fold_captions(caption_image, rows)  # (Mf,)
        sub_ci = caption_image[cols] - rows.start
        if folds is not None:
            per_fold.append(retrieval_metrics(folds[f][0], sub_ci, folds[f][1]))
        else:
            per_fold.append(retrieval_metrics(np.asarray(i2t_scores)[rows][:, cols], sub_ci,
                                              np.asarray(t2i_scores)[rows][:, cols]))
    if per_fold:
        out["1k"] = {k: float(np.mean([f[k] for f in per_fold])) for k in per_fold[0]}
    return out, i2t, t2i


def fold_captions(caption_image: np.ndarray, rows: slice) -> np.ndarray:
    """Caption columns whose image lies in the fold's image ``rows`` -> (Mf,)."""
    return np.flatnonzero((caption_image >= rows.start) & (caption_image < rows.stop))
