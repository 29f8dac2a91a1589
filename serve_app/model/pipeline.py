"""Build the detector, embedder and match rule from the recognition settings (no serving framework involved)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from serve_app.model.detector import FaceDetector
from serve_app.model.embedder import Embedder
from serve_app.model.match_threshold import ThresholdRule, threshold_rule

if TYPE_CHECKING:
    from serve_app.settings import RecognitionConfig


@dataclass(frozen=True)
class Models:
    detector: FaceDetector
    embedder: Embedder
    #: The checkpoint's verification threshold (one photo against one other), or the configured one.
    threshold: float
    #: What names a face against the gallery: :attr:`threshold`, or one derived from a false-accept rate.
    threshold_rule: ThresholdRule


def load_models(
    settings: RecognitionConfig, *, torch_threads: int | None = None, device: torch.device | None = None
) -> Models:
    """Load MTCNN and the settings' embedding checkpoint once, with the match rule the settings ask for.

    With ``false_accept_rate`` (and no ``threshold``), gallery matches use a threshold derived from the
    checkpoint's shipped impostor calibration and the gallery's size (:mod:`serve_app.model.match_threshold`).
    """
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    resolved = settings.resolved_checkpoint()
    detector = FaceDetector(settings.detector_config(), device=device)
    embedder = Embedder(
        resolved,
        max_batch=settings.max_embed_batch,
        flip=settings.flip,
        device=device,
        precision=settings.embed_precision,
    )
    fixed = settings.verification_threshold
    rule = threshold_rule(
        fixed=fixed,
        false_accept_rate=settings.false_accept_rate if settings.threshold is None else None,
        checkpoint=resolved.name,
        flip=settings.flip,
        model_id=embedder.model_id,
        min_margin=settings.min_margin,
    )
    return Models(detector, embedder, fixed, rule)
