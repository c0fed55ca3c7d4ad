"""How any Aligner ranks a gallery: encode each image and caption once -> similarity or exact
pair scores -> (optionally) ALBEF's shortlist re-rank. Returns score matrices that
:mod:`crossalign.retrieval.protocol` turns into recall.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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
        sim = _similarity(model, images, texts, block_images, progress)  # (N, M)
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


def _similarity(model: Aligner, images: State, texts: State, block_images: int,
                progress: bool | None) -> Tensor:
    """All-pairs embedding similarity (N, M), ``block_images`` rows at a time."""
    n, m = _rows(images), _rows(texts)
    parts = []
    with _Meter("similarity", n * m, progress) as meter:
        for s in range(0, n, block_images):
            parts.append(model.similarity(index_state(images, slice(s, s + block_images)), texts).float())
            meter.update(parts[-1].numel())
    return torch.cat(parts)  # (N, M)


def fold_scores(model: Aligner, images: State, texts: State, caption_image: np.ndarray, block_images: int = 64,
                block_texts: int = 512, pair_chunk: int = 4096,
                progress: bool | None = None) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Each 1K fold scored on its own, as evaluating the fold alone would: a re-ranking method's
    shortlists come from the fold's own similarities (a fold cut out of the 5K matrices would
    re-rank only its members of the 5K top-k). None when the method does not re-rank (its fold
    scores are sub-matrices of the full ones) or the split has no folds."""
    parts = fold_shortlists(model, images, texts, caption_image, block_images, pair_chunk, progress)
    return None if parts is None else [p.scores(model.rerank.alpha) for p in parts]


def fold_shortlists(model: Aligner, images: State, texts: State, caption_image: np.ndarray, block_images: int = 64,
                    pair_chunk: int = 4096, progress: bool | None = None) -> list[Shortlists] | None:
    """:func:`shortlists` of each 1K fold on its own (see :func:`fold_scores`); None when the
    method does not re-rank or the split has no folds."""
    n = _rows(images)
    if model.rerank is None or not fold_slices(n):
        return None
    caption_image = np.asarray(caption_image, np.int64)
    out = []
    for rows in fold_slices(n):
        cols = torch.from_numpy(fold_captions(caption_image, rows))  # (Mf,)
        out.append(shortlists(model, index_state(images, rows), index_state(texts, cols), block_images,
                              pair_chunk, progress))
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
    """ALBEF two-stage ranking at the model's own ``rerank.alpha`` (see :class:`Shortlists`)."""
    assert model.rerank is not None
    return _shortlists(model, images, texts, sim, pair_chunk, progress).scores(model.rerank.alpha)


