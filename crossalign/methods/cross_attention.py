"""``cross_attention``: the article's scheme 1, without its defects.

The article shared one attention module between both directions, fed batch-first tensors to a
sequence-first module and let captions attend to padding. Here text->image and image->text have
separate blocks, every tensor is batch-first, padded caption tokens are masked as keys, and each
block is residual + LayerNorm. A matching head scores the pooled attended pair; training uses the
positives plus hard and random in-batch negatives in both directions (BCE).

Scoring is exact and cheap (:class:`crossalign.methods.common.CrossEncoder`): key, value (with the
output projection folded in) and first-layer query projections are computed once per image /
caption in ``encode_*``, and a chunk of images is broadcast against a block of captions, so the
per-pair work is attention and LayerNorm only and memory is bounded by a chunk, not by the pairs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from crossalign.methods.losses import MatchingLoss
from crossalign.methods.base import Batch, MethodSpec, State, register
from crossalign.methods.base import OPTIMISER_SPACE, Dim  # search space (crossalign.train.tuning)
from crossalign.methods.common import (CrossMatcher, Projection, add_twins, build_matcher, caption_negative_outputs,
                                      caption_negative_states, mine_both, pair_logits, pooled_cosine, same_image,
                                      twin_outputs)
from crossalign.methods.positions import ImagePositions

class CrossAttention(CrossMatcher):
    """Projected tokens -> CrossEncoder -> match logit; negatives by pooled-token similarity."""

    def __init__(self, image_dim: int, text_dim: int, dim: int, heads: int, layers: int, dropout: float,
                 hard_negatives: int, random_negatives: int, matcher: str = "cross", positions: str = "none",
                 text_positions: str = "none", relation: bool = False):
        super().__init__()
        self.image_proj = Projection(image_dim, dim, dropout)
        self.text_proj = Projection(text_dim, dim, dropout)
        self.positions = ImagePositions(positions, dim)
        self.encoder = build_matcher(matcher, dim, heads, layers, dropout, text_positions, relation)
        self.negatives = (hard_negatives, random_negatives)

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        return self.encoder.image_state(self.positions(self.image_proj(tokens)))  # (B, R, D) tensors

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        return self.encoder.text_state(self.text_proj(tokens), mask)  # (B, L, D) tensors

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        xi, xt = self.image_proj(batch.image_tokens), self.text_proj(batch.text_tokens)  # (B, R, D), (B, L, D)
        img = self.encoder.image_state(self.positions(xi))
        txt = self.encoder.text_state(xt, batch.text_mask)
        sim = pooled_cosine(xi, xt, txt.get("x_mask", batch.text_mask))  # (B, B) hardness proxy
        cap, cap_ok, neg_img, img_ok = add_twins(batch, *mine_both(sim, same_image(batch), self.negatives,
                                                                   self.negatives))
        pos, cap_logits, img_logits = pair_logits(self.encoder.score, img, txt, cap, neg_img)
        return {"pos_logits": pos,  # (B,)
                "neg_logits": torch.cat([cap_logits, img_logits], 1),  # (B, nc + ni)
                "neg_valid": torch.cat([cap_ok, img_ok], 1),
                **twin_outputs(batch, cap_logits, cap_ok, img_logits, img_ok),
                **caption_negative_outputs(self, batch, img, caption_negative_states(self, batch), self.match)}


def _build(cfg, image_dim: int, text_dim: int) -> CrossAttention:
    p = cfg.methods.cross_attention
    return CrossAttention(image_dim, text_dim, cfg.methods.embed_dim, p.heads, p.layers, p.dropout,
                          p.hard_negatives, p.random_negatives, p.matcher, cfg.methods.image_positions,
                          cfg.methods.text_positions, cfg.methods.relation_geometry)


SPEC = register(MethodSpec("cross_attention", _build,
                           lambda cfg: MatchingLoss(rank_weight=cfg.train.binding_rank_weight),
                           "text<->image cross-attention (separate, masked) -> matching head (BCE, hard negatives)",
                           search_space=(*OPTIMISER_SPACE, Dim("methods.cross_attention.dropout", 0.0, 0.3),
                                         Dim("methods.cross_attention.hard_negatives", 1, 3, integer=True),
                                         Dim("methods.cross_attention.random_negatives", 0, 2, integer=True))))
