"""Plain-JSON views of recognition results, shared by the CLI and the HTTP API."""

from __future__ import annotations

from typing import Any

from serve_app.model.detector import DetectedFace
from serve_app.model.match_threshold import MatchThreshold
from serve_app.model.recognizer import ImageResult, RecognizedFace


def _round(value: float, places: int = 2) -> float:
    return round(float(value), places)


def detection_to_dict(face: DetectedFace) -> dict[str, Any]:
    return {
        "box": [_round(v) for v in face.box],
        "detection_score": _round(face.probability, 5),
        "landmarks": [[_round(x), _round(y)] for x, y in face.landmarks],
    }


def face_to_dict(face: RecognizedFace) -> dict[str, Any]:
    return {
        **detection_to_dict(face.detection),
        "name": face.name,
        "similarity": _round(face.similarity, 4),
        "margin": _round(face.margin, 4),
        "candidates": [
            {"name": c.name, "similarity": _round(c.similarity, 4), "face_id": c.face_id} for c in face.candidates
        ],
    }


def threshold_to_dict(threshold: MatchThreshold) -> dict[str, Any]:
    """Which similarity named a face and why: ``fixed``, ``false_accept_rate`` (for this many people), ``request``."""
    return {
        "value": _round(threshold.value, 4),
        "source": threshold.source,
        "false_accept_rate": threshold.false_accept_rate,
        "gallery_people": threshold.gallery_people,
        "min_margin": threshold.min_margin,
    }


def image_result_to_dict(result: ImageResult) -> dict[str, Any]:
    timings = result.timings
    return {
        "width": result.width,
        "height": result.height,
        "model_id": result.model_id,
        "main_face": result.main_face,
        "name": result.main_name,
        "faces": [face_to_dict(face) for face in result.faces],
        # No face reached the detection threshold: the weaker candidate that "name" comes from (else null).
        "best_guess": None if result.best_guess is None else face_to_dict(result.best_guess),
        "threshold": None if result.threshold is None else threshold_to_dict(result.threshold),
        "timings_ms": {
            "decode": _round(timings.decode_ms),
            "detect": _round(timings.detect_ms),
            "embed": _round(timings.embed_ms),
            "match": _round(timings.match_ms),
            "batch_size": timings.batch_size,
        },
    }
