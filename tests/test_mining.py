"""Hard-negative mining on hand-built similarity matrices."""
from __future__ import annotations

import pytest
import torch

from crossalign.mining import mine_negatives

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


def test_sampled_hard_negatives_come_from_the_top_k_pool():
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(300):
        index, _ = mine_negatives(SCORES, POSITIVE, n_hard=1, hard_k=2, generator=gen)
        assert index[0, 0].item() in (3, 4)  # query 0: non-positives ranked 5.0, 3.0 (not 1.0)
        seen.add(index[0, 0].item())
    assert seen == {3, 4}  # both sampled, column 3 (higher score) more often is not asserted


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
