"""Ranking and the COCO retrieval metrics: pure functions over score matrices.

``scores`` is always ``[n_images, n_captions]`` (higher = better match) and
``caption_image`` maps each caption column to its image row, so images may have any number of
captions (COCO has 5-7). Chain: encode -> :func:`score_states` -> ranks -> metrics.

Ties are broken against the query everywhere (a true item tied with a false one ranks below
it), so a constant scorer scores chance, never R@1 = 100.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from crossalign.io import FeatureSplit, drop_pages
from crossalign.methods.base import Aligner, State, cat_states, index_state

RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
FOLD_IMAGES = 1000  # COCO 1K protocol: five folds of 1,000 images of the 5K test split
FOLDS = 5
_ROW_CHUNK = 512  # image rows ranked at once (bounds the (rows, M) comparison masks)
log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------ scoring
def describe_protocol(model: Aligner, block_images: int, block_texts: int) -> str:
    """How ``model`` is ranked, in words (written into the metrics)."""
    if model.embeds and model.rerank is not None:
        return f"shortlist k={model.rerank.k} re-rank alpha={model.rerank.alpha}"
    if model.embeds:
        return "embedding similarity"
    return f"exact all-pairs (blocks {block_images}x{block_texts})"


def encode_images(model: Aligner, split: FeatureSplit, device: torch.device, batch: int = 512,
                  progress: bool | None = None) -> State:
    """Project every image of the split once -> image state (batch-first tensors). Reads the
    memory-mapped features batch by batch, dropping their pages after each (bounded memory); the
    token grid only when the model reads tokens."""
    states = []
    for s in tqdm(range(0, split.n_images, batch), desc="encode images", unit="batch", leave=False,
                  disable=_quiet(progress)):
        pool = torch.from_numpy(np.array(split.image_pooled[s:s + batch])).to(device).float()  # (B, Di)
        if model.reads_tokens:
            tok = torch.from_numpy(np.array(split.image_tokens[s:s + batch])).to(device).float()  # (B, R, Di)
        else:
            tok = pool.new_zeros(pool.shape[0], 0, pool.shape[1])  # (B, 0, Di) unused
        states.append(model.encode_images(tok, pool))
        del tok, pool  # before the next batch is read: one batch resident at a time
        drop_pages(split.image_tokens), drop_pages(split.image_pooled)
    return cat_states(states)


def encode_texts(model: Aligner, split: FeatureSplit, device: torch.device, batch: int = 512,
                 progress: bool | None = None) -> State:
    """Project every caption of the split once -> text state; each batch is read from the packed
    token states and padded to its own longest caption, then token dims are padded to the longest."""
    states = []
    for s in tqdm(range(0, split.n_captions, batch), desc="encode captions", unit="batch", leave=False,
                  disable=_quiet(progress)):
        pool = torch.from_numpy(np.array(split.text_pooled[s:s + batch])).to(device).float()  # (B, Dt)
        if model.reads_tokens:
            tok_np, lengths_np = split.text.gather(slice(s, s + batch))  # (B, L, Dt) fp16, (B,)
            tok = torch.from_numpy(tok_np).to(device).float()  # (B, L, Dt)
            lengths = torch.from_numpy(lengths_np.astype(np.int64))  # (B,)
            mask = (torch.arange(tok.shape[1])[None, :] < lengths[:, None]).to(device)  # (B, L)
        else:
            tok = pool.new_zeros(pool.shape[0], 0, pool.shape[1])  # (B, 0, Dt) unused
            mask = torch.zeros(pool.shape[0], 0, dtype=torch.bool, device=device)  # (B, 0)
        states.append(model.encode_texts(tok, mask, pool))
        del tok, mask, pool
        drop_pages(split.text.tokens), drop_pages(split.text_pooled)
    return _pad_cat(states)


def _quiet(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None shows bars only on a terminal (stderr)."""
    return None if progress is None else not progress


