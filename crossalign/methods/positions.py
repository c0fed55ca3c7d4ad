"""2D positions of image grid tokens (``methods.image_positions``).

The frozen image encoders hand over a row-major grid of patch / cell tokens (``(h, w)`` in the
features' ``meta.json``; square for the square inputs every stage uses). Attention and pooling are
permutation-invariant over those tokens, so without a position an aligner cannot tell "a red
circle left of a blue square" from the same scene with the two swapped. Positions are
added to the *projected* tokens (dim D) of every method that reads tokens:

- ``sincos``: fixed 2D sine-cosine encoding (MAE, He et al., 2022): a quarter of the dims encode
  the row with sines, a quarter with cosines, the other half the column, at geometric frequencies;
- ``learned``: a learned row embedding plus a learned column embedding (DETR's factorised
  learned positions), zero-initialised, for grids up to :data:`MAX_SIDE` per side;
- ``none``: no position (cells are a bag).

A class token never reaches the grid: ``hf:``/``torchvision:``/``timm:`` transformers store their
patch tokens as the grid and the class token as the pooled feature, which stays unpositioned.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

KINDS = ("sincos", "learned", "none")
MAX_SIDE = 64  # learned positions: rows / columns per side (ViT-L/14 at 448 px has 32)


def grid_side(regions: int) -> int:
    """Side of the square grid of ``regions`` tokens; a clear error when it is not square."""
    side = math.isqrt(regions)
    if side * side != regions:
        raise ValueError(f"image tokens: {regions} regions is not a square grid; 2D positions need the "
                         f"encoder's square (h, w) grid (set methods.image_positions: none)")
    return side


def sincos_2d(side: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos positions of a ``side x side`` row-major grid -> (side*side, dim)."""
    if dim % 4:
        raise ValueError(f"methods.embed_dim ({dim}) must be divisible by 4 for sincos image positions")
    q = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(q, dtype=torch.float64) / q)  # (q,)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    y, x = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega  # (R, q) each
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], 1).float()  # (R, dim)


class Positions(nn.Module):
    """Adds a position to each token of (B, N, D) (what :class:`ImagePositions` and
    :class:`TextPositions` share): the ``kind`` check naming the params key, fixed tables computed
    once per length and device (not parameters, not saved), and ``none`` as the identity."""

    def __init__(self, kind: str, dim: int, key: str, divisor: int):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"methods.{key} = {kind!r}: expected one of {list(KINDS)}")
        if kind == "sincos" and dim % divisor:
            need = "even" if divisor == 2 else f"divisible by {divisor}"
            raise ValueError(f"methods.embed_dim ({dim}) must be {need} for sincos {key.split('_')[0]} positions")
        self.kind, self.dim = kind, dim
        self._cache: dict[tuple[int, torch.device], Tensor] = {}

    def fixed(self, n: int, device: torch.device, make) -> Tensor:
        """``make(n, dim)`` on ``device``, computed once per (n, device)."""
        key = (n, device)
        if key not in self._cache:
            self._cache[key] = make(n, self.dim).to(device)
        return self._cache[key]

    def positions(self, n: int, device: torch.device) -> Tensor:
        """Positions of ``n`` tokens -> (n, D)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, N, D)
        if self.kind == "none" or x.shape[-2] == 0:
            return x
        return x + self.positions(x.shape[-2], x.device).to(x.dtype)


class ImagePositions(Positions):
    """Adds a 2D position to each token of a square row-major grid: (B, R, D) -> (B, R, D)."""

    def __init__(self, kind: str, dim: int):
        super().__init__(kind, dim, "image_positions", 4)
        if kind == "learned":
            self.rows = nn.Parameter(torch.zeros(MAX_SIDE, dim))
            self.cols = nn.Parameter(torch.zeros(MAX_SIDE, dim))

    def positions(self, regions: int, device: torch.device) -> Tensor:
        """Positions of ``regions`` grid tokens -> (R, D)."""
        side = grid_side(regions)
        if self.kind == "learned":
            if side > MAX_SIDE:
                raise ValueError(f"image tokens: a {side}x{side} grid exceeds learned positions' {MAX_SIDE} per side")
            return (self.rows[:side, None, :] + self.cols[None, :side, :]).reshape(side * side, self.dim)
        return self.fixed(side, device, sincos_2d)


# ------------------------------------------------------------------------------------ captions
MAX_TOKENS = 512  # learned text positions: the longest caption (the default encoder's limit)


def sincos_1d(length: int, dim: int) -> Tensor:
    """Fixed 1D sin-cos positions (Vaswani et al., 2017) of ``length`` tokens -> (length, dim)."""
    if dim % 2:
        raise ValueError(f"methods.embed_dim ({dim}) must be even for sincos text positions")
    h = dim // 2
    omega = 1.0 / 10000.0 ** (torch.arange(h, dtype=torch.float64) / h)  # (h,)
    t = torch.arange(length, dtype=torch.float64).reshape(-1, 1) * omega  # (L, h)
    return torch.cat([t.sin(), t.cos()], 1).float()  # (L, dim)


class TextPositions(Positions):
    """Adds each caption token's index (``methods.text_positions``) to the matcher's projected
    caption tokens: (B, L, D) -> (B, L, D). The frozen text encoder saw word order, but its top
    layer keeps little of it per token (bench/text_probe.py: a final-layer noun state knows its
    own object's side 56 % of the time, a bag of words 50 %); with an index, the matcher's text
    self-attention can tell "A left of B" from "B left of A" by which noun precedes the relation."""

    def __init__(self, kind: str, dim: int):
        super().__init__(kind, dim, "text_positions", 2)
        if kind == "learned":
            self.table = nn.Parameter(torch.zeros(MAX_TOKENS, dim))

    def positions(self, length: int, device: torch.device) -> Tensor:
        """Positions of ``length`` caption tokens -> (L, D)."""
        if self.kind == "learned":
            if length > MAX_TOKENS:
                raise ValueError(f"caption tokens: {length} exceed learned text positions' {MAX_TOKENS}")
            return self.table[:length]
        return self.fixed(length, device, sincos_1d)
