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


class ImagePositions(nn.Module):
    """Adds a 2D position to each token of a square row-major grid: (B, R, D) -> (B, R, D)."""

    def __init__(self, kind: str, dim: int):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"methods.image_positions = {kind!r}: expected one of {list(KINDS)}")
        if kind == "sincos" and dim % 4:
            raise ValueError(f"methods.embed_dim ({dim}) must be divisible by 4 for sincos image positions")
        self.kind, self.dim = kind, dim
        if kind == "learned":
            self.rows = nn.Parameter(torch.zeros(MAX_SIDE, dim))
            self.cols = nn.Parameter(torch.zeros(MAX_SIDE, dim))
        self._cache: dict[tuple[int, torch.device], Tensor] = {}

    def table(self, regions: int, device: torch.device) -> Tensor:
        """Positions of ``regions`` grid tokens -> (R, D)."""
        side = grid_side(regions)
        if self.kind == "learned":
            if side > MAX_SIDE:
                raise ValueError(f"image tokens: a {side}x{side} grid exceeds learned positions' {MAX_SIDE} per side")
            return (self.rows[:side, None, :] + self.cols[None, :side, :]).reshape(side * side, self.dim)
        key = (side, device)
        if key not in self._cache:  # fixed: computed once per grid and device (not a parameter, not saved)
            self._cache[key] = sincos_2d(side, self.dim).to(device)
        return self._cache[key]

    def forward(self, x: Tensor) -> Tensor:  # (B, R, D) -> (B, R, D)
        if self.kind == "none" or x.shape[-2] == 0:
            return x
        return x + self.table(x.shape[-2], x.device).to(x.dtype)
