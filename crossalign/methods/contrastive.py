"""``contrastive``: the article's scheme 2. Pooled features are projected into the shared space
and L2-normalised; training is symmetric InfoNCE over the scaled cosine similarities of the batch
(temperature fixed at 0.1 as in the article, or learned as CLIP's ``logit_scale``, clamped at 100).
Captions of the same image are positives of each other (multi-positive targets, see
:class:`crossalign.methods.losses.ContrastiveLoss`), never negatives. Ranks by embedding similarity."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from crossalign.methods.losses import ContrastiveLoss
from crossalign.methods.base import Aligner, Batch, MethodSpec, State, register
from crossalign.methods.base import OPTIMISER_SPACE, Dim  # search space (crossalign.train.tuning)
from crossalign.methods.common import (EmbeddingHead, caption_negative_outputs, caption_negative_states, cosine_logits,
                                      logit_scale_param)


class Contrastive(Aligner):
    """Dual encoder over frozen pooled features: image / caption -> unit vectors in D."""

    embeds = True
    reads_tokens = False  # pooled features only

    def __init__(self, image_dim: int, text_dim: int, dim: int, dropout: float, temperature: float,
                 learnable_temperature: bool):
        super().__init__()
        self.image_head = EmbeddingHead(image_dim, dim, dropout)
        self.text_head = EmbeddingHead(text_dim, dim, dropout)
        self.logit_scale = logit_scale_param(temperature, learnable_temperature)

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        return {"embed": F.normalize(self.image_head(pooled), dim=-1)}  # (B, D)

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        return {"embed": F.normalize(self.text_head(pooled), dim=-1)}  # (B, D)

    def similarity(self, images: State, texts: State) -> Tensor:
        return cosine_logits(images["embed"], texts["embed"], self.logit_scale)  # (Bi, Bt)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        img = self.encode_images(batch.image_tokens, batch.image_pooled)
        txt = self.encode_texts(batch.text_tokens, batch.text_mask, batch.text_pooled)
        return {"logits": self.similarity(img, txt),  # (B, B); twin negatives are in-batch columns
                **caption_negative_outputs(self, batch, img, caption_negative_states(self, batch))}


def _build(cfg, image_dim: int, text_dim: int) -> Contrastive:
    p = cfg.methods.contrastive
    return Contrastive(image_dim, text_dim, cfg.methods.embed_dim, p.dropout, p.temperature, p.learnable_temperature)


SPEC = register(MethodSpec("contrastive", _build, lambda cfg: ContrastiveLoss(),
                           "dual encoder, symmetric InfoNCE on cosine similarities",
                           search_space=(*OPTIMISER_SPACE, Dim("methods.contrastive.temperature", 0.03, 0.3, log=True),
                                         Dim("methods.contrastive.dropout", 0.0, 0.3))))
