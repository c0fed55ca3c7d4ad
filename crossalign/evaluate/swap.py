"""The caption-swap probe: does an image's true caption beat the same words bound differently?

Works on any captions (SugarCrepe-style swaps; no binding twins needed). The features stage
caches, per real caption, up to ``features.perturbations`` word-swap perturbations
(:mod:`crossalign.features.perturb`: kinds colour, size, number, position; the same words, bound
differently) with the caption row each was made from and its kind
(:mod:`crossalign.features.hardneg`). For every perturbed caption p of caption c of image i the
probe compares the method's score of (i, c) with its score of (i, p): a win when the true caption
scores higher, a tie counts half; chance is 50 %. Image -> text only: the perturbed caption
is the negative.

The score is the one the method ranks that pair by (:func:`crossalign.retrieval.scoring.pair_score`):
the embedding similarity (``contrastive``), the pair's match score (``concat_mlp``,
``cross_attention``) and, for a re-ranking method (``joint``, the ``contrastive+cross_attention``
control), the fused ``alpha * match + (1 - alpha) * similarity`` at the alpha it is evaluated at,
computed for both captions as if both were in the image's shortlist (whether they would make the
top-k is not asked: the probe tests the score, not the shortlist).

An image's captions and their perturbations share the image, so they are not independent: the
**image** is the unit. The 95 % CI is the percentile bootstrap of :mod:`crossalign.evaluate.binding`
(same :func:`~crossalign.evaluate.binding.bootstrap_index`, ``RESAMPLES`` draws, seed, level)
over the images with at least one pair, each drawn with all its pairs, recomputing the pooled win
rate (sum of wins / sum of comparisons). Each kind is summarised over the images with a pair of
that kind; a kind with no pair is reported ``absent`` (no rate), never 0 %. With several seeds each
pair's comparisons are pooled over the seeds before the bootstrap (images stay the unit).

Memory: the perturbed captions are encoded and scored ``pair_chunk`` at a time, beside the split's
encoded images and captions that the retrieval protocol already holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from crossalign.evaluate.binding import CHANCE, LEVEL, RESAMPLES, SEED, bootstrap_index
from crossalign.features.hardneg import HardNegatives
from crossalign.io import FeatureSplit
from crossalign.methods.base import Aligner, State
from crossalign.retrieval.scoring import encode_texts, pair_parts, pair_score

_BOOT_ROWS = 100  # bootstrap resamples summed at once (bounds the (rows, images, 2) gather)


@dataclass
class SwapPairs:
    """Every (caption, perturbation) pair of a split: its image row, kind code and the parts of
    the method's score of the true and of the perturbed caption with that image (each part None
    where the method lacks it; see :func:`crossalign.retrieval.scoring.pair_parts`)."""

    image: np.ndarray  # (P,) int64 image row
    kind: np.ndarray  # (P,) int8 kind code
    kinds: tuple[str, ...]  # kind names by code
    true_parts: tuple[torch.Tensor | None, torch.Tensor | None]  # (similarity (P,), match (P,))
    swap_parts: tuple[torch.Tensor | None, torch.Tensor | None]

    def wins(self, model: Aligner, alpha: float | None = None) -> np.ndarray:
        """(P,) 1 where the true caption scores higher, 0.5 on a tie, 0 else; a re-ranking
        method's scores fused at ``alpha`` (default its own ``rerank.alpha``)."""
        true = pair_score(model, *self.true_parts, alpha).double().numpy()
        swap = pair_score(model, *self.swap_parts, alpha).double().numpy()
        return (true > swap) + 0.5 * (true == swap)


def perturbed_split(split: FeatureSplit, negatives: HardNegatives) -> FeatureSplit:
    """The perturbed captions as the captions of ``split`` (same images), row p = perturbation p,
    so :func:`crossalign.retrieval.scoring.encode_texts` encodes them as it encodes real captions."""
    source = np.asarray(negatives.source, np.int64)
    return FeatureSplit(root=negatives.root, meta=split.meta, image_tokens=split.image_tokens,
                        image_pooled=split.image_pooled, text=negatives.text, text_pooled=negatives.pooled,
                        image_ids=split.image_ids, caption_image_index=np.asarray(split.caption_image_index)[source],
                        caption_ids=source)


