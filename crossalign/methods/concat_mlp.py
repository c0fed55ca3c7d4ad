"""``concat_mlp``: the readers' baseline. Pooled image and caption embeddings are projected into
the shared space, concatenated and scored by an MLP; trained with binary cross-entropy on the
positive pairs and random in-batch negatives (``methods.concat_mlp.negatives`` per positive)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from crossalign.methods.losses import MatchingLoss
from crossalign.methods.base import Aligner, Batch, MethodSpec, State, register
from crossalign.methods.base import OPTIMISER_SPACE, Dim  # search space (crossalign.train.tuning)
from crossalign.methods.common import (Projection, add_twins, caption_negative_outputs, caption_negative_states,
                                      mine_both, pair_logits, same_image, twin_outputs)


class ConcatMlp(Aligner):
    """Pooled features -> projection (D) -> [image; text] -> MLP -> match logit."""

    matches = True
    reads_tokens = False  # pooled features only

    def __init__(self, image_dim: int, text_dim: int, dim: int, hidden: int, dropout: float, negatives: int):
        super().__init__()
        self.image_proj = Projection(image_dim, dim, dropout)
        self.text_proj = Projection(text_dim, dim, dropout)
        self.hidden = nn.Linear(2 * dim, hidden)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.negatives = negatives
        self.dim = dim

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        return {"pooled": self.image_proj(pooled)}  # (B, D)

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        return {"pooled": self.text_proj(pooled)}  # (B, D)

    def match(self, images: State, texts: State) -> Tensor:
        i, t = torch.broadcast_tensors(images["pooled"], texts["pooled"])
        x = torch.cat([i, t], -1)  # (P, 2D)
        return self.out(self.hidden(x)).squeeze(-1)  # (P,) (leading dims broadcast)

    def match_block(self, images: State, texts: State) -> Tensor:
        """Exact all-pairs scores: the first layer of the MLP splits into an image part and a text
        part, so it is computed once per row and column instead of once per pair."""
        w_i, w_t = self.hidden.weight[:, : self.dim], self.hidden.weight[:, self.dim:]  # (H, D) each
        hi = images["pooled"] @ w_i.t() + self.hidden.bias  # (Bi, H)
        ht = texts["pooled"] @ w_t.t()  # (Bt, H)
        return self.out(hi[:, None, :] + ht[None, :, :]).squeeze(-1)  # (Bi, Bt)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        img = self.encode_images(batch.image_tokens, batch.image_pooled)
        txt = self.encode_texts(batch.text_tokens, batch.text_mask, batch.text_pooled)
        b = batch.image_index.shape[0]
        scores = torch.zeros(b, b, device=batch.image_index.device)  # random negatives: no hardness
        n_cap = (self.negatives + 1) // 2  # negatives replacing the caption; the rest replace the image
        cap, cap_ok, neg_img, img_ok = add_twins(batch, *mine_both(scores, same_image(batch), (0, n_cap),
                                                                   (0, self.negatives - n_cap)))
        pos, cap_logits, img_logits = pair_logits(self.match, img, txt, cap, neg_img)
        return {"pos_logits": pos,  # (B,)
                "neg_logits": torch.cat([cap_logits, img_logits], 1),  # (B, negatives)
                "neg_valid": torch.cat([cap_ok, img_ok], 1),
                **twin_outputs(batch, cap_logits, cap_ok, img_logits, img_ok),
                **caption_negative_outputs(self, batch, img, caption_negative_states(self, batch), self.match)}


def _build(cfg, image_dim: int, text_dim: int) -> ConcatMlp:
    p = cfg.methods.concat_mlp
    return ConcatMlp(image_dim, text_dim, cfg.methods.embed_dim, p.hidden, p.dropout, p.negatives)


SPEC = register(MethodSpec("concat_mlp", _build,
                           lambda cfg: MatchingLoss(rank_weight=cfg.train.binding_rank_weight),
                           "pooled image+caption concatenated -> MLP -> match logit (BCE, random negatives)",
                           search_space=(*OPTIMISER_SPACE, Dim("methods.concat_mlp.dropout", 0.0, 0.3),
                                         Dim("methods.concat_mlp.negatives", 1, 7, integer=True))))
