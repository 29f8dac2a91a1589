"""Work items the ingress (and the SQS bridge) send to Recognizer replicas, and the typed results that come back.

Plain dataclasses, no Ray: they cross process boundaries pickled, and the batch logic that consumes them
(:func:`run_jobs`) is tested without a cluster. Each job carries raw image bytes; decoding happens in the
replica so that a bad upload costs the ingress nothing. Results stay typed (:class:`ImageResult`,
:class:`Detections`, an embedding, :class:`EnrolmentPhoto`) until the edge turns them into JSON.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from serve_app.model.detector import DetectedFace
from serve_app.model.enrollment import EnrolmentPhoto, embed_for_enrolment
from serve_app.model.images import DecodedImage, InvalidImageError, decode_timed
from serve_app.model.recognizer import ImageResult, Recognizer, embed_main_faces

log = logging.getLogger(f"ray.serve.{__name__}")


@dataclass(frozen=True)
class RecognizeJob:
    """Every face in a photo, named. ``threshold``/``top_k`` of ``None`` mean the service defaults."""

    image: bytes
    threshold: float | None = None
    top_k: int | None = None


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


@dataclass(frozen=True)
class Detections:
    """A :class:`DetectJob`'s answer: the photo's size and its confident faces."""

    width: int
    height: int
    faces: tuple[DetectedFace, ...]


#: What each job kind returns: recognize -> ImageResult, detect -> Detections, embed -> the main face's embedding
#: (None: no face), enrol -> one EnrolmentPhoto per photo; a JobError for an unusable upload.
JobResult = ImageResult | Detections | np.ndarray | None | list[EnrolmentPhoto] | JobError


def run_jobs(recognizer: Recognizer, jobs: Sequence[Job]) -> list[JobResult]:
    """Run a mixed batch: jobs of one kind (and settings) share one detector pass and one embedder pass. Every
    upload is decoded within ``recognizer.max_pixels``. One result per job, in order (see :data:`JobResult`).
    """
    out: list[JobResult] = [None] * len(jobs)
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
            out[position] = JobError(result.reason, str(result)) if isinstance(result, InvalidImageError) else result
    if detections:
        images = [image for _, image in detections]
        for (position, image), faces in zip(detections, recognizer.detector.detect(images), strict=True):
            out[position] = Detections(image.width, image.height, tuple(faces))
    if embeddings:
        vectors = embed_main_faces(recognizer.detector, recognizer.embedder, [image for _, image in embeddings])
        for (position, _), vector in zip(embeddings, vectors, strict=True):
            out[position] = vector
    for position, job in enumerate(jobs):
        if isinstance(job, EnrolJob):
            out[position] = embed_for_enrolment(
                recognizer.detector, recognizer.embedder, job.photos, max_pixels=recognizer.max_pixels
            )
    return out


def run_jobs_isolated(recognizer: Recognizer, jobs: Sequence[Job]) -> list[JobResult]:
    """:func:`run_jobs`, but a job whose input hits a bug fails alone (``unprocessable``), not its whole batch.

    The batch runs as one first; only if that raises are its jobs run one at a time to find the culprit, so the
    other callers (other users' requests that happened to share the batch) still get their answers. A failure
    that is not about one input (every job fails on its own too, or the batch was a single job) is raised: it is
    the service's fault, and the caller must not be told its photo is bad.
    """
    try:
        return run_jobs(recognizer, jobs)
    except Exception:
        if len(jobs) == 1:
            raise
        log.exception("a batch of %d failed; running its jobs one at a time", len(jobs))
    results: list[JobResult] = []
    failures: list[Exception] = []
    for job in jobs:
        try:
            results.append(run_jobs(recognizer, [job])[0])
        except Exception as error:
            log.exception("a %s failed on its own", type(job).__name__)
            failures.append(error)
            results.append(JobError("unprocessable", "the photo could not be processed"))
    if len(failures) == len(jobs):
        raise failures[0]
    return results
