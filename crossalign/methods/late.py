"""Late-interaction matcher (``matcher: late``): each caption token finds its best image cell.

FILIP (Yao et al., 2022) / ColBERT-style token-wise maximum similarity, over *positioned* grid
cells: ``score(image, caption) = scale * sum_j w_j * max_r cos(f_j, g_r) + bias``, where f_j are
the caption's tokens after one self-attention block (so "circle" in "a white circle left of ..."
carries its colour and its role), g_r the projected cells plus their 2D position
(:mod:`crossalign.methods.positions`) and a residual MLP (so a cell carries what *and* where),
and w_j a learned softmax weight over the caption's real tokens (function words weigh little).

Why it binds when the cross-attention encoder did not (measured: docs/methods.md): the max
picks one cell per token, so a token's score depends on whether *one* region holds all it names
(colour and shape and size, and a place consistent with its relation); mean-pooled soft attention
averages regions and fits the twins slowly. It is also cheap: a pair costs one (L, R) matrix of
dot products; caption and image states are computed once each.

Two options give the caption side word order and the score geometry (``methods.text_positions``,
``methods.relation_geometry``; docs/methods.md, "Position binding"):

* text positions: each projected caption token gets its index (:class:`TextPositions`) before the
  self-attention block, so "A left of B" and "B left of A" are different sequences to it;
* relation geometry: each token also predicts an offset ``where_j`` (x, y) and the score adds
  ``sum_j w_j * where_j . (at_j - centre)``, where ``at_j`` is the place of the token's cells
  (the softmax over its similarities, at the matcher's scale, of the cells' grid coordinates in
  [-1, 1]) and ``centre`` the caption's weighted mean place. It compares the places of the
  things a caption names with each other, which a per-token max cannot: "a circle left of a
  square" scores x_square - x_circle when the circle's token wants (-1, 0) and the square's
  (1, 0), and its position twin scores the negative. The head starts at zero (today's score).

Same interface as :class:`crossalign.methods.common.CrossEncoder`: ``image_state``, ``text_state``,
``score`` (broadcast leading dims), ``pairs``, ``grid``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossalign.methods.base import State, index_state
from crossalign.methods.positions import TextPositions, grid_side

PAIR_CHUNK_ELEMENTS = 1 << 22  # most pair x token x cell elements scored at once without gradients


class SelfBlock(nn.Module):
    """Pre-LN transformer block over caption tokens: self-attention (padding masked) + MLP."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"methods.embed_dim ({dim}) must be divisible by the attention heads ({heads})")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x (B, L, D), mask (B, L) True = real token
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(self.norm1(x)).chunk(3, -1))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # (B, H, L, D/H)
        x = x + self.drop(self.out(att.transpose(1, 2).flatten(2)))
        return x + self.drop(self.mlp(self.norm2(x)))


