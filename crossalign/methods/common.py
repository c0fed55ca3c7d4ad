"""Building blocks shared by the methods: projections, the contrastive embedding, the
cross-attention matching encoder (``cross_attention`` and ``joint``), and the pair bookkeeping that
turns mined negatives into matching-head inputs.

Everything here is an ``nn.Module`` of a few lines or a pure function; the method modules compose
them. Shapes: B = batch, R = image tokens, L = text tokens, D = ``methods.embed_dim``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossalign.methods.base import Aligner, Batch, State, index_state
from crossalign.methods.mining import mine_negatives

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learnable logit scale at 100
PAIR_CHUNK_ELEMENTS = 1 << 22  # most pair x token x dim elements scored at once without gradients


class Projection(nn.Module):
    """Linear -> LayerNorm -> Dropout: frozen features of any scale into the shared space D.
    (Normalising after the projection costs D, not the encoder's width, per token.)"""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (..., in_dim) -> (..., D)
        return self.dropout(self.norm(self.linear(x)))


class EmbeddingHead(nn.Module):
    """Projection followed by a residual GELU MLP: the embedding used for similarity."""

    def __init__(self, in_dim: int, dim: int, dropout: float):
        super().__init__()
        self.proj = Projection(in_dim, dim, dropout)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:  # (B, in_dim) -> (B, D), unnormalised
        h = self.proj(x)
        return h + self.mlp(h)


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over dim 1 of x (P, L, D), counting only mask (P, L) True positions -> (P, D)."""
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype).unsqueeze(-1)  # (P, L, 1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class CrossBlock(nn.Module):
    """Multi-head cross-attention (queries from one modality, keys/values from the other) with a
    key padding mask, then residual + LayerNorm: ``nn.MultiheadAttention``'s function, split so the
    key/value projections are computed once per image / caption (:meth:`keys`) and a pair only
    pays for the fused attention kernel (``scaled_dot_product_attention``) and the output
    projection. Inputs are flat over pairs (P, ...); :meth:`CrossEncoder.score` flattens.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"methods.embed_dim ({dim}) must be divisible by the attention heads ({heads})")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.drop = nn.Dropout(dropout)  # on the attention output (none on the weights: pair-sized)
        self.norm = nn.LayerNorm(dim)

    def split(self, x: Tensor) -> Tensor:  # (P, L, D) -> (P, H, L, D/H)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Key side, once per item: keys and values (B, Lk, D)."""
        return self.k(kv), self.v(kv)

    def forward(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, pad: Tensor | None) -> Tensor:
        # x, q (P, Lq, D): query-side input and self.q(x); k, v (P, Lk, D); pad (P, Lk) True = padding
        mask = None if pad is None else ~pad[:, None, None, :]  # (P, 1, 1, Lk) True = attend
        out = F.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v), attn_mask=mask)
        out = self.o(out.transpose(1, 2).flatten(2))  # (P, Lq, D)
        return self.norm(x + self.drop(out))