@dataclass
class Shortlists:
    """A re-ranking method's two stages, each computed once: the similarity matrix, every query's
    top-k by similarity and the matcher's score of each shortlisted pair. :meth:`scores` fuses
    them at any alpha, so a grid of alphas costs one matcher pass, not one per alpha."""

    sim: Tensor  # (N, M) similarity
    i2t_pairs: tuple[Tensor, Tensor]  # (N*k,) image rows, (N*k,) caption columns: each image's top-k captions
    i2t_match: Tensor  # (N*k,) match score of each of those pairs
    t2i_pairs: tuple[Tensor, Tensor]  # (k*M,) image rows, caption columns: each caption's top-k images
    t2i_match: Tensor  # (k*M,)

    def scores(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """(i2t, t2i) float32 [N, M] ranked at ``alpha``: each shortlisted entry is
        ``alpha * match + (1 - alpha) * sim``, shifted by one constant (over the whole matrix) so
        it lies above every non-shortlisted score, its order unchanged; the rest keep their
        similarity. At alpha 0 this is the similarity ranking itself."""
        ceiling = float(self.sim.max()) + 1.0
        out = []
        for (ii, tt), match in ((self.i2t_pairs, self.i2t_match), (self.t2i_pairs, self.t2i_match)):
            scores = self.sim.clone()
            fused = fuse(alpha, match, self.sim[ii, tt])  # (P,)
            scores[ii, tt] = fused - fused.min() + ceiling
            out.append(scores.cpu().numpy())
            del scores
        return out[0], out[1]


def fuse(alpha: float, match: Tensor, sim: Tensor) -> Tensor:
    """The score a re-ranking method ranks a shortlisted pair by: ``alpha * match + (1 - alpha) * sim``."""
    return alpha * match + (1 - alpha) * sim


@torch.inference_mode()
def shortlists(model: Aligner, images: State, texts: State, block_images: int = 64, pair_chunk: int = 4096,
               progress: bool | None = None) -> Shortlists:
    """The :class:`Shortlists` of a re-ranking method (``model.rerank`` set) on encoded states."""
    if model.rerank is None or not model.embeds:
        raise TypeError(f"{type(model).__name__} does not re-rank a similarity shortlist")
    return _shortlists(model, images, texts, _similarity(model, images, texts, block_images, progress),
                       pair_chunk, progress)


def _shortlists(model: Aligner, images: State, texts: State, sim: Tensor, pair_chunk: int,
                progress: bool | None = None) -> Shortlists:
    """Shortlist top-k by similarity both ways and score each shortlisted pair with ``match``,
    at most ``pair_chunk`` pairs per call."""
    assert model.rerank is not None
    k = model.rerank.k
    n, m = sim.shape

    def matched(ii: Tensor, tt: Tensor, what: str) -> Tensor:
        out = torch.empty(ii.shape[0], device=sim.device)  # (P,)
        with _Meter(what, ii.shape[0], progress) as meter:
            for s in range(0, ii.shape[0], pair_chunk):
                a, b = ii[s:s + pair_chunk], tt[s:s + pair_chunk]
                out[s:s + pair_chunk] = model.match(index_state(images, a), index_state(texts, b)).float()  # (p,)
                meter.update(a.shape[0])
        return out

    top = sim.topk(min(k, m), dim=1).indices.reshape(-1)  # (N*k,)
    ii = torch.arange(n, device=sim.device).repeat_interleave(min(k, m))  # (N*k,)
    i2t = (ii, top), matched(ii, top, "re-rank i2t shortlist")
    top = sim.topk(min(k, n), dim=0).indices.reshape(-1)  # (k*M,) row-major over (k, M)
    tt = torch.arange(m, device=sim.device).repeat(min(k, n))  # (k*M,)
    t2i = (top, tt), matched(top, tt, "re-rank t2i shortlist")
    return Shortlists(sim, i2t[0], i2t[1], t2i[0], t2i[1])


@torch.inference_mode()
def pair_parts(model: Aligner, images: State, texts: State, image_rows: Tensor, text_rows: Tensor,
               pair_chunk: int = 4096) -> tuple[Tensor | None, Tensor | None]:
    """(similarity (P,), match (P,)) of the pairs (``images[image_rows[p]]``, ``texts[text_rows[p]]``),
    each None where the method lacks it; ``pair_chunk`` pairs at a time. The similarity of a chunk
    is read off the block of its distinct images x its captions; the match is :meth:`Aligner.match`,
    what the shortlist re-rank calls. :func:`pair_score` turns the parts into the ranking score."""
    sims, matches = [], []
    for s in range(0, image_rows.shape[0], pair_chunk):
        a, b = image_rows[s:s + pair_chunk], text_rows[s:s + pair_chunk]
        txt = index_state(texts, b)
        if model.embeds:
            rows, inverse = torch.unique(a, return_inverse=True)  # (u,), (p,)
            block = model.similarity(index_state(images, rows), txt).float()  # (u, p)
            sims.append(block[inverse, torch.arange(b.shape[0], device=block.device)].cpu())  # (p,)
        if model.matches:
            matches.append(model.match(index_state(images, a), txt).float().cpu())  # (p,)
    empty = torch.zeros(0)
    return ((torch.cat(sims) if sims else empty) if model.embeds else None,
            (torch.cat(matches) if matches else empty) if model.matches else None)


def pair_score(model: Aligner, sim: Tensor | None, match: Tensor | None, alpha: float | None = None) -> Tensor:
    """The score ``model`` ranks a pair by, from :func:`pair_parts`: the similarity (embeds only),
    the match (matches only), or for a re-ranking method the fused score of a shortlisted pair
    (:func:`fuse` at ``alpha``, default ``model.rerank.alpha``), as if the pair were in the shortlist."""
    if sim is not None and match is not None:
        if model.rerank is None:
            raise TypeError(f"{type(model).__name__} embeds and matches but has no rerank: no fused score")
        return fuse(model.rerank.alpha if alpha is None else alpha, match, sim)
    if sim is None and match is None:
        raise TypeError(f"{type(model).__name__} neither embeds nor matches: it cannot rank")
    return sim if sim is not None else match
