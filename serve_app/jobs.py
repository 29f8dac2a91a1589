"""Work items the ingress (and the SQS bridge) send to Recognizer replicas, and what comes back.

Plain dataclasses, no Ray: they cross process boundaries pickled, and the batch logic that consumes them
(:func:`run_jobs`) is tested without a cluster. Each job carries raw image bytes; decoding happens in the
replica so that a bad upload costs the ingress nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from serve_app.model.enrollment import embed_for_enrolment
from serve_app.model.images import DecodedImage, InvalidImageError, decode_timed
from serve_app.model.recognizer import Recognizer, embed_main_faces
from serve_app.results import detection_to_dict, image_result_to_dict


@dataclass(frozen=True)
class RecognizeJob:
    """Every face in a photo, named. ``threshold``/``top_k`` of ``None`` mean the service defaults."""

    image: bytes
    threshold: float | None = None
    top_k: int | None = None
    #: Read-your-writes: the replica refreshes its gallery first if it is older than this revision.
    min_revision: int = 0


@dataclass(frozen=True)
class DetectJob:
    """Faces only: boxes, scores, landmarks."""

    image: bytes


@dataclass(frozen=True)
class EmbedJob:
    """The main face's embedding (for verify)."""

    image: bytes


@dataclass(frozen=True)
class EnrolJob:
    """Embeddings for enrolment: exactly one face per photo, or the reason a photo is refused."""

    photos: tuple[tuple[str, bytes], ...]


Job = RecognizeJob | DetectJob | EmbedJob | EnrolJob


@dataclass(frozen=True)
class JobError:
    """A job that failed because of its input. ``reason`` is :attr:`InvalidImageError.reason`."""

    reason: str
    message: str


def run_jobs(recognizer: Recognizer, jobs: Sequence[Job]) -> list[Any]:
    """Run a mixed batch: jobs of one kind (and settings) share one detector pass and one embedder pass. Every
    upload is decoded within ``recognizer.max_pixels``.

    Returns, per job: a JSON-ready ``dict`` (recognize, detect), an embedding ``np.ndarray`` or ``None``
    (embed), a list of per-photo dicts (enrol), or a :class:`JobError`.
    """
    out: list[Any] = [None] * len(jobs)
    # Recognitions with different thresholds or top-k cannot share one matching step.
    recognitions: dict[tuple[float | None, int | None], list[int]] = defaultdict(list)
    detections: list[tuple[int, DecodedImage]] = []
    embeddings: list[tuple[int, DecodedImage]] = []
    for position, job in enumerate(jobs):
        if isinstance(job, RecognizeJob):
            recognitions[(job.threshold, job.top_k)].append(position)
        elif isinstance(job, DetectJob | EmbedJob):
            image, _ = decode_timed(job.image, max_pixels=recognizer.max_pixels)
            if isinstance(image, InvalidImageError):
                out[position] = JobError(image.reason, str(image))
            else:
                (detections if isinstance(job, DetectJob) else embeddings).append((position, image))

    for (threshold, top_k), positions in recognitions.items():
        payloads = [cast(RecognizeJob, jobs[p]).image for p in positions]
        for position, result in zip(
            positions, recognizer.recognize_bytes(payloads, threshold=threshold, top_k=top_k), strict=True
        ):
            out[position] = (
                JobError(result.reason, str(result))
                if isinstance(result, InvalidImageError)
                else image_result_to_dict(result)
            )
    if detections:
        images = [image for _, image in detections]
        for (position, image), faces in zip(detections, recognizer.detector.detect(images), strict=True):
            out[position] = {
                "width": image.width,
                "height": image.height,
                "faces": [detection_to_dict(face) for face in faces],
            }
    if embeddings:
        vectors = embed_main_faces(recognizer.detector, recognizer.embedder, [image for _, image in embeddings])
        for (position, _), vector in zip(embeddings, vectors, strict=True):
            out[position] = vector
    for position, job in enumerate(jobs):
        if isinstance(job, EnrolJob):
            outcomes = embed_for_enrolment(
                recognizer.detector, recognizer.embedder, job.photos, max_pixels=recognizer.max_pixels
            )
            out[position] = [{"photo": o.label, "embedding": o.embedding, "refused": o.refused} for o in outcomes]
    return out
