"""Turn enrolment photos into embeddings, refusing photos that cannot say who they show."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serve_app.model.chips import chip_jpeg
from serve_app.model.detector import FaceDetector
from serve_app.model.embedder import Embedder
from serve_app.model.images import DEFAULT_MAX_PIXELS, DecodedImage, InvalidImageError, decode_image


@dataclass(frozen=True)
class EnrolmentPhoto:
    """One photo's outcome: an embedding to enrol (with the chip it was embedded from), or the reason it was
    refused."""

    label: str
    embedding: np.ndarray | None
    refused: str | None
    #: The aligned face crop that was embedded, as JPEG (see :mod:`serve_app.model.chips`).
    chip: bytes | None = None
    #: The embedding's model (a model change rolls replicas over one by one: the writer must know which).
    model_id: str = ""


def embed_for_enrolment(
    detector: FaceDetector,
    embedder: Embedder,
    photos: Sequence[tuple[str, bytes]],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[EnrolmentPhoto]:
    """Exactly one face per photo: with none, or with several, nobody can tell which face the name belongs to.
    Photos over ``max_pixels`` are refused like any unusable upload."""
    outcomes: dict[int, EnrolmentPhoto] = {}
    decoded: list[tuple[int, DecodedImage]] = []
    for position, (label, payload) in enumerate(photos):
        try:
            decoded.append((position, decode_image(payload, max_pixels=max_pixels)))
        except InvalidImageError as exc:
            outcomes[position] = EnrolmentPhoto(label, None, f"not a usable image: {exc}")
    detections = detector.detect_all([image for _, image in decoded])
    accepted = []
    for (position, image), found in zip(decoded, detections, strict=True):
        label = photos[position][0]
        # One confident face; or none, and then the best weaker candidate (a profile, a small or blurred face):
        # the photo is meant to show one person, so that candidate is the person.
        subject = found.subject()
        if len(found.faces) > 1:
            outcomes[position] = EnrolmentPhoto(
                label, None, f"{len(found.faces)} faces found; enrol photos of one face"
            )
        elif subject is None:
            outcomes[position] = EnrolmentPhoto(label, None, "no face found")
        else:
            accepted.append((position, detector.crops(image, [subject])))
    if accepted:
        import torch

        crops = torch.cat([crop for _, crop in accepted])
        vectors = embedder.embed(crops)
        for (position, _), vector, crop in zip(accepted, vectors, crops, strict=True):
            outcomes[position] = EnrolmentPhoto(
                photos[position][0], vector, None, chip_jpeg(crop), model_id=embedder.model_id
            )
    return [outcomes[i] for i in range(len(photos))]
