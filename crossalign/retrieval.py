"""Ranking and the COCO retrieval metrics: pure functions over score matrices.

``scores`` is always ``[n_images, n_captions]`` (higher = better match) and
``caption_image`` maps each caption column to its image row, so images may have any number of
captions (COCO has 5-7). Chain: encode -> :func:`score_matrix` -> :func:`retrieval_metrics`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from crossalign.io import FeatureSplit
from crossalign.methods.base import Aligner, State, cat_states, index_state

RECALL_KS = (1, 5, 10)


def i2t_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of each image's best-ranked true caption -> (n_images,).

    Ties count against the query: a true caption's rank is the number of captions scoring
    strictly higher plus the number of *false* captions scoring equal (pessimistic), so a
    constant scorer cannot reach R@1 = 100.
    """
    n_img = scores.shape[0]
    ranks = np.empty(n_img, dtype=np.int64)
    for i in range(n_img):
        row = scores[i]
        true = caption_image == i
        best = row[true].max()
        ranks[i] = int((row > best).sum() + ((row == best) & ~true).sum())
    return ranks


def t2i_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of each caption's image among all images -> (n_captions,); ties pessimistic."""
    cols = np.arange(scores.shape[1])
    true = scores[caption_image, cols]  # (M,)
    higher = (scores > true[None, :]).sum(0)
    ties = (scores == true[None, :]).sum(0) - 1
    return (higher + ties).astype(np.int64)


def recall_from_ranks(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": float(100.0 * (ranks < k).mean()) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    return out


def retrieval_metrics(scores: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """COCO protocol: i2t R@1/5/10 (hit when *any* caption of the image is in the top K),
    t2i R@1/5/10, RSUM (sum of the six, max 600) and median ranks (1-based)."""
    scores = np.asarray(scores, dtype=np.float32)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    if scores.shape[1] != caption_image.shape[0]:
        raise ValueError(f"scores has {scores.shape[1]} caption columns, caption_image {caption_image.shape[0]}")
    missing = np.setdiff1d(np.arange(scores.shape[0]), caption_image)
    if missing.size:
        raise ValueError(f"images {missing[:10].tolist()} have no caption; every image needs at least one")
    out = recall_from_ranks(i2t_ranks(scores, caption_image), "i2t")
    out.update(recall_from_ranks(t2i_ranks(scores, caption_image), "t2i"))
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return out


# ------------------------------------------------------------------------------------ scoring
def _encode(model: Aligner, split: FeatureSplit, device: torch.device, batch: int) -> tuple[State, State]:
    """Project every image and caption of the split once -> (image state, text state)."""
    img_states, txt_states = [], []
    for s in range(0, split.n_images, batch):
        tok = torch.from_numpy(np.asarray(split.image_tokens[s:s + batch])).to(device).float()
        pool = torch.from_numpy(np.asarray(split.image_pooled[s:s + batch])).to(device).float()
        img_states.append(model.encode_images(tok, pool))
    for s in range(0, split.n_captions, batch):
        lengths = torch.from_numpy(np.asarray(split.text_lengths[s:s + batch])).long()
        width = int(lengths.max())
        tok = torch.from_numpy(np.asarray(split.text_tokens[s:s + batch, :width])).to(device).float()
        mask = (torch.arange(width)[None, :] < lengths[:, None]).to(device)  # (B, L)
        pool = torch.from_numpy(np.asarray(split.text_pooled[s:s + batch])).to(device).float()
        txt_states.append(model.encode_texts(tok, mask, pool))
    return cat_states(img_states), _pad_cat(txt_states)


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


@torch.inference_mode()
def score_matrix(model: Aligner, split: FeatureSplit, device: torch.device | str = "cpu",
                 block_images: int = 64, block_texts: int = 512, encode_batch: int = 512) -> np.ndarray:
    """All images x all captions scores (float32 [N, M]) with the ranking the method defines:

    - embeds only: embedding similarity;
    - matches only: exact all-pairs matching, tiled in (block_images x block_texts) blocks so
      memory is bounded by a block, never by the split;
    - both (``model.rerank`` set): similarity, then each image's top-k captions and each
      caption's top-k images re-scored by ``alpha * match + (1 - alpha) * sim``, placed above
      every non-shortlisted candidate. Rows rank captions for i2t, columns images for t2i, so
      the two directions get separate matrices: returns the i2t matrix; use
      :func:`score_matrices` for both.
    """
    return score_matrices(model, split, device, block_images, block_texts, encode_batch)[0]


@torch.inference_mode()
def score_matrices(model: Aligner, split: FeatureSplit, device: torch.device | str = "cpu",
                   block_images: int = 64, block_texts: int = 512,
                   encode_batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(i2t scores, t2i scores), both [N, M]; identical unless the method re-ranks."""
    device = torch.device(device)
    model = model.eval().to(device)
    images, texts = _encode(model, split, device, encode_batch)
    n, m = split.n_images, split.n_captions
    if model.embeds:
        sim = torch.cat([model.similarity(index_state(images, slice(s, s + block_images)), texts)
                         for s in range(0, n, block_images)]).float()  # (N, M)
        if model.rerank is None:
            out = sim.cpu().numpy()
            return out, out
        return _rerank(model, images, texts, sim)
    if not model.matches:
        raise TypeError(f"{type(model).__name__} neither embeds nor matches")
    out = torch.empty(n, m)
    for i in range(0, n, block_images):
        img = index_state(images, slice(i, i + block_images))
        for t in range(0, m, block_texts):
            out[i:i + block_images, t:t + block_texts] = model.match_block(
                img, index_state(texts, slice(t, t + block_texts))).float().cpu()
    out_np = out.numpy()
    return out_np, out_np


def _rerank(model: Aligner, images: State, texts: State, sim: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """ALBEF two-stage ranking: shortlist top-k by similarity, re-rank it by the fused score.

    Shortlisted entries are shifted by one constant so they all lie above every non-shortlisted
    score (order among them unchanged); the rest keep their similarity order.
    """
    assert model.rerank is not None
    k, alpha = model.rerank.k, model.rerank.alpha
    n, m = sim.shape
    ceiling = float(sim.max()) + 1.0

    def lifted(ii: Tensor, tt: Tensor) -> Tensor:
        match = model.match(index_state(images, ii), index_state(texts, tt)).float()  # (P,)
        fused = alpha * match + (1 - alpha) * sim[ii, tt]
        return fused - fused.min() + ceiling

    i2t = sim.clone()
    top = sim.topk(min(k, m), dim=1).indices.reshape(-1)  # (N*k,)
    ii = torch.arange(n, device=sim.device).repeat_interleave(min(k, m))
    i2t[ii, top] = lifted(ii, top)
    t2i = sim.clone()
    top = sim.topk(min(k, n), dim=0).indices.reshape(-1)  # (k*M,) row-major over (k, M)
    tt = torch.arange(m, device=sim.device).repeat(min(k, n))
    t2i[top, tt] = lifted(top, tt)
    return i2t.cpu().numpy(), t2i.cpu().numpy()