def _pad_cat(states: list[State]) -> State:
    """Concatenate text states whose token dimension (dim 1) differs between batches."""
    out: State = {}
    for key in states[0]:
        parts = [s[key] for s in states]
        if parts[0].dim() >= 2 and len({p.shape[1] for p in parts}) > 1:
            width = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, [0, 0] * (p.dim() - 2) + [0, width - p.shape[1]]) for p in parts]
        out[key] = torch.cat(parts)
    return out


def _rows(state: State) -> int:
    return int(next(iter(state.values())).shape[0])


class _Meter:
    """A progress bar over ``total`` pairs (stderr) that logs once, after the first block, the pair
    count and the time expected at that block's rate."""

    def __init__(self, what: str, total: int, progress: bool | None):
        self.what, self.total, self.done, self.start = what, total, 0, time.perf_counter()
        self.bar = tqdm(total=total, desc=what, unit="pair", unit_scale=True, leave=False, disable=_quiet(progress))

    def update(self, pairs: int) -> None:
        if self.done == 0 and pairs:
            rate = pairs / max(time.perf_counter() - self.start, 1e-9)
            log.info("%s: %s pairs; first block at %.0f pairs/s -> about %.1f s", self.what,
                     f"{self.total:,}", rate, self.total / rate)
        self.done += pairs
        self.bar.update(pairs)

    def __enter__(self) -> "_Meter":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


