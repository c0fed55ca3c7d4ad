"""Decode one image file into the uint8 ``[3, S, S]`` RGB array the prepared data stores.

Pure functions, no state: :func:`decode_image` is what the preprocess workers call on each file.
The order of operations, and why:

1. The header is read and the pixel count checked against ``max_pixels`` *before* any pixel is
   decoded (Pillow's ``MAX_IMAGE_PIXELS`` is set to the same limit for the duration, and its
   ``DecompressionBombWarning`` is turned into an error), so a decompression bomb costs nothing.
2. JPEG draft mode: ``img.draft("RGB", (S, S))`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale in
   the DCT, choosing the largest reduction that keeps both sides >= S. For a 640x480 COCO image
   and S = 224 that halves the decode work, and the resize that follows starts from 4x fewer
   pixels. The scaled decode's last row/column may cover only part of a source pixel block, so
   the exact source box Pillow reports is passed to the resize (as ``Image.thumbnail`` does).
3. Any mode is converted to RGB: ``L``/``1``/``CMYK``/``YCbCr``/``P`` by Pillow's conversion;
   16-bit and 32-bit grey (``I;16*``, ``I``, ``F``) scaled to 8 bits first (Pillow's own
   conversion would clip everything above 255 to white); anything with alpha (``RGBA``, ``LA``,
   ``PA``, ``P`` with a transparent index) is **composited on a white background**, so a
   transparent region reads as white paper rather than as whatever colour its hidden RGB holds.
4. One resampling pass (bicubic, antialiased) maps a float source box to S x S: the whole image
   for ``squash`` (as the article's ``Resize((224, 224))``), or the centred square whose side is
   the shorter side for ``center_crop`` (shorter side to S, centre crop, with no rounding).
5. The EXIF orientation is applied last, to the S x S result, with the same transposition
   ``ImageOps.exif_transpose`` would use. Every EXIF transposition commutes with squashing to a
   square and with a centred square crop, so this gives the same pixels as transposing first,
   while moving S*S pixels instead of the whole image.

Any failure is raised as :class:`BadImage` carrying a one-line reason for the bad-input report.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

ResizeMode = Literal["squash", "center_crop"]
RESAMPLE = Image.Resampling.BICUBIC
RESAMPLE_NAME = "bicubic"
ALPHA_POLICY = "composited on white"

# EXIF Orientation tag value -> the transposition that displays the image upright (as in
# PIL.ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImage(ValueError):
    """A file that cannot become an image row; ``str(err)`` is the reason."""


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Set Pillow's decompression-bomb limit to ``max_pixels`` and make exceeding it an error."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey or float -> 8-bit ``L``, scaling the full 16-bit range to 0..255.

    ``I;16*`` is 0..65535 by definition. ``I`` (32-bit int) is read as 16-bit when any value
    exceeds 255 and as 8-bit otherwise; ``F`` is read as 0..1 when its maximum is <= 1, else as
    0..255. Values outside the range are clipped.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        scale = 255.0 if float(arr.max(initial=0.0)) <= 1.0 else 1.0
        out = np.clip(arr.astype(np.float64) * scale, 0, 255)
    elif img.mode == "I" and int(arr.max(initial=0)) <= 255:
        out = np.clip(arr, 0, 255)
    else:
        out = np.clip(arr.astype(np.float64), 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(out).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> ``RGB`` (alpha composited on white; see the module docstring)."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH:
        return high_depth_to_l(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise BadImage(f"colour mode {img.mode!r} cannot be converted to RGB ({err})") from None


def source_box(box: tuple[float, float, float, float], mode: ResizeMode) -> tuple[float, float, float, float]:
    """The region of ``box`` that becomes the S x S output: all of it (``squash``) or its
    centred square of side min(width, height) (``center_crop``)."""
    if mode == "squash":
        return box
    if mode != "center_crop":
        raise ValueError(f"resize mode {mode!r} is not one of ('squash', 'center_crop')")
    x0, y0, x1, y1 = box
    side = min(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def too_many_pixels(err: Exception, max_pixels: int) -> BadImage:
    """Pillow's bomb error or warning -> the one-limit reason ``too many pixels: N > preprocess.max_pixels = M``.

    Pillow states its own threshold (twice ``MAX_IMAGE_PIXELS`` for the error, once for the
    warning), which would name a second limit; only the pixel count is kept from its message."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    count = f"{int(found.group(1))} " if found else "more "
    return BadImage(f"too many pixels: {count}> preprocess.max_pixels = {max_pixels}")


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """Open ``path`` (header only) or raise :class:`BadImage` saying what is wrong with the file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage("missing file") from None
    if not path.is_file():
        raise BadImage("not a regular file")
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise BadImage("not an image (no known image format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise too_many_pixels(err, max_pixels) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"unreadable image header ({err})") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise BadImage(f"too many pixels: {w}x{h} = {w * h} > preprocess.max_pixels = {max_pixels}")
    if w < 1 or h < 1:
        img.close()
        raise BadImage(f"degenerate size {w}x{h}")
    return img


def decode_image(path: str | Path, size: int, resize: ResizeMode = "squash",
                 max_pixels: int = 89_478_485, draft: bool = True) -> np.ndarray:
    """Read one image file -> uint8 ``(3, size, size)`` RGB, upright, resized by ``resize``.

    ``draft=False`` decodes at full resolution: the reference the benchmark compares against.
    Raises :class:`BadImage` for a missing, empty, truncated, non-image or oversized file.
    """
    path = Path(path)
    with pixel_limit(max_pixels):
        img = _open_checked(path, max_pixels)
        with img:
            box: tuple[float, float, float, float] = (0.0, 0.0, float(img.width), float(img.height))
            if draft and img.format == "JPEG":
                drafted = img.draft("RGB", (size, size))
                if drafted is not None:
                    box = tuple(float(v) for v in drafted[1])  # type: ignore[assignment]
            try:
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise too_many_pixels(err, max_pixels) from None
            except OSError as err:
                reason = "truncated" if "truncated" in str(err).lower() else "corrupt"
                raise BadImage(f"{reason} image data ({err})") from None
            except (SyntaxError, ValueError, EOFError) as err:
                raise BadImage(f"corrupt image data ({err})") from None
            try:
                orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
                orientation = 1
            rgb = to_rgb(img)
            out = rgb.resize((size, size), RESAMPLE, box=source_box(box, resize))
    method = _ORIENTATION.get(orientation)
    if method is not None:
        out = out.transpose(method)
    arr = np.asarray(out, dtype=np.uint8)  # (S, S, 3)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3, S, S)
