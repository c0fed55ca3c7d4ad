"""crossalign.preprocess.images: every file kind the preprocess stage meets, made as a real file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from crossalign.preprocess.images import BadImage, decode_image, high_depth_to_l, source_box

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def quadrants(width: int = 64, height: int = 48) -> Image.Image:
    """Upright test card: red top-left, green top-right, blue bottom-left, white bottom-right."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)  # (H, W, 3)
    h, w = height // 2, width // 2
    arr[:h, :w], arr[:h, w:], arr[h:, :w], arr[h:, w:] = RED, GREEN, BLUE, WHITE
    return Image.fromarray(arr)


def quadrant_colours(chw: np.ndarray) -> list[tuple[int, ...]]:
    """Mean colour of the centre of each quadrant of a (3, S, S) image: TL, TR, BL, BR."""
    s = chw.shape[1]
    q, m = s // 2, s // 8
    cells = [(0, 0), (0, q), (q, 0), (q, q)]
    return [tuple(int(round(v)) for v in chw[:, y + m:y + q - m, x + m:x + q - m].mean(axis=(1, 2)))
            for y, x in cells]


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 24) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_rgb_jpeg_shape_dtype_and_content(tmp_path: Path) -> None:
    path = tmp_path / "card.jpg"
    quadrants().save(path, quality=95)
    out = decode_image(path, 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    assert all(close(c, e) for c, e in zip(quadrant_colours(out), [RED, GREEN, BLUE, WHITE]))


@pytest.mark.parametrize("orientation, inverse", [
    (2, Image.Transpose.FLIP_LEFT_RIGHT), (3, Image.Transpose.ROTATE_180),
    (4, Image.Transpose.FLIP_TOP_BOTTOM), (5, Image.Transpose.TRANSPOSE),
    (6, Image.Transpose.ROTATE_90), (7, Image.Transpose.TRANSVERSE), (8, Image.Transpose.ROTATE_270)])
def test_exif_orientation_applied(tmp_path: Path, orientation: int, inverse: Image.Transpose) -> None:
    """The file stores the card transposed plus an Orientation tag; decoding must show it upright."""
    stored = quadrants().transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    stored.save(path, quality=95, exif=exif)
    assert ImageOps.exif_transpose(Image.open(path)).size == (64, 48)  # the test card is right
    colours = quadrant_colours(decode_image(path, 32))
    assert all(close(c, e) for c, e in zip(colours, [RED, GREEN, BLUE, WHITE])), colours


def test_exif_rotated_center_crop_matches_exif_transpose_then_fit(tmp_path: Path) -> None:
    """Transposing the S x S result equals ImageOps.exif_transpose first, then a centred crop."""
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 256, size=(90, 161, 3), dtype=np.uint8)).resize((321, 181))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    stored.save(path, quality=95, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    expected = np.asarray(ImageOps.fit(upright, (40, 40), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    got = decode_image(path, 40, "center_crop", draft=False)
    assert np.abs(got.astype(int) - expected).mean() < 1.0


def test_center_crop_keeps_middle_squash_keeps_all(tmp_path: Path) -> None:
    arr = np.zeros((32, 64, 3), dtype=np.uint8)  # (H, W, 3): red | green green | blue
    arr[:, :16], arr[:, 16:48], arr[:, 48:] = RED, GREEN, BLUE
    path = tmp_path / "bands.png"
    Image.fromarray(arr).save(path)
    crop = decode_image(path, 16, "center_crop")
    assert crop[1].min() > 200 and crop[0].max() < 60 and crop[2].max() < 60  # only green
    squash = decode_image(path, 16, "squash")
    assert tuple(squash[:, 8, 0]) == RED and tuple(squash[:, 8, 15]) == BLUE


def test_source_box() -> None:
    assert source_box((0, 0, 64, 32), "squash") == (0, 0, 64, 32)
    assert source_box((0, 0, 64, 32), "center_crop") == (16, 0, 48, 32)
    assert source_box((0, 0, 30, 51), "center_crop") == (0, 10.5, 30, 40.5)


def test_grayscale_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "grey.jpg"
    Image.new("L", (40, 30), 77).save(path)
    out = decode_image(path, 16)
    assert out.shape == (3, 16, 16) and np.all(np.abs(out.astype(int) - 77) <= 1)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(path, quality=95)  # red ink
    assert Image.open(path).mode == "CMYK"
    out = decode_image(path, 16)
    assert close(tuple(int(v) for v in out[:, 8, 8]), RED, 10)


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    arr = np.full((20, 30), 32768, dtype=np.uint16)  # mid grey in 16 bits
    arr[:, 15:] = 65535
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = decode_image(path, 30, draft=False)
    assert tuple(out[:, 10, 2]) == (128, 128, 128)  # 32768 * 255 / 65535 = 127.5 -> 128
    assert tuple(out[:, 10, 28]) == (255, 255, 255)


def test_high_depth_to_l_values() -> None:
    img = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert np.asarray(high_depth_to_l(img)).tolist() == [[0, 1, 255]]


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 4), dtype=np.uint8)  # (H, W, RGBA)
    arr[:, :20] = (0, 0, 255, 255)  # opaque blue
    arr[:, 20:] = (255, 0, 0, 0)  # fully transparent, hidden red
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, "RGBA").save(path)
    out = decode_image(path, 20, draft=False)
    assert tuple(out[:, 10, 2]) == BLUE and tuple(out[:, 10, 17]) == WHITE


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (40, 20), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black (transparent), 1 green
    img.paste(1, (0, 0, 20, 20))
    path = tmp_path / "pal.png"
    img.save(path, transparency=0)
    reopened = Image.open(path)
    assert reopened.mode == "P" and "transparency" in reopened.info
    out = decode_image(path, 20)
    assert tuple(out[:, 10, 2]) == GREEN and tuple(out[:, 10, 17]) == WHITE


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadImage, match="missing file"):
        decode_image(tmp_path / "nope.jpg", 16)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(BadImage, match="empty file"):
        decode_image(path, 16)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are not the pixels you are looking for\n")
    with pytest.raises(BadImage, match="not an image"):
        decode_image(path, 16)


