"""Loss modules: hand-computed values and the multi-positive contract."""
from __future__ import annotations

import math

import pytest
import torch

from crossalign.methods.losses import ContrastiveLoss, JointLoss, MatchingLoss, multi_positive_targets
from crossalign.methods.base import Batch

torch.set_num_threads(1)


def batch_of(image_index: list[int]) -> Batch:
    b = len(image_index)
    return Batch(torch.zeros(b, 1, 1), torch.zeros(b, 1), torch.zeros(b, 1, 1), torch.ones(b, 1, dtype=torch.bool),
                 torch.zeros(b, 1), torch.tensor(image_index))


def test_matching_loss_hand_value_and_invalid_negatives_ignored():
    out = {"pos_logits": torch.tensor([0.0, 0.0]), "neg_logits": torch.tensor([[0.0, 100.0], [0.0, -100.0]]),
           "neg_valid": torch.tensor([[True, False], [True, False]])}
    terms = MatchingLoss()(out, batch_of([0, 1]))
    assert list(terms) == ["match_loss"]
    assert terms["match_loss"].item() == pytest.approx(math.log(2.0), rel=1e-6)  # 0.5 * (ln2 + ln2)


def test_matching_loss_balances_positives_and_negatives():
    out = {"pos_logits": torch.tensor([2.0]), "neg_logits": torch.tensor([[-1.0, -3.0]]),
           "neg_valid": torch.ones(1, 2, dtype=torch.bool)}
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus
    expected = 0.5 * (sp(-2.0) + 0.5 * (sp(-1.0) + sp(-3.0)))
    assert MatchingLoss()(out, batch_of([0]))["match_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_multi_positive_targets():
    t = multi_positive_targets(torch.tensor([0, 1, 0]))
    assert torch.allclose(t, torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]]))


def test_contrastive_loss_hand_value():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    i2t = -(torch.log_softmax(logits, 1).diagonal()).mean()
    t2i = -(torch.log_softmax(logits.t(), 1).diagonal()).mean()
    got = ContrastiveLoss()({"logits": logits}, batch_of([0, 1]))["contrastive_loss"]
    assert got.item() == pytest.approx(0.5 * (i2t + t2i).item(), rel=1e-6)


def test_captions_of_the_same_image_are_not_negatives():
    # pairs 0 and 1 share image 7: their cross similarity is as high as the diagonal
    logits = torch.tensor([[10.0, 10.0, -10.0], [10.0, 10.0, -10.0], [-10.0, -10.0, 10.0]])
    same = ContrastiveLoss()({"logits": logits}, batch_of([7, 7, 3]))["contrastive_loss"].item()
    distinct = ContrastiveLoss()({"logits": logits}, batch_of([7, 8, 3]))["contrastive_loss"].item()
    assert same < 1e-6  # the best the model can do when both captions are correct
    # as negatives of each other they would cost ln 2 in two of three rows, each direction
    assert distinct == pytest.approx(2.0 / 3.0 * math.log(2.0), rel=1e-3)


def test_joint_loss_weights_and_named_terms():
    out = {"logits": torch.tensor([[2.0, 0.0], [1.0, 3.0]]), "pos_logits": torch.tensor([1.0, 2.0]),
           "neg_logits": torch.tensor([[0.5], [-1.0]]), "neg_valid": torch.ones(2, 1, dtype=torch.bool)}
    b = batch_of([0, 1])
    terms = JointLoss(itc_weight=2.0, itm_weight=0.5)(out, b)
    assert set(terms) == {"itc_loss", "itm_loss"}
    assert terms["itc_loss"].item() == pytest.approx(2.0 * ContrastiveLoss()(out, b)["contrastive_loss"].item())
    assert terms["itm_loss"].item() == pytest.approx(0.5 * MatchingLoss()(out, b)["match_loss"].item())
