"""``joint``: contrastive + matching, ALBEF-style ("Align before Fuse", Li et al., 2021).

The contrastive part embeds pooled features (as ``contrastive``); the matching part is the
``cross_attention`` encoder over projected tokens. The matching head's negatives (``negatives`` per
positive and direction, ALBEF uses one) are sampled from the batch's contrastive similarities
(softmax-weighted among the ``hard_k`` most similar), each swapped with probability
``random_negative_fraction`` for a uniform random one: a prototype fed only top-16
negatives left the head stuck at its prior. Ranking: similarity shortlist of ``shortlist_k``, then
re-rank by ``fusion_alpha * match + (1 - fusion_alpha) * similarity`` (:class:`Rerank`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from crossalign.losses import JointLoss
from crossalign.methods.base import Batch, MethodSpec, Rerank, State, register
from crossalign.methods.base import OPTIMISER_SPACE, Dim  # search space (crossalign.tuning)
from crossalign.methods.common import (EmbeddingHead, Projection, cosine_logits, logit_scale_param, mine_both,
                                      pair_logits, same_image)
from crossalign.methods.common import CrossEncoder, CrossMatcher


class Joint(CrossMatcher):
    """Dual-encoder embeddings for similarity + a cross-attention matching head for re-ranking."""

    embeds = True

    def __init__(self, image_dim: int, text_dim: int, dim: int, dropout: float, temperature: float,
                 learnable_temperature: bool, heads: int, layers: int, negatives: int,
                 random_negative_fraction: float, hard_k: int, rerank: Rerank):
        super().__init__()
        self.image_head = EmbeddingHead(image_dim, dim, dropout)
        self.text_head = EmbeddingHead(text_dim, dim, dropout)
        self.logit_scale = logit_scale_param(temperature, learnable_temperature)
        self.image_proj = Projection(image_dim, dim, dropout)
        self.text_proj = Projection(text_dim, dim, dropout)
        self.encoder = CrossEncoder(dim, heads, layers, dropout)
        self.negatives = (negatives, 0)  # per positive and direction; a share swapped for random ones
        self.random_fraction = random_negative_fraction
        self.hard_k = hard_k
        self.rerank = rerank

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        return {"embed": F.normalize(self.image_head(pooled), dim=-1),  # (B, D)
                **self.encoder.image_state(self.image_proj(tokens))}  # (B, R, D) tensors

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        return {"embed": F.normalize(self.text_head(pooled), dim=-1),  # (B, D)
                **self.encoder.text_state(self.text_proj(tokens), mask)}  # (B, L, D) tensors

    def similarity(self, images: State, texts: State) -> Tensor:
        return cosine_logits(images["embed"], texts["embed"], self.logit_scale)  # (Bi, Bt)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        img = self.encode_images(batch.image_tokens, batch.image_pooled)
        txt = self.encode_texts(batch.text_tokens, batch.text_mask, batch.text_pooled)
        logits = self.similarity(img, txt)  # (B, B)
        cap, cap_ok, neg_img, img_ok = mine_both(logits, same_image(batch), self.negatives, self.negatives,
                                                 self.hard_k, self.random_fraction)
        pos, cap_logits, img_logits = pair_logits(self.encoder.score, img, txt, cap, neg_img)
        return {"logits": logits,  # (B, B)
                "pos_logits": pos,  # (B,)
                "neg_logits": torch.cat([cap_logits, img_logits], 1),  # (B, nc + ni)
                "neg_valid": torch.cat([cap_ok, img_ok], 1)}


def _build(cfg, image_dim: int, text_dim: int) -> Joint:
    p = cfg.methods.joint
    return Joint(image_dim, text_dim, cfg.methods.embed_dim, p.dropout, p.temperature, p.learnable_temperature,
                 p.heads, p.layers, p.negatives, p.random_negative_fraction, p.hard_k,
                 Rerank(p.shortlist_k, p.fusion_alpha))


SPEC = register(MethodSpec("joint", _build, lambda cfg: JointLoss(cfg.methods.joint.itc_weight, cfg.methods.joint.itm_weight),
                           "contrastive + matching with similarity-mined negatives; shortlist then re-rank",
                           search_space=(*OPTIMISER_SPACE, Dim("methods.joint.temperature", 0.03, 0.3, log=True),
                                         Dim("methods.joint.dropout", 0.0, 0.3),
                                         Dim("methods.joint.negatives", 1, 3, integer=True),
                                         Dim("methods.joint.random_negative_fraction", 0.0, 1.0))))
