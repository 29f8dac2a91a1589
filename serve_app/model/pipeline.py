"""The loaded models: detector, embedder and match rule (built from the settings by
:func:`serve_app.settings.load_models`; this module knows nothing of the settings, which sit above it)."""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.model.detector import FaceDetector
from serve_app.model.embedder import Embedder
from serve_app.model.match_threshold import ThresholdRule


@dataclass(frozen=True)
class Models:
    detector: FaceDetector
    embedder: Embedder
    #: The checkpoint's verification threshold (one photo against one other), or the configured one.
    threshold: float
    #: What names a face against the gallery: :attr:`threshold`, or one derived from a false-accept rate.
    threshold_rule: ThresholdRule