class LateEncoder(nn.Module):
    """Token-wise max similarity over positioned cells -> matching logit.

    States: image ``x_cells`` (B, R, D) unit vectors; text ``x_tokens`` (B, L, D) unit vectors and
    ``x_weight`` (B, L) (softmax over real tokens, 0 on padding, so padded states concatenate).
    """

    def __init__(self, dim: int, heads: int, dropout: float, temperature: float = 0.1, layers: int = 1,
                 text_positions: str = "none", relation: bool = False):
        super().__init__()
        self.cell = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.text_positions = TextPositions(text_positions, dim)
        self.text = SelfBlock(dim, heads, dropout)
        self.text_more = nn.ModuleList(SelfBlock(dim, heads, dropout) for _ in range(max(0, layers - 1)))
        self.weight = nn.Linear(dim, 1)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.bias = nn.Parameter(torch.zeros(()))
        self.relation = relation
        if relation:  # each token's wanted offset (x, y) from the caption's matched centre; zero: off at init
            self.where = nn.Linear(dim, 2)
            nn.init.zeros_(self.where.weight), nn.init.zeros_(self.where.bias)
        self._xy: dict[tuple[int, torch.device], Tensor] = {}

    def cell_xy(self, regions: int, device: torch.device) -> Tensor:
        """(x, y) in [-1, 1] of each cell of the square row-major grid -> (R, 2)."""
        key = (regions, device)
        if key not in self._xy:
            side = grid_side(regions)
            c = torch.linspace(-1.0, 1.0, side) if side > 1 else torch.zeros(1)
            rows, cols = torch.meshgrid(c, c, indexing="ij")
            self._xy[key] = torch.stack([cols.reshape(-1), rows.reshape(-1)], 1).to(device)
        return self._xy[key]

    def image_state(self, img: Tensor) -> State:  # img (B, R, D), positioned
        return {"x_cells": F.normalize(img + self.cell(img), dim=-1)}  # (B, R, D)

    def text_state(self, txt: Tensor, mask: Tensor) -> State:  # txt (B, L, D), mask (B, L)
        mask = mask.clone()
        mask[:, 0] |= ~mask.any(1)  # an empty caption keeps one (zero) token so softmax is defined
        x = self.text(self.text_positions(txt), mask)  # (B, L, D)
        for block in self.text_more:
            x = block(x, mask)
        w = self.weight(x).squeeze(-1).masked_fill(~mask, float("-inf")).softmax(-1)  # (B, L)
        state = {"x_tokens": F.normalize(x, dim=-1), "x_weight": w}
        if self.relation:
            state["x_where"] = self.where(x)  # (B, L, 2)
        return state

    def score(self, im: State, tx: State) -> Tensor:
        """Logits for broadcastable leading dims, e.g. (P,) & (P,) -> (P,), (B, 1) & (B, n) -> (B, n)."""
        sim = tx["x_tokens"] @ im["x_cells"].transpose(-1, -2)  # (..., L, R)
        best = sim.max(-1).values  # (..., L): each token's best cell
        scale = self.log_scale.exp()
        logit = scale * (tx["x_weight"] * best).sum(-1) + self.bias  # (...)
        if not self.relation:
            return logit
        # where each token's cells are (soft argmax), relative to the caption's weighted centre
        at = (scale * sim).softmax(-1) @ self.cell_xy(sim.shape[-1], sim.device).to(sim.dtype)  # (..., L, 2)
        centre = (tx["x_weight"].unsqueeze(-1) * at).sum(-2, keepdim=True)  # (..., 1, 2)
        agree = (tx["x_where"] * (at - centre)).sum(-1)  # (..., L): wanted offset . found offset
        return logit + (tx["x_weight"] * agree).sum(-1)

    def pair_elements(self, im: State, tx: State) -> int:
        return im["x_cells"].shape[-2] * tx["x_tokens"].shape[-2]

    def pairs(self, im: State, tx: State) -> Tensor:
        """Aligned pairs im[p] with tx[p] -> (P,), chunked when no gradient is needed."""
        n = im["x_cells"].shape[0]
        if torch.is_grad_enabled() or n == 0:
            return self.score(im, tx)
        step = max(1, PAIR_CHUNK_ELEMENTS // max(1, self.pair_elements(im, tx)))
        return torch.cat([self.score(index_state(im, slice(s, s + step)), index_state(tx, slice(s, s + step)))
                          for s in range(0, n, step)])

    def grid(self, im: State, tx: State) -> Tensor:
        """Every image with every caption -> (Bi, Bt), a chunk of images at a time."""
        bi, bt = im["x_cells"].shape[0], tx["x_tokens"].shape[0]
        step = max(1, PAIR_CHUNK_ELEMENTS // max(1, self.pair_elements(im, tx) * max(bt, 1)))
        txt = {k: v[None] for k, v in tx.items()}  # (1, Bt, ...)
        return torch.cat([self.score({k: v[s:s + step, None] for k, v in im.items()}, txt)  # (c, Bt)
                          for s in range(0, bi, step)])
