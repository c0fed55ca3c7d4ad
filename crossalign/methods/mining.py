"""Hard-negative mining: the one function every matching method uses to pick its negatives.

Given in-batch scores between queries (rows) and candidates (columns) and which candidates are
positives of which query (same image), pick for each query ``n_hard`` hard negatives and
``n_random`` random ones, never a positive. ALBEF (Li et al., 2021, "Align before Fuse") samples
hard negatives in proportion to the softmax of the contrastive similarities; with ``hard_k`` the
sampling is restricted to the ``hard_k`` most similar negatives, without it the hardest are taken
deterministically. Random negatives are mixed in because a matching head fed only the hardest
(often near-duplicate) negatives can stall at its prior.
"""
from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _gumbel(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, generator=generator, device=like.device if generator is None else generator.device)
    return -torch.log(-torch.log(u.clamp(1e-9, 1.0 - 1e-9))).to(like.device)


def mine_negatives(scores: Tensor, positive: Tensor, n_hard: int, n_random: int = 0,
                   hard_k: int | None = None, replace_fraction: float = 0.0,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Pick negatives for each row of ``scores``.

    Args:
        scores: (Q, C) similarity logits, higher = more similar (gradients are not followed).
        positive: (Q, C) bool, True where candidate c is a correct match of query q (e.g. a
            caption of the same image); such candidates are never returned as negatives.
        n_hard: hard negatives per query: the ``n_hard`` highest-scoring non-positives, or, with
            ``hard_k``, ``n_hard`` drawn without replacement from the ``hard_k`` highest-scoring
            non-positives with probability proportional to softmax(scores).
        n_random: further negatives per query, uniform over the remaining non-positives.
        hard_k: size of the candidate pool of the sampled hard negatives (None = deterministic).
        replace_fraction: each hard slot is independently replaced, with this probability, by a
            uniform random non-positive (ALBEF-style mixing when there is one negative per query).
        generator: torch generator for the sampling (None = the global RNG).

    Returns:
        index (Q, n_hard + n_random) long candidate columns, hard ones first, and
        valid (Q, n_hard + n_random) bool: False where the row had too few non-positives (the
        index then points at column 0 and must be ignored).
    """
    if scores.shape != positive.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positive {tuple(positive.shape)} must be equal 2-D shapes")
    q, c = scores.shape
    s = scores.detach().float().masked_fill(positive, NEG_INF)  # (Q, C) positives excluded
    picks, valids = [], []
    taken = positive.clone()  # (Q, C) positives and already picked candidates
    if n_hard > 0:
        if hard_k is None:
            key = s
        else:
            pool = s.topk(min(hard_k, c), dim=1)  # (Q, k) hardest non-positives
            in_pool = torch.zeros_like(positive).scatter_(1, pool.indices, True) & ~positive
            key = s.masked_fill(~in_pool, NEG_INF) + _gumbel(s.shape, s, generator)  # Gumbel-top-n
        top = key.topk(min(n_hard, c), dim=1)  # (Q, n_hard)
        picks.append(top.indices)
        valids.append(torch.isfinite(top.values))
        taken = taken | torch.zeros_like(taken).scatter_(1, top.indices, valids[-1])
    n_swap = picks[0].shape[1] if picks and replace_fraction > 0 else 0
    n_uniform = n_random + n_swap
    if n_uniform > 0:
        key = _gumbel(s.shape, s, generator).masked_fill(taken, NEG_INF)  # uniform over the rest
        top = key.topk(min(n_uniform, c), dim=1)  # (Q, n_uniform)
        uniform, uniform_ok = top.indices, torch.isfinite(top.values)
        if n_swap:  # swap some hard picks for the first uniform ones
            u = torch.rand(picks[0].shape, generator=generator, device=None if generator else s.device)
            swap = (u.to(s.device) < replace_fraction) & uniform_ok[:, :n_swap]  # (Q, n_swap)
            picks[0] = torch.where(swap, uniform[:, :n_swap], picks[0])
            valids[0] = valids[0] | swap
            uniform, uniform_ok = uniform[:, n_swap:], uniform_ok[:, n_swap:]
        if n_random > 0:
            picks.append(uniform)
            valids.append(uniform_ok)
    n = n_hard + n_random
    if not picks:
        return torch.zeros(q, 0, dtype=torch.long, device=scores.device), torch.zeros(q, 0, dtype=torch.bool, device=scores.device)
    index, valid = torch.cat(picks, 1), torch.cat(valids, 1)  # (Q, <=n)
    if index.shape[1] < n:  # fewer candidates than requested: pad with invalid slots
        pad = n - index.shape[1]
        index = torch.cat([index, index.new_zeros(q, pad)], 1)
        valid = torch.cat([valid, valid.new_zeros(q, pad)], 1)
    return index.masked_fill(~valid, 0), valid
