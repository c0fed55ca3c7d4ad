"""Hard-negative mining on hand-built similarity matrices."""
from __future__ import annotations

import math

import pytest
import torch

from crossalign.methods.mining import mine_negatives

torch.set_num_threads(1)

# 4 queries x 5 candidates; candidates 0,1 are captions of query 0's image (query 1 shares it).
SCORES = torch.tensor([[9.0, 8.0, 1.0, 5.0, 3.0],
                       [8.0, 9.0, 4.0, 2.0, 7.0],
                       [0.0, 6.0, 9.0, 1.0, 2.0],
                       [3.0, 2.0, 1.0, 9.0, 0.5]])
POSITIVE = torch.tensor([[1, 1, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 0, 1, 0]], dtype=torch.bool)


def test_hardest_negatives_are_the_top_non_positives():
    index, valid = mine_negatives(SCORES, POSITIVE, n_hard=2)
    assert index.tolist() == [[3, 4], [4, 2], [1, 4], [0, 1]]
    assert valid.all()


def test_never_picks_a_same_image_candidate():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        index, valid = mine_negatives(SCORES, POSITIVE, n_hard=1, n_random=2, hard_k=2, generator=gen)
        assert not POSITIVE.gather(1, index)[valid].any()
        assert valid.all()
        for row in index.tolist():  # hard and random picks are distinct
            assert len(set(row)) == len(row)


def test_sampled_hard_negatives_follow_the_softmax_of_the_top_k_pool():
    """Hard negatives are drawn with probability softmax(score) over the ``hard_k`` most similar
    non-positives, outside the pool never. One row repeated N times = N independent draws."""
    n = 6000
    row = torch.tensor([[2.0, 9.0, 0.5, 1.5, 1.0, -1.0]])  # candidate 1 is the positive
    scores, positive = row.repeat(n, 1), torch.zeros(n, 6, dtype=torch.bool)
    positive[:, 1] = True
    for hard_k, pool in ((3, [0, 3, 4]), (6, [0, 3, 4, 2, 5])):
        picks = mine_negatives(scores, positive, n_hard=1, hard_k=hard_k,
                               generator=torch.Generator().manual_seed(hard_k))[0][:, 0]  # (n,)
        freq = torch.bincount(picks, minlength=6).double() / n
        expected = torch.zeros(6, dtype=torch.double)
        weights = [math.exp(row[0, c].item()) for c in pool]  # softmax by hand
        for c, w in zip(pool, weights):
            expected[c] = w / sum(weights)
        sigma = (expected * (1 - expected) / n).sqrt()  # binomial std of each frequency
        assert (freq - expected).abs().le(4 * sigma + 1e-12).all(), (hard_k, freq.tolist(), expected.tolist())


def test_two_hard_negatives_are_drawn_without_replacement_by_softmax():
    """n_hard=2 from a pool of 3: P({a, b}) = p_a p_b / (1 - p_a) + p_b p_a / (1 - p_b)
    (successive softmax draws without replacement, Plackett-Luce)."""
    n = 6000
    scores = torch.tensor([[0.0, 1.0, 2.0, -9.0]]).repeat(n, 1)
    positive = torch.zeros(n, 4, dtype=torch.bool)
    index, valid = mine_negatives(scores, positive, n_hard=2, hard_k=3, generator=torch.Generator().manual_seed(7))
    assert valid.all() and (index[:, 0] != index[:, 1]).all() and not (index == 3).any()
    p = [math.exp(s) / sum(math.exp(t) for t in (0.0, 1.0, 2.0)) for s in (0.0, 1.0, 2.0)]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        expected = p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b])
        got = ((index.min(1).values == a) & (index.max(1).values == b)).double().mean().item()
        assert abs(got - expected) <= 4 * math.sqrt(expected * (1 - expected) / n), ((a, b), got, expected)


def test_random_negatives_are_uniform_over_the_rest():
    gen = torch.Generator().manual_seed(2)
    counts = torch.zeros(5)
    for _ in range(600):
        index, _ = mine_negatives(SCORES, POSITIVE, n_hard=1, n_random=1, generator=gen)
        counts[index[0, 1]] += 1  # query 0: hard pick is 3, random from {2, 4}
    assert counts[0] == counts[1] == counts[3] == 0
    assert 200 < counts[2] < 400 and 200 < counts[4] < 400


def test_replace_fraction_swaps_hard_picks_for_random_ones():
    gen = torch.Generator().manual_seed(3)
    all_hard, _ = mine_negatives(SCORES, POSITIVE, n_hard=1, replace_fraction=0.0, generator=gen)
    assert all_hard[:, 0].tolist() == [3, 4, 1, 0]
    swapped = [mine_negatives(SCORES, POSITIVE, n_hard=1, replace_fraction=1.0, generator=gen)[0] for _ in range(50)]
    picks = torch.stack(swapped)[:, 0, 0]  # query 0 with every slot swapped: never its hard pick 3
    assert set(picks.tolist()) <= {2, 4} and not POSITIVE[0, picks].any()


def test_rows_without_enough_negatives_are_marked_invalid():
    positive = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    scores = torch.zeros(2, 3)
    index, valid = mine_negatives(scores, positive, n_hard=1, n_random=2)
    assert valid.tolist() == [[False, False, False], [True, True, False]]
    assert set(index[1, :2].tolist()) == {1, 2}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        mine_negatives(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bool), 1)
