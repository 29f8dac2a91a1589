"""Turn uploaded bytes into an upright 8-bit RGB image, or say clearly why not.

Every way an upload can be unusable (empty, not an image, truncated, absurdly large) raises one exception type,
:class:`InvalidImageError`, so the layers above map it to a single 4xx answer and never to a crash.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own default guard is ~89 Mpx (a warning) and twice that (an error). A face photo never needs more than
# this; anything bigger is treated as a decompression bomb before a single pixel is decoded.
DEFAULT_MAX_PIXELS = 40_000_000


class InvalidImageError(ValueError):
    """The bytes are not a usable image. The message says why, in words a client can act on."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        #: A short machine-readable cause: ``empty``, ``not_an_image``, ``truncated``, ``too_large``, ``bad_size``.
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image as a ``(height, width, 3)`` uint8 array, plus what it was decoded from."""

    pixels: np.ndarray
    source_format: str

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode JPEG/PNG/... bytes into upright 8-bit RGB.

    Handles EXIF orientation, greyscale, palette, RGBA/LA (composited on white, as a viewer shows them),
    16-bit and 32-bit integer greyscale, and CMYK. Raises :class:`InvalidImageError` for anything unusable.
    """
    if not data:
        raise InvalidImageError("the file is empty (0 bytes)", reason="empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns (not raises) between max_pixels and 2x; we want a hard refusal at our own limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidImageError(f"the image has no pixels ({width}x{height})", reason="bad_size")
            if width * height > max_pixels:
                raise InvalidImageError(
                    f"the image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
                    reason="too_large",
                )
            image.load()
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"the image is too large to decode safely: {exc}", reason="too_large") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            "the file is not an image in a format this service reads", reason="not_an_image"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated or corrupt pixel data as OSError ("image file is truncated", "broken data
        # stream") and some malformed headers as SyntaxError/ValueError.
        raise InvalidImageError(f"the image data is truncated or corrupt: {exc}", reason="truncated") from exc
    source_format = image.format or "unknown"
    try:
        rgb = _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError) as exc:
        raise InvalidImageError(f"the image could not be converted to RGB: {exc}", reason="truncated") from exc
    return DecodedImage(pixels=np.asarray(rgb, dtype=np.uint8), source_format=source_format)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Wide greyscale: scale the actual range to 0..255 rather than clipping (16-bit PNGs use 0..65535).
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        grey = ((values - low) * scale).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_timed(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[DecodedImage | InvalidImageError, float]:
    """:func:`decode_image` and how long it took (milliseconds); a bad upload is returned, not raised."""
    started = time.perf_counter()
    try:
        image: DecodedImage | InvalidImageError = decode_image(data, max_pixels=max_pixels)
    except InvalidImageError as exc:
        image = exc
    return image, (time.perf_counter() - started) * 1000.0
