"""Recognition: decode -> detect -> extract -> embed -> match, for a batch of photos at once.

Batching happens where it pays: every face of every photo in the batch goes through the embedder together and
every embedding is matched with one matrix product.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from serve_app.model.detector import DetectedFace, FaceDetections, FaceDetector
from serve_app.model.embedder import Embedder
from serve_app.model.gallery import Candidate, Gallery
from serve_app.model.gallery_index import DEFAULT_INDEX_POLICY, IndexPolicy, build_index
from serve_app.model.images import DEFAULT_MAX_PIXELS, DecodedImage, InvalidImageError, decode_timed
from serve_app.model.match_threshold import MatchThreshold, ThresholdRule


@dataclass(frozen=True)
class RecognizedFace:
    """One face of a photo and who it is."""

    detection: DetectedFace
    #: The enrolled person, or ``None`` when nobody reaches the threshold (unknown).
    name: str | None
    similarity: float
    margin: float
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds per stage. ``decode`` is this photo's own; the others are for the whole batch it rode in."""

    decode_ms: float
    detect_ms: float
    embed_ms: float
    match_ms: float
    batch_size: int


@dataclass(frozen=True)
class ImageResult:
    """Every face found in one photo (most probable first) and which one is the photo's main face."""

    width: int
    height: int
    faces: tuple[RecognizedFace, ...]
    main_face: int | None
    model_id: str
    timings: StageTimings
    #: Where no face reaches the detection threshold: the best weaker candidate (a profile, a blurred or
    #: partly hidden face), named, for the photo's single answer. Never part of :attr:`faces`.
    best_guess: RecognizedFace | None = None
    #: The similarity a face needed to be named, and why (fixed, derived from a false-accept rate, or asked for).
    threshold: MatchThreshold | None = None

    @property
    def main_name(self) -> str | None:
        """The legacy single answer: the main face's name (or the best guess's), ``None`` if unknown or no face."""
        if self.main_face is not None:
            return self.faces[self.main_face].name
        return None if self.best_guess is None else self.best_guess.name


@dataclass
class _Timer:
    totals: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> float:
        now = time.perf_counter()
        self.totals[stage] = self.totals.get(stage, 0.0) + (now - started) * 1000.0
        return now