@torch.inference_mode()
def score_states(model: Aligner, images: State, texts: State, block_images: int = 64,
                 block_texts: int = 512, pair_chunk: int = 4096,
                 progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(i2t scores, t2i scores), both float32 [N, M], from encoded states, ranking as the method
    defines (identical matrices unless it re-ranks):

    - embeds only: embedding similarity, ``block_images`` rows at a time;
    - matches only: exact all-pairs matching tiled in ``block_images x block_texts`` blocks, so
      memory is bounded by one block, never by the split;
    - both (``model.rerank`` set): similarity, then each image's top-k captions (rows, for i2t)
      and each caption's top-k images (columns, for t2i) re-scored by
      ``alpha * match + (1 - alpha) * sim`` in chunks of ``pair_chunk`` pairs.

    Every loop shows a progress bar (``progress``: None = on a terminal) and logs its pair count
    and expected time after its first block.
    """
    n, m = _rows(images), _rows(texts)
    if model.embeds:
        parts = []
        with _Meter("similarity", n * m, progress) as meter:
            for s in range(0, n, block_images):
                parts.append(model.similarity(index_state(images, slice(s, s + block_images)), texts).float())
                meter.update(parts[-1].numel())
        sim = torch.cat(parts)  # (N, M)
        del parts
        if model.rerank is None:
            out = sim.cpu().numpy()
            return out, out
        return _rerank(model, images, texts, sim, pair_chunk, progress)
    if not model.matches:
        raise TypeError(f"{type(model).__name__} neither embeds nor matches: it cannot rank")
    out_t = torch.empty(n, m)
    with _Meter("all-pairs matching", n * m, progress) as meter:
        for i in range(0, n, block_images):
            img = index_state(images, slice(i, i + block_images))
            for t in range(0, m, block_texts):
                block = model.match_block(img, index_state(texts, slice(t, t + block_texts))).float().cpu()  # (bi, bt)
                out_t[i:i + block_images, t:t + block_texts] = block
                meter.update(block.numel())
    out = out_t.numpy()
    return out, out


def fold_scores(model: Aligner, images: State, texts: State, caption_image: np.ndarray, block_images: int = 64,
                block_texts: int = 512, pair_chunk: int = 4096,
                progress: bool | None = None) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Each 1K fold scored on its own, as evaluating the fold alone would: a re-ranking method's
    shortlists come from the fold's own similarities (a fold cut out of the 5K matrices would
    re-rank only its members of the 5K top-k). None when the method does not re-rank (its fold
    scores are sub-matrices of the full ones) or the split has no folds."""
    n = _rows(images)
    if model.rerank is None or not fold_slices(n):
        return None
    caption_image = np.asarray(caption_image, np.int64)
    out = []
    for rows in fold_slices(n):
        cols = torch.from_numpy(fold_captions(caption_image, rows))  # (Mf,)
        out.append(score_states(model, index_state(images, rows), index_state(texts, cols), block_images,
                                block_texts, pair_chunk, progress))
    return out


@torch.inference_mode()
def encode_split(model: Aligner, split: FeatureSplit, device: torch.device | str = "cpu", encode_batch: int = 512,
                 progress: bool | None = None) -> tuple[Aligner, State, State]:
    """The model in eval mode on ``device`` and every image's and caption's state."""
    device = torch.device(device)
    model = model.eval().to(device)
    return (model, encode_images(model, split, device, encode_batch, progress),
            encode_texts(model, split, device, encode_batch, progress))


def score_matrices(model: Aligner, split: FeatureSplit, device: torch.device | str = "cpu",
                   block_images: int = 64, block_texts: int = 512, encode_batch: int = 512,
                   pair_chunk: int = 4096, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode a feature split once and score all images x all captions: (i2t, t2i), both
    float32 [N, M]; see :func:`score_states`."""
    model, images, texts = encode_split(model, split, device, encode_batch, progress)
    return score_states(model, images, texts, block_images, block_texts, pair_chunk, progress)


def score_matrix(model: Aligner, split: FeatureSplit, device: torch.device | str = "cpu",
                 block_images: int = 64, block_texts: int = 512, encode_batch: int = 512) -> np.ndarray:
    """The i2t matrix of :func:`score_matrices` (equal to the t2i one unless the method re-ranks)."""
    return score_matrices(model, split, device, block_images, block_texts, encode_batch)[0]


def _rerank(model: Aligner, images: State, texts: State, sim: Tensor,
            pair_chunk: int, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ALBEF two-stage ranking: shortlist top-k by similarity, re-rank it by the fused score.

    ``match`` runs on at most ``pair_chunk`` pairs at a time. Shortlisted entries are then
    shifted by one constant (over all chunks) so they lie above every non-shortlisted score,
    their order unchanged; the rest keep their similarity order.
    """
    assert model.rerank is not None
    k, alpha = model.rerank.k, model.rerank.alpha
    n, m = sim.shape
    ceiling = float(sim.max()) + 1.0

    def lifted(ii: Tensor, tt: Tensor, what: str) -> Tensor:
        fused = torch.empty(ii.shape[0], device=sim.device)  # (P,)
        with _Meter(what, ii.shape[0], progress) as meter:
            for s in range(0, ii.shape[0], pair_chunk):
                a, b = ii[s:s + pair_chunk], tt[s:s + pair_chunk]
                match = model.match(index_state(images, a), index_state(texts, b)).float()  # (p,)
                fused[s:s + pair_chunk] = alpha * match + (1 - alpha) * sim[a, b]
                meter.update(a.shape[0])
        return fused - fused.min() + ceiling

    i2t, t2i = sim.clone(), sim.clone()  # both up front: peak memory is reached before the slow part
    top = sim.topk(min(k, m), dim=1).indices.reshape(-1)  # (N*k,)
    ii = torch.arange(n, device=sim.device).repeat_interleave(min(k, m))  # (N*k,)
    i2t[ii, top] = lifted(ii, top, "re-rank i2t shortlist")
    top = sim.topk(min(k, n), dim=0).indices.reshape(-1)  # (k*M,) row-major over (k, M)
    tt = torch.arange(m, device=sim.device).repeat(min(k, n))  # (k*M,)
    t2i[top, tt] = lifted(top, tt, "re-rank t2i shortlist")
    return i2t.cpu().numpy(), t2i.cpu().numpy()

