"""Build the detector and embedder from plain settings (no serving framework involved)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.model.checkpoints import resolve_checkpoint
from serve_app.model.detector import DetectorConfig, FaceDetector
from serve_app.model.embedder import Embedder, Precision
from serve_app.model.match_threshold import ThresholdRule, threshold_rule


@dataclass(frozen=True)
class Models:
    detector: FaceDetector
    embedder: Embedder
    #: The checkpoint's verification threshold (one photo against one other), or the configured one.
    threshold: float
    #: What names a face against the gallery: :attr:`threshold`, or one derived from a false-accept rate.
    threshold_rule: ThresholdRule


def load_models(
    checkpoint: str,
    *,
    detector_config: DetectorConfig | None = None,
    flip: bool = False,
    max_embed_batch: int = 32,
    threshold: float | None = None,
    torch_threads: int | None = None,
    device: torch.device | None = None,
    embed_precision: Precision = "auto",
    false_accept_rate: float | None = None,
    min_margin: float = 0.0,
) -> Models:
    """Load MTCNN and the named embedding checkpoint once; ``threshold`` defaults to the checkpoint's own.

    With ``false_accept_rate`` (and no ``threshold``), gallery matches use a threshold derived from the
    checkpoint's shipped impostor calibration and the gallery's size (:mod:`serve_app.model.match_threshold`).
    """
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    resolved = resolve_checkpoint(checkpoint, threshold)
    detector = FaceDetector(detector_config, device=device)
    embedder = Embedder(resolved, max_batch=max_embed_batch, flip=flip, device=device, precision=embed_precision)
    fixed = resolved.threshold_for(flip) if threshold is None else threshold
    rule = threshold_rule(
        fixed=fixed,
        false_accept_rate=false_accept_rate if threshold is None else None,
        checkpoint=resolved.name,
        flip=flip,
        model_id=embedder.model_id,
        min_margin=min_margin,
    )
    return Models(detector, embedder, fixed, rule)
