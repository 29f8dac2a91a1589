"""Decoding: every format a phone or a web page produces, and one clear error for everything unusable."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_app.model.images import InvalidImageError, decode_image

from .conftest import SCENES


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(SCENES / "knn" / "test" / "obama1.jpg").convert("RGB")


def test_jpeg_photo(photo: Image.Image) -> None:
    decoded = decode_image((SCENES / "knn" / "test" / "obama1.jpg").read_bytes())
    assert decoded.source_format == "JPEG"
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (photo.height, photo.width, 3)


def test_rgba_png_is_composited_on_white() -> None:
    decoded = decode_image((SCENES / "32bit.png").read_bytes())
    assert decoded.pixels.shape[2] == 3
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (decode_image(encode(transparent, "PNG")).pixels == 255).all()


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "LA", "1"])
def test_other_modes_become_rgb(photo: Image.Image, mode: str) -> None:
    converted = photo.convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    decoded = decode_image(encode(converted, fmt))
    assert decoded.pixels.shape == (photo.height, photo.width, 3)


def test_sixteen_bit_greyscale_png_keeps_its_range(photo: Image.Image) -> None:
    grey = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    image = Image.fromarray(grey)
    assert image.mode.startswith("I;16")
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.pixels.shape[2] == 3
    # The 16-bit range is stretched to 0..255, not clipped (clipping would turn the whole photo white).
    assert decoded.pixels.max() == 255 and decoded.pixels.min() == 0
    assert 40 < decoded.pixels.mean() < 215


def test_exif_orientation_is_applied(photo: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored sideways, shown upright
    stored = photo.transpose(Image.Transpose.ROTATE_90)
    decoded = decode_image(encode(stored, "JPEG", exif=exif.tobytes()))
    assert decoded.pixels.shape[:2] == (photo.height, photo.width)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"%PDF-1.4 not an image", "not_an_image"),
        (b"\x00" * 100, "not_an_image"),
    ],
)
def test_unusable_bytes(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(payload)
    assert caught.value.reason == reason
    assert str(caught.value)


def test_truncated_jpeg() -> None:
    data = (SCENES / "knn" / "test" / "obama1.jpg").read_bytes()
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data[: len(data) // 3])
    assert caught.value.reason == "truncated"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # A tiny PNG whose header claims 30000 x 30000 pixels (900 Mpx): refused from the header alone.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(InvalidImageError) as caught:
        decode_image(png)
    assert caught.value.reason == "too_large"


def test_pixel_limit_is_configurable(photo: Image.Image) -> None:
    data = encode(photo, "PNG")
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data, max_pixels=photo.width * photo.height - 1)
    assert caught.value.reason == "too_large"
    assert decode_image(data, max_pixels=photo.width * photo.height).width == photo.width


def test_every_shared_scene_decodes() -> None:
    paths = sorted(p for p in SCENES.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    assert len(paths) >= 15
    for path in paths:
        assert decode_image(Path(path).read_bytes()).pixels.ndim == 3
