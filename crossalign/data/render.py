"""Drawing of synthetic scenes: textured backgrounds and anti-aliased coloured shapes.

Pure numpy + PIL, float images in [0, 1] until :func:`to_uint8`. Each shape is drawn 3x
super-sampled on a small local mask and box-filtered down, so edges are anti-aliased without
rendering the whole image at a higher resolution.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 3

# name -> RGB in [0, 255]; the first n_colours are used
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (240, 205, 40),
    "purple": (135, 55, 175), "orange": (245, 135, 25), "white": (245, 245, 245), "black": (25, 25, 25),
}
# the first n_shapes are used
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring")


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene, in pixels."""

    colour: str
    shape: str
    size: str  # "small" | "large"
    x: float  # centre
    y: float
    radius: float  # circumradius
    angle: float  # rotation, degrees
    tint: tuple[float, float, float]  # colour offset in [0, 1] units (colour noise)

    def bbox(self) -> list[float]:
        """COCO [x, y, w, h] of the circumscribed square."""
        r = self.radius
        return [round(self.x - r, 1), round(self.y - r, 1), round(2 * r, 1), round(2 * r, 1)]


def _regular(n: int, r: float, angle: float, phase: float = -90.0) -> list[tuple[float, float]]:
    return [(r * math.cos(math.radians(phase + angle + 360.0 * k / n)),
             r * math.sin(math.radians(phase + angle + 360.0 * k / n))) for k in range(n)]


def _rotate(points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(px * c - py * s, px * s + py * c) for px, py in points]


def outline(shape: str, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` (not circle/ring) around the origin, circumradius ``r``."""
    if shape == "square":
        return _regular(4, r * 0.92, angle, phase=45.0)
    if shape == "triangle":
        return _regular(3, r, angle)
    if shape == "hexagon":
        return _regular(6, r, angle, phase=0.0)
    if shape == "diamond":  # a rhombus taller than wide, so it never looks like a turned square
        return _rotate([(0.0, -r), (0.6 * r, 0.0), (0.0, r), (-0.6 * r, 0.0)], angle)
    if shape == "star":
        outer, inner = _regular(5, r, angle), _regular(5, r * 0.45, angle, phase=-54.0)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, w = r * 0.95, r * 0.33
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
               (-a, -w), (-w, -w)]
        return _rotate(pts, angle)
    raise ValueError(f"shape {shape!r} has no polygon outline (known: {SHAPES})")


def shape_mask(obj: SceneObject) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of ``obj``: (mask float32 (h, w) in [0, 1], x0, y0 of its top-left)."""
    half = int(math.ceil(obj.radius)) + 2
    x0, y0 = int(math.floor(obj.x)) - half, int(math.floor(obj.y)) - half
    side = 2 * half
    cx, cy = (obj.x - x0) * SUPERSAMPLE, (obj.y - y0) * SUPERSAMPLE  # centre in the local frame
    img = Image.new("L", (side * SUPERSAMPLE, side * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(img)
    r = obj.radius * SUPERSAMPLE
    if obj.shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if obj.shape == "ring":
            ri = r * 0.55
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        draw.polygon([(cx + px, cy + py) for px, py in outline(obj.shape, r, obj.angle)], fill=255)
    mask = np.asarray(img.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0  # (side, side)
    return mask, x0, y0


def upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Smooth (bicubic) upsampling of a coarse (3, C, C) float grid to (size, size, 3), one
    channel at a time in Pillow's float mode (fast, and no BLAS threads to oversubscribe)."""
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(g, dtype=np.float32))  # mode "F"
                           .resize((size, size), Image.Resampling.BICUBIC)) for g in grid]  # 3 x (S, S)
    return np.stack(channels, axis=-1)  # (S, S, 3)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
    """Pixel row and column coordinates, (2, S, S) float32 (cached: read-only)."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    grid.flags.writeable = False
    return grid


def background(rng: np.random.Generator, size: int, textured: bool, strength: float) -> np.ndarray:
    """A (size, size, 3) float32 background: a muted base colour, plus (when ``textured``)
    smooth two-octave value noise and an oriented stripe pattern scaled by ``strength``."""
    grey = rng.uniform(0.35, 0.65)
    base = np.clip(grey + rng.normal(0.0, 0.05, size=3), 0.0, 1.0).astype(np.float32)  # (3,)
    img = np.broadcast_to(base, (size, size, 3)).copy()  # (S, S, 3)
    if not textured or strength == 0:
        return img
    for cells, amp in ((4, 0.10), (12, 0.05)):
        grid = rng.normal(0.0, 1.0, size=(3, cells + 1, cells + 1)).astype(np.float32)  # (3, C, C)
        noise = upsample(grid, size)  # (S, S, 3)
        img += strength * amp * noise
    theta, freq, phase = rng.uniform(0, math.pi), rng.uniform(0.05, 0.25), rng.uniform(0, 2 * math.pi)
    yy, xx = _grid(size)  # (S, S) each
    stripes = np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)  # (S, S)
    img += (strength * 0.04 * stripes)[:, :, None] * rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    return img


def draw_scene(bg: np.ndarray, objects: list[SceneObject], noise: np.ndarray | None) -> np.ndarray:
    """Composite ``objects`` (in order) over a copy of ``bg`` and add per-pixel ``noise``;
    returns uint8 (S, S, 3)."""
    img = bg.copy()  # (S, S, 3)
    size = img.shape[0]
    for obj in objects:
        mask, x0, y0 = shape_mask(obj)  # (h, w)
        colour = np.clip(np.asarray(COLOURS[obj.colour], np.float32) / 255.0 + np.asarray(obj.tint, np.float32),
                         0.0, 1.0)  # (3,)
        ys, xs = slice(max(y0, 0), min(y0 + mask.shape[0], size)), slice(max(x0, 0), min(x0 + mask.shape[1], size))
        m = mask[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0, None]  # (h', w', 1)
        img[ys, xs] = img[ys, xs] * (1.0 - m) + colour * m
    if noise is not None:
        img += noise
    return to_uint8(img)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Float [0, 1] (S, S, 3) -> uint8, rounded."""
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