@torch.inference_mode()
def score_pairs(model: Aligner, images: State, texts: State, split: FeatureSplit, negatives: HardNegatives,
                device: torch.device | str = "cpu", pair_chunk: int = 4096, encode_batch: int = 512) -> SwapPairs:
    """Score every (caption, perturbation) pair of ``split``: ``images`` / ``texts`` are the split's
    encoded states (:func:`crossalign.retrieval.scoring.encode_split`); the perturbed captions are
    encoded ``pair_chunk`` at a time."""
    source = np.asarray(negatives.source, np.int64)  # (P,) true caption row
    if source.size and (source.min() < 0 or source.max() >= split.n_captions):
        raise ValueError(f"{negatives.root}/neg_source.npy: caption rows outside [0, {split.n_captions}) of "
                         f"{split.root}: the perturbations belong to another split")
    image = np.asarray(split.caption_image_index, np.int64)[source]  # (P,)
    swapped = perturbed_split(split, negatives)
    device = torch.device(device)
    true_parts, swap_parts = [], []
    for s in range(0, source.size, pair_chunk):
        rows = np.arange(s, min(source.size, s + pair_chunk))
        a = torch.from_numpy(image[rows]).to(device)  # (p,)
        true_parts.append(pair_parts(model, images, texts, a, torch.from_numpy(source[rows]).to(device), pair_chunk))
        chunk = encode_texts(model, swapped.select_captions(rows), device, encode_batch, progress=False)
        swap_parts.append(pair_parts(model, images, chunk, a, torch.arange(rows.size, device=device), pair_chunk))
        del chunk

    def joined(parts: list) -> tuple:
        if not parts:  # no perturbation at all: empty parts of the kinds the method has
            return (torch.zeros(0) if model.embeds else None, torch.zeros(0) if model.matches else None)
        return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))

    return SwapPairs(image=image, kind=np.asarray(negatives.kind, np.int8), kinds=tuple(negatives.kinds),
                     true_parts=joined(true_parts), swap_parts=joined(swap_parts))


def tallies(wins: np.ndarray) -> np.ndarray:
    """(P, 2) wins and comparisons of one seed's ``wins`` (P,); several seeds: sum them."""
    wins = np.asarray(wins, np.float64)
    return np.stack([wins, np.ones_like(wins)], axis=1)


def summarise(image: np.ndarray, pair_tallies: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict:
    """Pooled win rate (%) of the pairs ``pair_tallies (P, 2)`` (wins, comparisons) whose image rows
    are ``image (P,)``, with its percentile CI over images resampled with replacement; a set
    without pairs -> ``{"absent": True, ...}``."""
    image = np.asarray(image, np.int64)
    if image.size == 0:
        return {"absent": True, "images": 0, "pairs": 0, "comparisons": 0}
    rows, inverse = np.unique(image, return_inverse=True)
    per_image = np.zeros((rows.size, 2))
    np.add.at(per_image, inverse, pair_tallies)  # (I, 2): an image carries all its pairs
    index = bootstrap_index(rows.size, resamples, seed)  # (B, I)
    draws = np.concatenate([per_image[index[b:b + _BOOT_ROWS]].sum(axis=1)  # (b, 2)
                            for b in range(0, resamples, _BOOT_ROWS)])
    rate = 100.0 * draws[:, 0] / draws[:, 1]  # (B,) every image has >= 1 comparison: no division by 0
    tail = (100.0 - level) / 2
    lo, hi = np.percentile(rate, [tail, 100.0 - tail])
    wins, comparisons = per_image.sum(axis=0)
    return {"i2t": float(100.0 * wins / comparisons), "ci95": [float(lo), float(hi)], "images": int(rows.size),
            "pairs": int(image.size), "comparisons": int(comparisons)}


def probe(pairs: SwapPairs, pair_tallies: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """The probe record: ``overall`` and ``per_kind`` (every kind the features know, absent ones
    marked) summaries of ``pair_tallies (P, 2)`` (:func:`tallies`, summed over seeds)."""
    return {"chance": CHANCE, "unit": "image", "direction": "i2t", "resamples": resamples,
            "overall": summarise(pairs.image, pair_tallies, resamples, seed),
            "per_kind": {name: summarise(pairs.image[pairs.kind == code], pair_tallies[pairs.kind == code],
                                         resamples, seed) for code, name in enumerate(pairs.kinds)}}
