"""Face chips: the aligned crop an enrolled face was embedded from, kept as a JPEG beside the gallery.

A chip is exactly the embedder's input before standardisation (the detector's square crop around the face,
``crop_size`` pixels, values 0..255), so a later checkpoint can embed the same faces again without the original
photos, and people can see which face an enrolment holds. JPEG at quality 95 without chroma subsampling: about
10 kB per face, and the re-embedded vector stays within a rounding error of the original one (tested).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

JPEG_QUALITY = 95


def chip_jpeg(crop: torch.Tensor) -> bytes:
    """One ``(3, size, size)`` crop (0..255, as :meth:`FaceDetector.crops` gives it) as JPEG bytes."""
    pixels = crop.detach().clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(out, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def chip_tensor(data: bytes) -> torch.Tensor:
    """A chip's JPEG bytes back as a ``(3, size, size)`` float32 crop (0..255), ready for the embedder."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
