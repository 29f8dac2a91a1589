"""The Recognizer deployment: owns the models and a read-only copy of the shared gallery, batches requests.

Concurrent requests (HTTP and queue alike) are gathered by a :class:`~serve_app.deployments.batching.Batcher`
and run as one batch on a worker thread, so the event loop keeps accepting requests while torch computes.
The gallery copy follows the store (this model's snapshot and the changes after it, see
:mod:`serve_app.gallery_journal`): a background task looks for the next change every ``gallery_refresh_s`` seconds,
and each batch of recognitions first learns which revision the GalleryWriter last stored and applies the changes
up to it if that is newer (read-your-writes after an enrolment, whichever replica made it). A change is applied in
place, costing what it changes; the snapshot is read whole only at start and when a replica fell so far behind
that the changes it needs were cleaned up after a newer snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from serve_app.deployments.batching import Batcher
from serve_app.deployments.revision_watch import UNKNOWN_REVISION
from serve_app.deployments.supervision import BackgroundTasks, Supervised
from serve_app.gallery_journal import behind_the_base, load_gallery, read_changes
from serve_app.gallery_store import GalleryStore, GalleryStoreError, open_gallery_store
from serve_app.jobs import (
    Detections,
    DetectJob,
    EmbedJob,
    EnrolJob,
    Job,
    JobError,
    JobResult,
    RecognizeJob,
    run_jobs_isolated,
)
from serve_app.metrics import metrics
from serve_app.model.enrollment import EnrolmentPhoto
from serve_app.model.gallery import Gallery, GalleryError
from serve_app.model.gallery_change import GalleryChange, apply_change
from serve_app.model.gallery_rows import REPLICA_HALF_ROWS_FROM
from serve_app.model.recognizer import ImageResult, Recognizer
from serve_app.results import threshold_to_dict
from serve_app.settings import RecognitionConfig

log = logging.getLogger(f"ray.serve.{__name__}")

#: How long a batch waits for a newer gallery it was asked for before answering from the one it has.
FORCED_REFRESH_TIMEOUT_S = 5.0
#: How long a batch waits for the GalleryWriter to say which revision it last wrote (when its watch is not current).
WRITER_REVISION_TIMEOUT_S = 1.0
#: How long one long poll of the writer's revision lasts before it is made again.
REVISION_WATCH_S = 30.0


@dataclass(frozen=True)
class RecognizerOptions:
    """What a Recognizer replica is built from (the application's settings, resolved for this machine)."""

    recognition: RecognitionConfig
    gallery_uri: str
    gallery_endpoint: str | None
    gallery_refresh_s: float
    max_batch_size: int
    batch_wait_timeout_s: float
    max_pixels: int
    torch_threads: int


class RecognizerDeployment(Supervised):
    """Serve wrapper around :class:`serve_app.model.recognizer.Recognizer`. Deployed by :mod:`serve_app.app`."""

    def __init__(self, options: RecognizerOptions, writer: DeploymentHandle[Any] | None = None) -> None:
        # Size torch to this replica's CPU share: more threads than reserved cores only contend with neighbours.
        torch.set_num_threads(max(1, options.torch_threads))
        recognition = options.recognition
        models = recognition.load_models()
        self._model_id = models.embedder.model_id
        # This model's snapshot only: during a model change replicas of two models serve side by side, each
        # matching against the gallery its own model embedded.
        self._store: GalleryStore = open_gallery_store(
            options.gallery_uri, options.gallery_endpoint, model_id=self._model_id
        )
        self._writer = writer
        gallery = self._read_gallery() or Gallery(
            models.embedder.model_id, models.embedder.dim, half_rows_from=REPLICA_HALF_ROWS_FROM
        )
        self._recognizer = Recognizer(
            models.detector,
            models.embedder,
            gallery,
            threshold=models.threshold_rule,
            top_k=recognition.top_k,
            max_pixels=options.max_pixels,
        )
        self._refresh_s = options.gallery_refresh_s
        self._forced_refresh_failed_at = -1e9
        self._writer_failed_at = -1e9
        self._refresh_lock = asyncio.Lock()
        self._batcher: Batcher[Job, JobResult] = Batcher(
            self._run_batch, options.max_batch_size, options.batch_wait_timeout_s
        )
        self._metrics = metrics()
        self._publish_gallery_metrics()
        self._background = BackgroundTasks()
        self._background.start("batching", self._batcher.serve_forever())
        self._background.start("gallery refresh", self._poll_gallery())
        self._known_revision, self._watch_current = 0, False
        if writer is not None:
            self._background.start("gallery revision watch", self._watch_revisions())
        log.info("Recognizer ready: %s, gallery %s (%d faces)", self._model_id, self._store.describe(), len(gallery))

    # --- gallery following --------------------------------------------------------------------------------
    def _read_gallery(self) -> Gallery | None:
        """The store's gallery: the snapshot and every change after it (``None``: nothing stored yet)."""
        return load_gallery(self._store, self._model_id, half_rows_from=REPLICA_HALF_ROWS_FROM)

    async def _refresh(self, until: int | None = None) -> None:
        """Apply the changes stored since this replica's revision (up to ``until`` when the writer said how far it
        is: fetched in parallel); read the snapshot again only when the changes it needs were compacted away."""
        async with self._refresh_lock:
            gallery = self._recognizer.gallery
            changes = await asyncio.to_thread(read_changes, self._store, gallery.revision, until)
            if changes:
                await asyncio.to_thread(self._apply, gallery, changes)
                self._publish_gallery_metrics()
                log.info("gallery at revision %d: %d changes applied", gallery.revision, len(changes))
                return
            if not await asyncio.to_thread(behind_the_base, self._store, gallery.revision):
                return
            fresh = await asyncio.to_thread(self._read_gallery)
            if fresh is not None and fresh.revision > gallery.revision:
                self._recognizer.gallery = fresh  # one reference swap: a running batch keeps its old copy
                self._publish_gallery_metrics()
                log.info("gallery read again at revision %d (%d faces)", fresh.revision, len(fresh))

    def _apply(self, gallery: Gallery, changes: list[GalleryChange]) -> None:
        with self._recognizer.gallery_lock:  # not while a batch matches against it
            for change in changes:
                apply_change(gallery, change)
            self._recognizer.gallery_changed()

    async def _poll_gallery(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self._refresh()
            except (GalleryStoreError, GalleryError) as exc:
                # Keep serving the copy we have; the next poll tries again.
                self._metrics.gallery_refresh_failures.inc()
                log.warning("gallery refresh failed: %s", exc)

    def _publish_gallery_metrics(self) -> None:
        gallery = self._recognizer.gallery
        self._metrics.gallery_faces.set(len(gallery))
        self._metrics.gallery_people.set(gallery.person_count())
        self._metrics.gallery_revision.set(gallery.revision)

    # --- requests: one method per job kind; concurrent calls of every kind share one batch queue -----------
    async def recognize(self, job: RecognizeJob) -> ImageResult | JobError:
        """Every face in the photo, named against the gallery."""
        return cast(ImageResult | JobError, await self._batcher.submit(job))

    async def detect(self, job: DetectJob) -> Detections | JobError:
        """Faces only."""
        return cast(Detections | JobError, await self._batcher.submit(job))

    async def embed(self, job: EmbedJob) -> np.ndarray | JobError | None:
        """The main face's embedding (``None``: no face)."""
        return cast(np.ndarray | JobError | None, await self._batcher.submit(job))

    async def enrol(self, job: EnrolJob) -> list[EnrolmentPhoto]:
        """One embedding per photo, or the reason it is refused."""
        return cast(list[EnrolmentPhoto], await self._batcher.submit(job))

    async def _watch_revisions(self) -> None:
        """Follow the writer's revision by long polls, each call acknowledging the revision the last one returned
        (the writer answers a gallery change only once every watching replica has: read-your-writes)."""
        subscriber = serve.get_replica_context().replica_id.unique_id
        known = UNKNOWN_REVISION
        assert self._writer is not None
        while True:
            try:
                revision = int(
                    await self._writer.watch_revision.remote(subscriber, known, self._model_id, REVISION_WATCH_S)
                )
            except (RayError, RayServeException) as exc:
                # The writer is restarting: batches ask it directly until a watch call returns again.
                self._watch_current, known = False, UNKNOWN_REVISION
                log.warning("gallery revision watch failed, asking per batch meanwhile: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if revision == UNKNOWN_REVISION:  # the writer dropped this replica (it acknowledged too late)
                self._watch_current, known = False, UNKNOWN_REVISION
                continue
            self._known_revision, self._watch_current, known = revision, True, revision

    async def _newest_written_revision(self) -> int:
        """The gallery revision the GalleryWriter last wrote (0 when it cannot say within a moment).

        Needed before each batch of recognitions, so that a photo sent right after an enrolment answered is
        matched against a gallery that has it, whichever replica the enrolment went through: an answered enrolment
        is in the writer, and known to every replica that watches it, before its answer leaves. While this
        replica's watch is current that costs no call; otherwise the writer is asked.
        """
        if self._writer is None:
            return 0
        if self._watch_current:
            return self._known_revision
        if time.monotonic() - self._writer_failed_at < WRITER_REVISION_TIMEOUT_S * 5:
            return 0
        try:
            revision = self._writer.revision.remote(self._model_id)
            return int(await asyncio.wait_for(revision, WRITER_REVISION_TIMEOUT_S))
        except (TimeoutError, RayError, RayServeException) as exc:
            # The writer is restarting: the periodic refresh still brings the change within gallery_refresh_s.
            # Not asked again for a few seconds, so that batches do not each wait out the same timeout.
            self._writer_failed_at = time.monotonic()
            log.warning("could not ask the gallery writer for its revision: %s", exc)
            return 0

    async def _run_batch(self, jobs: list[Job]) -> list[JobResult]:
        recognitions = [j for j in jobs if isinstance(j, RecognizeJob)]
        newest = await self._newest_written_revision() if recognitions else 0
        store_was_away = time.monotonic() - self._forced_refresh_failed_at < FORCED_REFRESH_TIMEOUT_S * 2
        if newest > self._recognizer.gallery.revision and not store_was_away:
            try:
                await asyncio.wait_for(self._refresh(until=newest), FORCED_REFRESH_TIMEOUT_S)
            except (TimeoutError, GalleryStoreError, GalleryError) as exc:
                # Not again for a while: every batch would wait out the same timeout.
                self._forced_refresh_failed_at = time.monotonic()
                # The store is unreachable: answer from the snapshot we have rather than not at all.
                log.warning(
                    "could not fetch gallery revision %d, answering from %d: %s",
                    newest,
                    self._recognizer.gallery.revision,
                    exc,
                )
        started = time.perf_counter()
        results = await asyncio.to_thread(run_jobs_isolated, self._recognizer, jobs)
        self._metrics.batch_size.observe(len(jobs))
        self._record_stage_metrics(results, started)
        return results

    def _record_stage_metrics(self, results: list[JobResult], started: float) -> None:
        recognized = [result for result in results if isinstance(result, ImageResult)]
        for result in recognized:
            self._metrics.faces_per_image.observe(len(result.faces))
            self._metrics.stage_latency_ms.observe(result.timings.decode_ms, tags={"stage": "decode"})
        if recognized:  # detect/embed/match are per batch: record them once
            timings = recognized[0].timings
            for stage, value in (
                ("detect", timings.detect_ms),
                ("embed", timings.embed_ms),
                ("match", timings.match_ms),
            ):
                self._metrics.stage_latency_ms.observe(value, tags={"stage": stage})
        self._metrics.stage_latency_ms.observe((time.perf_counter() - started) * 1000.0, tags={"stage": "batch"})

    def info(self) -> dict[str, Any]:
        """Model and gallery facts for /healthz (a replica only answers once its models are loaded)."""
        gallery = self._recognizer.gallery
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "model_id": self._model_id,
            "threshold": threshold_to_dict(self._recognizer.match_threshold),
            "gallery_revision": gallery.revision,
            "gallery_faces": len(gallery),
            "gallery_people": gallery.person_count(),
        }