class Recognizer:
    """Owns a detector, an embedder and a gallery. Thread-safety is the caller's concern."""

    def __init__(
        self,
        detector: FaceDetector,
        embedder: Embedder,
        gallery: Gallery,
        *,
        threshold: float | ThresholdRule,
        top_k: int = 3,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        index_policy: IndexPolicy | None = DEFAULT_INDEX_POLICY,
    ) -> None:
        if gallery.model_id != embedder.model_id:
            raise ValueError(f"gallery model {gallery.model_id!r} != embedder model {embedder.model_id!r}")
        self.detector = detector
        self.embedder = embedder
        self.threshold_rule = threshold if isinstance(threshold, ThresholdRule) else ThresholdRule(threshold)
        #: Held while matching, and by whoever changes the gallery in place (a replica applying stored changes).
        self.gallery_lock = threading.Lock()
        self.index_policy = index_policy
        self._indexing: threading.Thread | None = None
        self.gallery = gallery
        self.top_k = top_k
        #: Uploads over this many pixels are refused before decoding (``AppArgs.max_pixels`` in the service).
        self.max_pixels = max_pixels

    @property
    def gallery(self) -> Gallery:
        return self._gallery

    @gallery.setter
    def gallery(self, gallery: Gallery) -> None:
        # One assignment swaps the gallery and its threshold together: a false-accept-rate threshold follows the
        # number of people enrolled.
        self._gallery, self._match_threshold = gallery, self.threshold_rule.for_gallery(gallery.person_count())
        self._index_if_due()

    def gallery_changed(self) -> None:
        """The gallery was changed in place (under :attr:`gallery_lock`): its threshold follows it."""
        self._match_threshold = self.threshold_rule.for_gallery(self._gallery.person_count())
        self._index_if_due()

    def _index_if_due(self) -> None:
        """Build an approximate index for a large gallery in the background (:mod:`serve_app.model.gallery_index`):
        matching stays exact until it is complete. ``index_policy=None``: never."""
        policy = self.index_policy
        if policy is None or not self._gallery.index_due(policy):
            return
        if self._indexing is not None and self._indexing.is_alive():
            return  # the running build looks again when it ends
        self._indexing = threading.Thread(target=self._build_indexes, args=(policy,), name="gallery-index", daemon=True)
        self._indexing.start()

    def _build_indexes(self, policy: IndexPolicy) -> None:
        # Until the gallery served is indexed or needs none (it may be replaced by a fresh copy meanwhile).
        while True:
            gallery = self._gallery
            build_index(gallery, self.gallery_lock, policy)
            if gallery is self._gallery or not self._gallery.index_due(policy):
                return

    def wait_for_index(self, timeout: float | None = None) -> None:
        """Wait until a running index build ends (tests and benchmarks)."""
        if self._indexing is not None:
            self._indexing.join(timeout)

    @property
    def match_threshold(self) -> MatchThreshold:
        """The threshold answers use now (for this gallery), and why."""
        return self._match_threshold

    @property
    def threshold(self) -> float:
        return self._match_threshold.value

    def recognize_bytes(
        self, payloads: Sequence[bytes], *, threshold: float | None = None, top_k: int | None = None
    ) -> list[ImageResult | InvalidImageError]:
        """Decode (within :attr:`max_pixels`, timed) and recognise: the one way from uploaded bytes to answers,
        for the service, the queue bridge and the command line alike. A bad upload yields its
        :class:`InvalidImageError` in place, not a failed batch."""
        decoded = [decode_timed(payload, max_pixels=self.max_pixels) for payload in payloads]
        good = [(image, ms) for image, ms in decoded if isinstance(image, DecodedImage)]
        results = iter(
            self.recognize([i for i, _ in good], threshold=threshold, top_k=top_k, decode_ms=[ms for _, ms in good])
        )
        return [image if isinstance(image, InvalidImageError) else next(results) for image, _ in decoded]

    def recognize(
        self,
        images: Sequence[DecodedImage],
        *,
        threshold: float | None = None,
        top_k: int | None = None,
        decode_ms: Sequence[float] | None = None,
    ) -> list[ImageResult]:
        """Every face in every image, named against the gallery."""
        gallery, used = self._gallery, self._match_threshold  # one consistent pair even if a refresh swaps them
        if threshold is not None:
            used = MatchThreshold(threshold, "request", min_margin=used.min_margin)
        top_k = self.top_k if top_k is None else top_k
        timer = _Timer()
        started = time.perf_counter()
        found = self.detector.detect_all(images)
        # What gets embedded per photo: every confident face, or the best weak candidate where there is none.
        embedded = [_faces_to_embed(f) for f in found]
        started = timer.add("detect", started)
        crops = [self.detector.crops(image, list(faces)) for image, faces in zip(images, embedded, strict=True)]
        embeddings = self.embedder.embed(torch.cat(crops)) if crops else np.empty((0, self.embedder.dim))
        started = timer.add("embed", started)
        with self.gallery_lock:
            matches = gallery.match(embeddings, threshold=used.value, top_k=top_k, min_margin=used.min_margin)
        timer.add("match", started)

        results = []
        offset = 0
        for position, (image, detections, faces) in enumerate(zip(images, found, embedded, strict=True)):
            recognized = tuple(
                RecognizedFace(face, m.name, m.similarity, m.margin, m.candidates)
                for face, m in zip(faces, matches[offset : offset + len(faces)], strict=True)
            )
            offset += len(faces)
            timings = StageTimings(
                decode_ms=decode_ms[position] if decode_ms is not None else 0.0,
                detect_ms=timer.totals.get("detect", 0.0),
                embed_ms=timer.totals.get("embed", 0.0),
                match_ms=timer.totals.get("match", 0.0),
                batch_size=len(images),
            )
            confident = bool(detections.faces)
            results.append(
                ImageResult(
                    width=image.width,
                    height=image.height,
                    faces=recognized if confident else (),
                    main_face=detections.main_face,
                    model_id=self.embedder.model_id,
                    timings=timings,
                    best_guess=None if confident or not recognized else recognized[0],
                    threshold=used,
                )
            )
        return results


def _faces_to_embed(found: FaceDetections) -> tuple[DetectedFace, ...]:
    """Every confident face of a photo; where there is none, its best weak candidate (for the single answer)."""
    if found.faces:
        return found.faces
    subject = found.subject()
    return () if subject is None else (subject,)


def embed_main_faces(
    detector: FaceDetector, embedder: Embedder, images: Sequence[DecodedImage]
) -> list[np.ndarray | None]:
    """Each photo's subject embedded (``None`` where no face is found): for verify, enrol and LFW.

    The subject is the main confident face, or the best weaker candidate (see ``FaceDetections.subject``).
    """
    subjects = [found.subject() for found in detector.detect_all(images)]
    crops = [detector.crops(image, [face]) for image, face in zip(images, subjects, strict=True) if face is not None]
    out: list[np.ndarray | None] = [None] * len(images)
    if crops:
        vectors = iter(embedder.embed(torch.cat(crops)))
        out = [None if face is None else next(vectors) for face in subjects]
    return out
