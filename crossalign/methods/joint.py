"""``joint``: contrastive (ITC) and matching (ITM) objectives trained together on the same
frozen tokens (ALBEF, Li et al., 2021): a similarity shortlist re-ranked by the matcher.

What each objective trains (``methods.joint.shared_projections``, default ``false``):

* **Contrastive** — ``image_proj`` / ``text_proj`` (:class:`Projection`: Linear -> LayerNorm ->
  Dropout over every frozen token, into the space D), ``image_head`` / ``text_head`` (an
  :class:`EmbeddingHead` D -> D of the mean of the projected tokens, caption padding excluded) and
  ``logit_scale`` (frozen unless ``learnable_temperature``).
* **Matching** — with the default ``shared_projections: false`` the matcher reads its *own*
  projections of the tokens (``match_image_proj`` / ``match_text_proj``: LayerNorm -> Linear) and
  ``encoder`` (the matcher of ``methods.joint.matcher``); with ``true`` it reads ``image_proj`` /
  ``text_proj``'s outputs, so the ITC loss also shapes the token representations the matching head
  fuses, as ALBEF's fusion layers read the unimodal encoders its ITC aligned (measured: shared
  projections kept the late matcher from binding; docs/methods.md).

The frozen *pooled* features (``image_pooled`` / ``text_pooled``) are not read: everything comes
from the tokens, as in ALBEF, where the ITC embedding is the [CLS] token of the same unimodal
encoder the fusion layers read.

Negatives for the matching head (``negatives`` per positive and direction, ALBEF uses one) are
sampled from the batch's contrastive similarities (softmax-weighted among the ``hard_k`` most
similar), each swapped with probability ``random_negative_fraction`` for a uniform random one: a
prototype fed only top-16 negatives left the head stuck at its prior. Ranking: similarity
shortlist of ``shortlist_k``, then re-rank by ``fusion_alpha * match + (1 - fusion_alpha) *
similarity`` (:class:`Rerank`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossalign.methods.losses import JointLoss
from crossalign.methods.base import Batch, MethodSpec, Rerank, State, register
from crossalign.methods.base import OPTIMISER_SPACE, Dim  # search space (crossalign.train.tuning)
from crossalign.methods.common import (CrossMatcher, EmbeddingHead, Projection, add_twins, build_matcher,
                                      caption_negative_outputs, caption_negative_states, twin_outputs, cosine_logits,
                                      logit_scale_param, masked_mean, mine_both, pair_logits, same_image)
from crossalign.methods.positions import ImagePositions


class Joint(CrossMatcher):
    """Token projections -> (pooled -> embedding for similarity) and (matcher for matching); see
    the module docstring for which parameters each objective trains."""

    embeds = True

    def __init__(self, image_dim: int, text_dim: int, dim: int, dropout: float, temperature: float,
                 learnable_temperature: bool, heads: int, layers: int, negatives: int,
                 random_negative_fraction: float, hard_k: int, rerank: Rerank, matcher: str = "cross",
                 positions: str = "none", shared: bool = True, itc_input: str = "tokens",
                 text_positions: str = "none", relation: bool = False):
        super().__init__()
        self.itc_pooled = itc_input == "pooled"
        self.image_proj = Projection(image_dim, dim, dropout)  # ITC, and ITM when shared
        self.text_proj = Projection(text_dim, dim, dropout)  # ITC, and ITM when shared
        self.image_head = EmbeddingHead(image_dim if self.itc_pooled else dim, dim, dropout)  # ITC only
        self.text_head = EmbeddingHead(text_dim if self.itc_pooled else dim, dim, dropout)  # ITC only
        self.logit_scale = logit_scale_param(temperature, learnable_temperature)
        self.shared = shared
        if not shared:  # the matcher reads its own projections of the tokens (ITM only): LayerNorm
            # first, so every frozen channel enters at one scale (pre-LN, as the matcher's blocks)
            self.match_image_proj = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, dim))
            self.match_text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.positions = ImagePositions(positions, dim)  # ITM only (the ITC mean would only gain a constant)
        self.encoder = build_matcher(matcher, dim, heads, layers, dropout, text_positions, relation)  # ITM only
        self.negatives = (negatives, 0)  # per positive and direction; a share swapped for random ones
        self.random_fraction = random_negative_fraction
        self.hard_k = hard_k
        self.rerank = rerank

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        x = self.image_proj(tokens)  # (B, R, D): what both objectives read
        m = x if self.shared else self.match_image_proj(tokens)
        itc = pooled if self.itc_pooled else x.mean(1)
        return {"embed": F.normalize(self.image_head(itc), dim=-1),  # (B, D)
                **self.encoder.image_state(self.positions(m))}  # (B, R, D) tensors

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        x = self.text_proj(tokens)  # (B, L, D): what both objectives read
        m = x if self.shared else self.match_text_proj(tokens)
        itc = pooled if self.itc_pooled else masked_mean(x, mask)
        return {"embed": F.normalize(self.text_head(itc), dim=-1),  # (B, D)
                **self.encoder.text_state(m, mask)}  # (B, L, D) tensors

    def similarity(self, images: State, texts: State) -> Tensor:
        return cosine_logits(images["embed"], texts["embed"], self.logit_scale)  # (Bi, Bt)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        img = self.encode_images(batch.image_tokens, batch.image_pooled)
        txt = self.encode_texts(batch.text_tokens, batch.text_mask, batch.text_pooled)
        logits = self.similarity(img, txt)  # (B, B)
        cap, cap_ok, neg_img, img_ok = add_twins(batch, *mine_both(logits, same_image(batch), self.negatives,
                                                                   self.negatives, self.hard_k, self.random_fraction))
        pos, cap_logits, img_logits = pair_logits(self.encoder.score, img, txt, cap, neg_img)
        return {"logits": logits,  # (B, B)
                "pos_logits": pos,  # (B,)
                "neg_logits": torch.cat([cap_logits, img_logits], 1),  # (B, nc + ni)
                "neg_valid": torch.cat([cap_ok, img_ok], 1),
                **twin_outputs(batch, cap_logits, cap_ok, img_logits, img_ok),
                **caption_negative_outputs(self, batch, img, caption_negative_states(self, batch), self.match)}


def _build(cfg, image_dim: int, text_dim: int) -> Joint:
    p = cfg.methods.joint
    return Joint(image_dim, text_dim, cfg.methods.embed_dim, p.dropout, p.temperature, p.learnable_temperature,
                 p.heads, p.layers, p.negatives, p.random_negative_fraction, p.hard_k,
                 Rerank(p.shortlist_k, p.fusion_alpha), p.matcher, cfg.methods.image_positions,
                 p.shared_projections, p.itc_input, cfg.methods.text_positions,
                 cfg.methods.relation_geometry)


SPEC = register(MethodSpec("joint", _build, lambda cfg: JointLoss(cfg.methods.joint.itc_weight, cfg.methods.joint.itm_weight,
                                                                 cfg.train.binding_rank_weight),
                           "align before fuse: shared token projections trained by contrastive + matching "
                           "(similarity-mined negatives); shortlist then re-rank",
                           search_space=(*OPTIMISER_SPACE, Dim("methods.joint.temperature", 0.03, 0.3, log=True),
                                         Dim("methods.joint.dropout", 0.0, 0.3),
                                         Dim("methods.joint.negatives", 1, 3, integer=True),
                                         Dim("methods.joint.random_negative_fraction", 0.0, 1.0))))
