"""How any Aligner ranks a gallery: encode each image and caption once -> similarity or exact
pair scores -> (optionally) ALBEF's shortlist re-rank. Returns score matrices that
:mod:`crossalign.retrieval.protocol` turns into recall.
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
from crossalign.retrieval.protocol import fold_captions, fold_slices

log = logging.getLogger(__name__)

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