@pytest.mark.parametrize("draft", [True, False])
def test_truncated_jpeg(tmp_path: Path, draft: bool) -> None:
    rng = np.random.default_rng(1)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)).save(full, quality=90)
    data = full.read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated"):
        decode_image(path, 32, draft=draft)


def test_truncated_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    full = tmp_path / "full.png"
    Image.fromarray(rng.integers(0, 256, size=(100, 100, 3), dtype=np.uint8)).save(full)
    path = tmp_path / "cut.png"
    path.write_bytes(full.read_bytes()[:5000])
    with pytest.raises(BadImage, match="truncated|corrupt"):
        decode_image(path, 32)


@pytest.mark.parametrize("side", [80, 200])  # over the limit; over twice the limit (bomb error)
def test_over_pixel_limit(tmp_path: Path, side: int) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side), RED).save(path)
    with pytest.raises(BadImage, match="too many pixels") as err:
        decode_image(path, 16, max_pixels=5000)
    # one limit named, the param's; Pillow's own threshold (twice it for a bomb) is not repeated
    assert str(err.value) == f"too many pixels: {side * side} > preprocess.max_pixels = 5000"
    assert "10000" not in str(err.value) and "decompression" not in str(err.value).lower()
    assert decode_image(path, 16, max_pixels=side * side).shape == (3, 16, 16)
    assert Image.MAX_IMAGE_PIXELS != 5000  # the limit is restored afterwards


def test_draft_matches_full_decode_on_coco(coco_sample: Path) -> None:
    """JPEG draft decoding keeps the content: over real COCO photos, the mean |diff| against a
    full decode with the same filter is <= 2 grey levels (the benchmark's criterion)."""
    paths = sorted((coco_sample / "train2017").glob("*.jpg"))[:12]
    for mode in ("squash", "center_crop"):
        diffs = [np.abs(decode_image(p, 224, mode).astype(np.int16) - decode_image(p, 224, mode, draft=False)).mean()
                 for p in paths]
        assert float(np.mean(diffs)) <= 2.0, (mode, diffs)