class CrossEncoder(nn.Module):
    """Separate text->image and image->text stacks, pooled, then a matching head -> logit.

    States (all batch-first, token dim second so states of different caption widths can be padded
    and concatenated): image ``x_img``, ``x_i2t_q``, ``x_t2i_k{l}``, ``x_t2i_v{l}`` (B, R, D);
    text ``x_txt``, ``x_t2i_q``, ``x_i2t_k{l}``, ``x_i2t_v{l}`` (B, L, D), ``x_mask`` (B, L).
    """

    def __init__(self, dim: int, heads: int, layers: int, dropout: float, text_positions: str = "none"):
        super().__init__()
        from crossalign.methods.positions import TextPositions
        self.text_positions = TextPositions(text_positions, dim)
        self.t2i = nn.ModuleList(CrossBlock(dim, heads, dropout) for _ in range(layers))
        self.i2t = nn.ModuleList(CrossBlock(dim, heads, dropout) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, 1))

    def image_state(self, img: Tensor) -> State:  # img (B, R, D)
        state = {"x_img": img, "x_i2t_q": self.i2t[0].q(img)}
        for l, blk in enumerate(self.t2i):
            state[f"x_t2i_k{l}"], state[f"x_t2i_v{l}"] = blk.keys(img)
        return state

    def text_state(self, txt: Tensor, mask: Tensor) -> State:  # txt (B, L, D), mask (B, L)
        mask = mask.clone()
        mask[:, 0] |= ~mask.any(1)  # an empty caption keeps one (zero) key so softmax is defined
        txt = self.text_positions(txt)
        state = {"x_txt": txt, "x_mask": mask, "x_t2i_q": self.t2i[0].q(txt)}
        for l, blk in enumerate(self.i2t):
            state[f"x_i2t_k{l}"], state[f"x_i2t_v{l}"] = blk.keys(txt)
        return state

    def score(self, im: State, tx: State) -> Tensor:
        """Logits for broadcastable leading dims of the two states, e.g. (P,) & (P,) -> (P,),
        (B, 1) & (B, n) -> (B, n). Pairs are flattened to one dim P for the fused attention."""
        lead = torch.broadcast_shapes(im["x_img"].shape[:-2], tx["x_txt"].shape[:-2])
        im, tx = _flat_pairs(im, lead), _flat_pairs(tx, lead)
        t, q = tx["x_txt"], tx["x_t2i_q"]
        for l, blk in enumerate(self.t2i):  # captions read the image grid
            t = blk(t, q if l == 0 else blk.q(t), im[f"x_t2i_k{l}"], im[f"x_t2i_v{l}"], None)
        i, q = im["x_img"], im["x_i2t_q"]
        for l, blk in enumerate(self.i2t):  # image tokens read the caption, padding masked
            i = blk(i, q if l == 0 else blk.q(i), tx[f"x_i2t_k{l}"], tx[f"x_i2t_v{l}"], ~tx["x_mask"])
        tv = masked_mean(t, tx["x_mask"])  # (P, D)
        iv = i.mean(1)  # (P, D)
        logits = self.head(torch.cat([tv, iv, tv * iv], -1)).squeeze(-1)  # (P,)
        return logits.view(lead)

    def pair_elements(self, im: State, tx: State) -> int:
        """Per-pair working set: both sides' tokens x D (keys, values, queries, outputs)."""
        return 4 * (im["x_img"].shape[-2] + tx["x_txt"].shape[-2]) * im["x_img"].shape[-1]

    def pairs(self, im: State, tx: State) -> Tensor:
        """Aligned pairs im[p] with tx[p] -> (P,), chunked when no gradient is needed."""
        n = im["x_img"].shape[0]
        if torch.is_grad_enabled() or n == 0:
            return self.score(im, tx)
        step = max(1, PAIR_CHUNK_ELEMENTS // self.pair_elements(im, tx))
        return torch.cat([self.score(index_state(im, slice(s, s + step)), index_state(tx, slice(s, s + step)))
                          for s in range(0, n, step)])

    def grid(self, im: State, tx: State) -> Tensor:
        """Every image with every caption -> (Bi, Bt), a chunk of images at a time."""
        bi, bt = im["x_img"].shape[0], tx["x_txt"].shape[0]
        step = max(1, PAIR_CHUNK_ELEMENTS // (self.pair_elements(im, tx) * max(bt, 1)))
        txt = {k: v[None] for k, v in tx.items()}  # (1, Bt, ...)
        return torch.cat([self.score({k: v[s:s + step, None] for k, v in im.items()}, txt)  # (c, Bt)
                          for s in range(0, bi, step)])


def build_matcher(kind: str, dim: int, heads: int, layers: int, dropout: float,
                  text_positions: str = "none", relation: bool = False) -> nn.Module:
    """The matching encoder ``matcher`` names: ``cross`` (:class:`CrossEncoder`, ``layers`` cross
    blocks each way) or ``late`` (:class:`crossalign.methods.late.LateEncoder`, ``layers`` text
    self-attention blocks); ``text_positions`` (``methods.text_positions``) adds token indices;
    ``relation`` (``methods.relation_geometry``) adds the late matcher's geometry term."""
    if kind == "cross":  # relation geometry needs each token's own cells: the cross matcher pools them (ignored)
        return CrossEncoder(dim, heads, layers, dropout, text_positions)
    if kind == "late":
        from crossalign.methods.late import LateEncoder
        return LateEncoder(dim, heads, dropout, layers=layers, text_positions=text_positions, relation=relation)
    raise ValueError(f"matcher = {kind!r}: expected 'cross' or 'late'")


class CrossMatcher(Aligner):
    """An aligner that scores pairs with its ``self.encoder`` (a :class:`CrossEncoder` or a
    :class:`crossalign.methods.late.LateEncoder`): exact aligned pairs and blockwise all-pairs
    grids (``cross_attention``, ``joint``)."""

    matches = True
    encoder: nn.Module

    def match(self, images: State, texts: State) -> Tensor:
        return self.encoder.pairs(images, texts)  # (P,)

    def match_block(self, images: State, texts: State) -> Tensor:
        return self.encoder.grid(images, texts)  # (Bi, Bt)


def _flat_pairs(state: State, lead: torch.Size) -> State:
    """The encoder's entries of a state (``x_*``), leading dims broadcast to ``lead`` and flattened
    into one pair dim P: tokens (..., L, D) -> (P, L, D), the mask (..., L) -> (P, L)."""
    out = {}
    for key, v in state.items():
        if key.startswith("x_"):
            tail = v.shape[-1:] if key == "x_mask" else v.shape[-2:]
            out[key] = v.expand(*lead, *tail).reshape(-1, *tail)
    return out


def cosine_logits(img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
    """img (Bi, D), txt (Bt, D) L2-normalised -> scaled cosine similarities (Bi, Bt)."""
    return logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * img @ txt.t()


def logit_scale_param(temperature: float, learnable: bool) -> nn.Parameter:
    """CLIP's log(1/T): a parameter when learnable, a frozen one otherwise (saved either way)."""
    return nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable)


def same_image(batch: Batch) -> Tensor:
    """(B, B) bool: pair i's image is pair j's image (their captions are mutual positives)."""
    return batch.image_index[:, None] == batch.image_index[None, :]


def mine_both(scores: Tensor, positive: Tensor, caption_side: tuple[int, int], image_side: tuple[int, int],
              hard_k: int | None = None, replace_fraction: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Negatives of both directions for the matching head, from in-batch scores (B, B) whose row i
    / column j is the image of pair i / the caption of pair j.

    ``caption_side`` = (hard, random) negative captions per image, ``image_side`` = (hard, random)
    negative images per caption (see :func:`crossalign.methods.mining.mine_negatives`). Returns
    (caption rows (B, nc), their validity, image rows (B, ni), their validity).
    """
    cap, cap_ok = mine_negatives(scores, positive, *caption_side, hard_k, replace_fraction)  # (B, nc) per image
    img, img_ok = mine_negatives(scores.t(), positive.t(), *image_side, hard_k, replace_fraction)  # (B, ni) per caption
    return cap, cap_ok, img, img_ok


def pooled_cosine(img_tokens: Tensor, txt_tokens: Tensor, txt_mask: Tensor) -> Tensor:
    """Cosine similarity (B, B) of mean-pooled projected tokens: the hardness proxy of methods
    without an embedding space of their own."""
    iv = F.normalize(img_tokens.mean(1), dim=-1)  # (B, D)
    tv = F.normalize(masked_mean(txt_tokens, txt_mask), dim=-1)  # (B, D)
    return iv @ tv.t()


def gather(state: State, index: Tensor) -> State:
    """Rows of every state tensor at ``index`` (any shape) -> tensors of shape index.shape + (...).

    ``index_select``, not ``v[index]``: the backward of advanced indexing on CPU is ``index_put_``
    with accumulation, which with more than one thread (and >= 32768 elements) adds with float
    atomics in whatever order the threads arrive, so two identical runs differ in the last bits
    (and after a few hundred steps by ~1e-4). ``index_select``'s backward (``index_add_``) sums
    duplicate rows in index order: bit-identical run to run at any thread count.
    """
    flat = index.reshape(-1)  # (N,)
    return {k: v.index_select(0, flat).view(*index.shape, *v.shape[1:]) for k, v in state.items()}


def unsqueeze(state: State) -> State:
    """(B, ...) -> (B, 1, ...): a state broadcast against a gathered (B, n, ...) one."""
    return {k: v[:, None] for k, v in state.items()}


def pair_logits(score, im: State, tx: State, cap: Tensor, img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Matching logits of the batch's positives and mined negatives without expanding both sides
    to pairs: image i against its caption and its negative captions cap (B, nc), caption j against
    its negative images img (B, ni). ``score(im, tx)`` broadcasts leading dims.
    Returns (positives (B,), caption negatives (B, nc), image negatives (B, ni))."""
    rows = torch.arange(cap.shape[0], device=cap.device)[:, None]  # (B, 1)
    with_pos = score(unsqueeze(im), gather(tx, torch.cat([rows, cap], 1)))  # (B, 1 + nc)
    img_neg = score(gather(im, img), unsqueeze(tx))  # (B, ni)
    return with_pos[:, 0], with_pos[:, 1:], img_neg


def add_twins(batch: Batch, cap: Tensor, cap_ok: Tensor, img: Tensor, img_ok: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Twin negatives (``train.twin_negatives``): one more caption column per image (its twin's
    same-plan caption) and one more image column per caption (its image's twin), valid where the
    twin pair is in the batch. Unchanged when the batch carries no twins."""
    if batch.twin is None:
        return cap, cap_ok, img, img_ok
    ok = batch.twin >= 0  # (B,)
    idx = batch.twin.clamp_min(0)  # (B,) batch position of the twin pair
    ok = ok & (batch.image_index[idx] != batch.image_index)  # never a positive
    col, ok = idx[:, None], ok[:, None]  # (B, 1)
    return torch.cat([cap, col], 1), torch.cat([cap_ok, ok], 1), torch.cat([img, col], 1), torch.cat([img_ok, ok], 1)


def caption_negative_states(model: Aligner, batch: Batch) -> State | None:
    """States of the batch's perturbed captions (``train.caption_negatives``), None without any."""
    if not batch.has_caption_negatives:
        return None
    return model.encode_texts(batch.neg_text_tokens, batch.neg_text_mask, batch.neg_text_pooled)


def caption_negative_outputs(model: Aligner, batch: Batch, img: State, neg: State | None,
                             match=None) -> dict[str, Tensor]:
    """Loss inputs of the perturbed captions ``neg``: ``caption_neg_logits`` (Bn,) = ``match`` of
    each with its own pair's image (matching methods), ``caption_neg_sim`` (B, Bn) = similarity of
    every batch image with each (embedding methods). Empty without caption negatives."""
    if neg is None:
        return {}
    out = {}
    if match is not None:
        out["caption_neg_logits"] = match(gather(img, batch.neg_owner), neg)  # (Bn,)
        out["caption_neg_owner"] = batch.neg_owner
    if model.embeds:
        out["caption_neg_sim"] = model.similarity(img, neg)  # (B, Bn)
    return out


def twin_outputs(batch: Batch, cap_logits: Tensor, cap_ok: Tensor, img_logits: Tensor, img_ok: Tensor
                 ) -> dict[str, Tensor]:
    """The twin columns :func:`add_twins` appended (the last caption and image negatives) for the
    binding ranking term: ``twin_logits`` (B, 2), ``twin_valid`` (B, 2). Empty without twins."""
    if batch.twin is None:
        return {}
    return {"twin_logits": torch.stack([cap_logits[:, -1], img_logits[:, -1]], 1),
            "twin_valid": torch.stack([cap_ok[:, -1], img_ok[:, -1]], 1)}
