"""Build the detector and embedder from plain settings (no serving framework involved)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.model.checkpoints import resolve_checkpoint
from serve_app.model.detector import DetectorConfig, FaceDetector
from serve_app.model.embedder import Embedder, Precision


@dataclass(frozen=True)
class Models:
    detector: FaceDetector
    embedder: Embedder
    threshold: float


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
) -> Models:
    """Load MTCNN and the named embedding checkpoint once; ``threshold`` defaults to the checkpoint's own."""
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    resolved = resolve_checkpoint(checkpoint, threshold)
    detector = FaceDetector(detector_config, device=device)
    embedder = Embedder(resolved, max_batch=max_embed_batch, flip=flip, device=device, precision=embed_precision)
    return Models(detector, embedder, resolved.threshold_for(flip) if threshold is None else threshold)
