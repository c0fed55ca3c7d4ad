"""Loss modules: one ``nn.Module`` per training signal, all with the same call contract.

``loss(outputs, batch) -> {"<name>_loss": scalar, ...}`` where ``outputs`` is the dict a method's
``forward(batch)`` returned. The training loop sums the named terms and logs each, so it never
needs to know which method or loss it holds (as open_clip's ``loss.py``).

Output keys read here:
    ``logits``      (B, B) scaled image-caption similarities, row = image of pair i, col = caption j
    ``pos_logits``  (B,) matching logits of the aligned pairs
    ``neg_logits``  (B, n) matching logits of mined negative pairs, ``neg_valid`` (B, n) bool
    (twin negatives, ``train.twin_negatives``, are columns of these)
    ``caption_neg_logits`` (Bn,) optional: matching logits of each perturbed caption with the image
                    of the pair it was made from (``train.caption_negatives``), all valid;
                    ``caption_neg_owner`` (Bn,) that pair's position
    ``twin_logits`` (B, 2) optional: the twin-caption and twin-image negatives again (also in
                    ``neg_logits``), ``twin_valid`` (B, 2) bool, for the binding ranking term
    ``caption_neg_sim`` (B, Bn) optional: similarities of every batch image with every perturbed
                    caption, extra image->text columns of the contrastive loss (NegCLIP)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # methods import their losses: no runtime import back
    from crossalign.methods.base import Batch


class MatchingLoss(nn.Module):
    """Binary cross-entropy of a match / no-match head on positives and mined negatives.

    The positive and the negative terms are averaged separately and then halved, so the head's
    prior stays at 0.5 whatever the number of negatives per positive (readers' concat+MLP baseline,
    ALBEF's ITM loss with a single logit instead of two classes).

    Binding negatives (``twin_logits`` (B, 2) with ``twin_valid``, ``caption_neg_logits``) also get
    a pairwise ranking term, ``rank_weight * mean softplus(negative - positive)`` over them (a
    two-way softmax: the positive against its own binding negative), reported as its own
    ``<name>_binding`` term: BCE alone fits the twins slowly, since they are a few of many negatives
    and the head can lower all of them together (docs/methods.md).
    """

    def __init__(self, weight: float = 1.0, name: str = "match_loss", rank_weight: float = 0.0):
        super().__init__()
        self.weight, self.name, self.rank_weight = weight, name, rank_weight

    def forward(self, outputs: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        pos = outputs["pos_logits"].float()  # (B,)
        neg = outputs["neg_logits"].float().reshape(-1)  # (P,)
        valid = outputs["neg_valid"].reshape(-1).to(neg.dtype)  # (P,)
        extra = outputs.get("caption_neg_logits")
        if extra is not None:  # perturbed captions: negatives of their own image
            neg, valid = torch.cat([neg, extra.float()]), torch.cat([valid, torch.ones_like(extra, dtype=neg.dtype)])
        pos_loss = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
        neg_each = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="none")  # (P,)
        neg_loss = (neg_each * valid).sum() / valid.sum().clamp_min(1.0)
        out = {self.name: self.weight * 0.5 * (pos_loss + neg_loss)}
        margins = []  # (negative - positive) of every binding negative
        if self.rank_weight > 0 and "twin_logits" in outputs:
            ok = outputs["twin_valid"]  # (B, 2)
            margins.append((outputs["twin_logits"].float() - pos[:, None])[ok])
        if self.rank_weight > 0 and extra is not None:
            margins.append(extra.float() - pos[outputs["caption_neg_owner"]])
        if margins:
            m = torch.cat(margins)
            rank = F.softplus(m).mean() if m.numel() else m.sum()
            out[self.name.removesuffix("_loss") + "_binding_loss"] = self.weight * self.rank_weight * rank
        return out


def multi_positive_targets(image_index: Tensor) -> Tensor:
    """(B,) image rows -> (B, B) row-stochastic targets, uniform over the pairs sharing the image.

    Captions of the same image in one batch are correct answers under the COCO protocol, so they
    are targets rather than negatives (or ignored columns): the image's row spreads its target over
    all its captions, and a caption's row over the duplicated (identical) columns of its image.
    """
    same = (image_index[:, None] == image_index[None, :]).float()  # (B, B), symmetric
    return same / same.sum(1, keepdim=True)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP: Radford et al., 2021) with multi-positive targets: the mean of the
    image->text and text->image soft-target cross-entropies over ``logits``, less the targets'
    entropy (i.e. KL divergence: same gradients, and a perfect batch scores 0 even when several
    captions share an image)."""

    def __init__(self, weight: float = 1.0, name: str = "contrastive_loss"):
        super().__init__()
        self.weight, self.name = weight, name

    def forward(self, outputs: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        logits = outputs["logits"].float()  # (B, B) image rows x caption columns
        targets = multi_positive_targets(batch.image_index)  # (B, B)
        extra = outputs.get("caption_neg_sim")  # (B, Bn) perturbed captions: more i2t columns, never targets
        if extra is not None:
            row = torch.cat([logits, extra.float()], 1)  # (B, B + Bn)
            i2t = F.kl_div(row.log_softmax(1), torch.cat([targets, targets.new_zeros(extra.shape)], 1),
                           reduction="batchmean")
        else:
            i2t = F.kl_div(logits.log_softmax(1), targets, reduction="batchmean")
        t2i = F.kl_div(logits.t().log_softmax(1), targets, reduction="batchmean")
        return {self.name: self.weight * 0.5 * (i2t + t2i)}


class JointLoss(nn.Module):
    """ALBEF-style joint objective: ``itc_weight * contrastive + itm_weight * matching``, each term
    reported under its own name (already weighted, so the terms sum to the loss)."""

    def __init__(self, itc_weight: float, itm_weight: float, rank_weight: float = 0.0):
        super().__init__()
        self.itc = ContrastiveLoss(itc_weight, "itc_loss")
        self.itm = MatchingLoss(itm_weight, "itm_loss", rank_weight)

    def forward(self, outputs: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        return {**self.itc(outputs, batch), **self.itm(outputs, batch)}
