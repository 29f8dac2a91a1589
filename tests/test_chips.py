"""Face chips: the aligned crop that was embedded, kept as JPEG, embeds again to the same vector."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from serve_app.model.chips import chip_jpeg, chip_tensor
from serve_app.model.enrollment import embed_for_enrolment

from .conftest import LFW, SCENES


def test_an_enrolment_keeps_the_crop_it_embedded_and_that_chip_embeds_to_the_same_vector(models) -> None:  # type: ignore[no-untyped-def]
    photos = sorted((LFW / "images").glob("*/*_0001.jpg"))[:12]
    uploads = [(p.name, p.read_bytes()) for p in photos] + [("group", (SCENES / "couple.jpg").read_bytes())]
    outcomes = embed_for_enrolment(models.detector, models.embedder, uploads)
    accepted = [o for o in outcomes if o.embedding is not None]
    assert len(accepted) >= 11 and outcomes[-1].chip is None  # a refused photo keeps no chip
    for outcome in accepted:
        assert outcome.chip is not None
        with Image.open(io.BytesIO(outcome.chip)) as chip:
            assert chip.format == "JPEG" and chip.size == (160, 160)
    again = models.embedder.embed(torch.stack([chip_tensor(o.chip) for o in accepted if o.chip is not None]))
    cosines = np.sum(again * np.stack([o.embedding for o in accepted if o.embedding is not None]), axis=1)
    print(f"\nchip re-embedded vs original: min cosine {cosines.min():.4f}, mean {cosines.mean():.4f}")
    # JPEG at quality 95 without chroma subsampling: far closer than any two photos of one person (~0.7-0.9).
    assert cosines.min() > 0.99


def test_chip_pixels_survive_the_jpeg_round_trip_closely() -> None:
    gradient = torch.linspace(0, 255, 160).repeat(3, 160, 1)
    back = chip_tensor(chip_jpeg(gradient))
    assert back.shape == (3, 160, 160) and back.dtype == torch.float32
    assert float((back - gradient.round()).abs().mean()) < 2.0
