"""The GalleryWriter deployment: the single writer of the shared gallery.

Every change (enrol, remove) goes through this one replica. Changes that arrive together are staged together and
stored as one change object of the next revision (a group commit: see :mod:`serve_app.model.gallery_change`),
so a change costs what it changes, not the gallery, and concurrent enrolments share one write. The change object
of a revision can be stored only once (a conditional write), so a second writer (a restart, a model switch) that
staged the same revision learns it lost, takes the other's change, and stages its own again on top: no writer
overwrites another's change. After enough changes the writer compacts: it writes its gallery as the new base
snapshot and cleans up the changes that base holds (recognition never waits for that). Recognizer replicas only
ever read the store, applying each change they have not seen.

The writer owns its model's snapshot (a store keeps one per model, see :mod:`serve_app.gallery_store`). A model
change (``recognition.checkpoint`` in the config, then ``serve deploy``) starts a writer of the new model while the
old one still runs, and Recognizer replicas of both models serve for a while. So a writer also:

* follows every other model's snapshot (each ``sync_period_s``) and carries what changed there over to its own
  (enrolments embedded again from their chips, removals), so an enrolment made through the old model during the
  switch reaches the new one, and a rollback's snapshot catches up with what happened since the switch;
* accepts an enrolment embedded by a replica of another model when it comes with its chips, by embedding the
  chips with its own model; without chips it refuses it (``ModelMismatchError``: the ingress answers 503
  ``model_switching``), never storing embeddings of one model in another's snapshot;
* re-embeds its snapshot into another model's on request (:meth:`reembed`, ``POST /v1/gallery/reembed``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from serve_app.deployments.revision_watch import RevisionWatchers
from serve_app.deployments.supervision import BackgroundTasks, Supervised
from serve_app.gallery_erasure import changes_adding, erase_elsewhere
from serve_app.gallery_journal import behind_the_base, load_gallery, read_changes
from serve_app.gallery_store import GalleryStore, GalleryStoreError, open_gallery_store
from serve_app.metrics import metrics
from serve_app.model.embedder import Embedder
from serve_app.model.gallery import Gallery, GalleryError, ModelMismatchError
from serve_app.model.gallery_change import GalleryChange, StagedChange, apply_change
from serve_app.model.reembedding import CarryOverReport, EmbedChips, carry_over, chip_embedder, plan_carry_over
from serve_app.settings import RecognitionConfig
from serve_app.snapshot_reembed import faces_to_embed, reembed_snapshot

log = logging.getLogger(f"ray.serve.{__name__}")

T = TypeVar("T")

#: Faces carried over per turn of the lock (about 5 s of embedding here): an enrolment waits at most that long
#: behind a long catch-up, and each turn stores one change.
CARRY_OVER_CHUNK = 512
#: Requests staged into one change at most (the rest wait for the next commit, a moment later).
MAX_GROUP = 256
#: Times a commit is staged again after another writer stored its revision first.
COMMIT_ATTEMPTS = 8
#: A new base snapshot once this many changes were stored since the last (or their bytes reach a quarter of the
#: base's): a replica that joins reads the base and at most about this many small changes.
COMPACT_AFTER_CHANGES = 1000
#: Changes kept after a compaction, for replicas part-way through reading them (older ones read the new base).
RETAINED_CHANGES = 256
#: Seconds before an erasure that failed (the store unreachable) is tried again.
ERASURE_RETRY_S = 10.0


@dataclass
class SnapshotStatus:
    """What the writer knows of one model's snapshot."""

    model_id: str
    faces: int
    people: int
    revision: int
    #: This writer's own model (the one enrolments go to).
    active: bool = False


@dataclass
class ReembedProgress:
    target_model: str
    total: int
    done: int = 0
    state: str = "running"  # running, done, failed
    report: dict[str, object] | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)


@dataclass
class _Request:
    """One change waiting for the next commit, and what to do around the write (chips)."""

    change: Callable[[StagedChange], Any]
    before_store: Callable[[Any], None] | None
    after_store: Callable[[Any], None] | None
    answer: asyncio.Future[tuple[Any, int]]


def _settle(
    answer: asyncio.Future[tuple[Any, int]], result: tuple[Any, int] | None = None, error: Exception | None = None
) -> None:
    """Answer a request, unless it was answered already or its caller went away (the change stands either way)."""
    if answer.done():
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)  # type: ignore[arg-type]


def _apply_in_order(gallery: Gallery, changes: list[GalleryChange]) -> None:
    """Apply the changes that follow ``gallery``'s revision (another reader of it may have applied some already)."""
    for change in changes:
        if change.revision == gallery.revision + 1:
            apply_change(gallery, change)


class WriterLostRaceError(GalleryStoreError):
    """Another writer stored every revision this one staged, COMMIT_ATTEMPTS times running."""


class GalleryWriterDeployment(Supervised):
    def __init__(
        self,
        gallery_uri: str,
        recognition: RecognitionConfig,
        gallery_endpoint: str | None = None,
        sync_period_s: float = 5.0,
    ) -> None:
        torch.set_num_threads(1)  # a background helper: it must not take the Recognizers' cores
        self._recognition = recognition
        checkpoint = recognition.resolved_checkpoint()
        self._model_id = recognition.model_id
        self._dim = checkpoint.dim
        self._uri, self._endpoint = gallery_uri, gallery_endpoint
        self._store: GalleryStore = open_gallery_store(gallery_uri, gallery_endpoint, model_id=self._model_id)
        #: Held while the gallery in memory changes (a commit applying, a catch-up) or must not (a compaction
        #: serialising it, a carry-over planning against it).
        self._lock = asyncio.Lock()
        self._gallery = self._load()
        self._waiting: list[_Request] = []
        self._arrived = asyncio.Event()
        self._stored_since_base = 0
        self._compacting: asyncio.Task[int] | None = None
        #: Held while a base is written (a compaction, an erasure's): one at a time, so that an older base never
        #: lands after a newer one, which could still hold a face that was erased.
        self._base_lock = asyncio.Lock()
        self._embedder: Embedder | None = None
        self._embedder_lock = asyncio.Lock()
        self._followed: dict[str, str] = {}  # other model -> the snapshot token last carried over
        self._others: dict[str, SnapshotStatus] = {}
        self._other_galleries: dict[str, Gallery] = {}  # other model -> its gallery as last followed
        self._reembedding: ReembedProgress | None = None
        self._reembed_starting = asyncio.Lock()
        # Erasure (serve_app/gallery_erasure.py): ids removed and not yet erased from every stored object with the
        # names of the erasure records that name them (the store's, so a writer that starts finishes them),
        # the task erasing them, and ids erased while a re-embedding ran (it may have embedded them before: erased
        # again once it ends).
        self._to_erase: set[str] = set()
        self._owed: set[str] = set()
        self._resuming: asyncio.Task[None] | None = None
        self._erasing: asyncio.Task[None] | None = None
        self._erased_while_reembedding: set[str] = set()
        self._reembed_task: asyncio.Task[None] | None = None
        self._added_by_revision: dict[int, frozenset[str]] = {}  # the faces each stored change adds, as known
        self._sync_period_s = sync_period_s
        # Recognizer replicas learn each new revision from here before a change is answered (read-your-writes
        # without a call per batch: see serve_app/deployments/revision_watch.py).
        self._watchers = RevisionWatchers(self.revision)
        metrics().gallery_faces.set(len(self._gallery))
        self._background = BackgroundTasks()
        self._background.start("other models' snapshots", self._follow_other_models())
        self._background.start("group commits", self._commit_forever())
        # Erasures an earlier writer recorded and did not finish: listed before this writer can commit anything
        # (so every record listed is another's), erased on the same loop as the background tasks.
        owed = self._store.erasures()
        self._resuming = asyncio.get_event_loop().create_task(self._resume_erasures(owed))
        log.info(
            "GalleryWriter of %s on %s: revision %d", self._model_id, self._store.describe(), self._gallery.revision
        )

    def _load(self) -> Gallery:
        loaded = load_gallery(self._store, self._model_id, self._dim)
        if loaded is not None:
            return loaded
        # A new model's gallery starts as an empty base (revision 0): the store then lists this model's snapshot
        # (another model's writer follows it) before its first change.
        empty = Gallery(self._model_id, self._dim)
        self._store.write(empty.to_bytes())
        return empty

    async def _mutate(
        self,
        change: Callable[[StagedChange], T],
        before_store: Callable[[T], None] | None = None,
        after_store: Callable[[T], None] | None = None,
    ) -> tuple[T, int]:
        """Stage ``change`` (in a thread: a carry-over embeds chips) with whatever else arrives meanwhile, store
        them as one change, and answer ``(what change returned, the revision that holds it)`` once stored and
        known to every watching replica. ``before_store`` / ``after_store`` run (in a thread) around the write
        when the change changed anything: chips are stored before the change that names them and deleted after
        the one that no longer does. The gallery in memory never holds a change the store does not have."""
        answer: asyncio.Future[tuple[Any, int]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Request(change, before_store, after_store, answer))
        self._arrived.set()
        outcome, revision = await answer
        return outcome, revision

    async def _commit_forever(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._waiting:
                group, self._waiting = self._waiting[:MAX_GROUP], self._waiting[MAX_GROUP:]
                try:
                    await self._commit(group)
                except Exception as exc:  # whatever it was, every request of the group hears of it
                    for request in group:
                        _settle(request.answer, error=exc)
                    if not isinstance(exc, (GalleryStoreError, GalleryError)):
                        log.exception("a group commit failed")

    async def _commit(self, group: list[_Request]) -> None:
        async with self._lock:
            for _ in range(COMMIT_ATTEMPTS):
                if await self._catch_up_if_behind():
                    metrics().gallery_faces.set(len(self._gallery))
                staged = StagedChange(self._gallery)
                accepted: list[tuple[_Request, Any]] = []
                for request in group:
                    if request.answer.done():
                        continue  # failed on its own in an earlier attempt
                    mark = staged.checkpoint()
                    try:
                        accepted.append((request, await asyncio.to_thread(request.change, staged)))
                    except Exception as exc:  # this request's own failure (unknown face, wrong model): its alone
                        staged.rollback(mark)
                        _settle(request.answer, error=exc)
                if staged.empty:
                    for request, outcome in accepted:
                        _settle(request.answer, (outcome, self._gallery.revision))
                    return
                for request, outcome in accepted:
                    if request.before_store is not None:
                        await asyncio.to_thread(request.before_store, outcome)
                change = staged.change(self._gallery.revision + 1)
                data = change.to_bytes()
                record = None
                if change.removed_ids:  # recorded first: erasure must happen even if this writer ends next
                    record = await asyncio.to_thread(self._store.write_erasure, change.revision, change.removed_ids)
                if not await asyncio.to_thread(self._store.write_change, change.revision, data):
                    log.warning("another writer stored revision %d first: staging again on top of it", change.revision)
                    if record is not None:
                        await asyncio.to_thread(self._store.delete_erasures, [record])
                    continue
                apply_change(self._gallery, change)
                self._added_by_revision[change.revision] = frozenset(change.face_ids)
                self._stored_since_base += 1
                metrics().gallery_faces.set(len(self._gallery))
                for request, outcome in accepted:
                    if request.after_store is not None:
                        try:
                            await asyncio.to_thread(request.after_store, outcome)
                        except GalleryStoreError as exc:  # the change is stored; its erasure deletes them again
                            log.warning("could not delete the chips of removed faces (erasure tries again): %s", exc)
                late = await self._watchers.published(self._model_id)
                if late:
                    log.warning("replicas %s did not acknowledge revision %d in time", late, change.revision)
                for request, outcome in accepted:
                    _settle(request.answer, (outcome, change.revision))
                if change.removed_ids:
                    self._erase_later(change.removed_ids, owed=() if record is None else (record,))
                else:
                    self._compact_when_due()
                return
        raise WriterLostRaceError(f"another writer stored each of the last {COMMIT_ATTEMPTS} revisions first")

    async def _catch_up_if_behind(self) -> bool:
        """Take what another writer stored (its changes, or a base newer than this gallery); under the lock."""
        changes = await asyncio.to_thread(read_changes, self._store, self._gallery.revision)
        for change in changes:
            apply_change(self._gallery, change)
            if change.removed_ids:
                # Removed by another writer (an erasure of another model, a writer that lost its lease): a base
                # this writer was compacting meanwhile may still hold them, so it erases them too.
                self._erase_later(change.removed_ids)
        if changes:
            log.warning(
                "took %d changes another writer stored (now at revision %d)", len(changes), self._gallery.revision
            )
        # Also after changes: they may stop short of a newer base whose changes were deleted (an erasure's).
        if await asyncio.to_thread(behind_the_base, self._store, self._gallery.revision):
            self._gallery = await asyncio.to_thread(self._load)
            log.warning(
                "the store has a newer snapshot than this writer: read it (revision %d)", self._gallery.revision
            )
            return True
        return bool(changes)

    # --- compaction -----------------------------------------------------------------------------------------
    def _compact_when_due(self) -> None:
        if self._stored_since_base >= COMPACT_AFTER_CHANGES and (self._compacting is None or self._compacting.done()):
            self._compacting = asyncio.get_running_loop().create_task(self.compact())

    async def compact(self, strict: bool = False) -> int:
        """Write the gallery as the new base snapshot and clean up the changes it holds (all but the last
        ``RETAINED_CHANGES``); returns the base's revision. Commits wait only while the gallery is serialised. A
        failure is logged (the changes stay), or with ``strict`` raised (:class:`GalleryStoreError`: an erasure
        must know it happened)."""
        async with self._base_lock:
            return await self._compact(strict)

    async def _compact(self, strict: bool) -> int:
        with tempfile.TemporaryFile(prefix="facerec-base-") as spool:  # local disk: never a second copy in memory
            async with self._lock:
                revision = self._gallery.revision
                await asyncio.to_thread(self._gallery.write_to, spool)
                self._stored_since_base = 0
            try:
                size = spool.tell()
                spool.seek(0)
                # A base as new is there already (another writer's, or this one's): its changes still go.
                if not await asyncio.to_thread(behind_the_base, self._store, revision - 1):
                    await asyncio.to_thread(self._store.write, spool)
            except GalleryStoreError as exc:
                if strict:
                    raise
                log.warning("compaction failed (the changes stay; tried again after the next ones): %s", exc)
                return revision
        try:
            stored = await asyncio.to_thread(self._store.change_revisions)
            doomed = [r for r in stored if r <= revision - RETAINED_CHANGES]
            if doomed:
                await asyncio.to_thread(self._store.delete_changes, doomed)
                for gone in doomed:
                    self._added_by_revision.pop(gone, None)
            log.info("compacted: base at revision %d (%d bytes), %d changes cleaned up", revision, size, len(doomed))
        except GalleryStoreError as exc:
            if strict:
                raise
            log.warning("compaction failed (the changes stay; tried again after the next ones): %s", exc)
        return revision

    # --- erasure ----------------------------------------------------------------------------------------------
    def _erase_later(self, face_ids: Iterable[str], owed: Iterable[str] = ()) -> None:
        """Erase these removed faces from every object of the store that holds them, in the background, then
        delete the ``owed`` erasure records (by name)."""
        self._to_erase.update(face_ids)
        self._owed.update(owed)
        if self._erasing is None or self._erasing.done():
            self._erasing = asyncio.get_running_loop().create_task(self._erase_pending())

    async def _erase_pending(self) -> None:
        while self._to_erase or self._owed:
            face_ids, owed = frozenset(self._to_erase), sorted(self._owed)
            self._to_erase.clear()
            self._owed.clear()
            try:
                if face_ids:
                    await self._erase(face_ids)
                await asyncio.to_thread(self._store.delete_erasures, owed)
            except Exception as exc:  # the store, or another model's data: the ids wait for the next attempt
                self._to_erase.update(face_ids)
                self._owed.update(owed)
                log.warning("erasing %d removed faces failed (tried again soon): %s", len(face_ids), exc)
                await asyncio.sleep(ERASURE_RETRY_S)

    async def _erase(self, face_ids: frozenset[str]) -> None:
        """This model's base rewritten at once without them and the changes that added them deleted, then every
        other model's snapshot, partial re-embedding and the root ``gallery.npz`` (see
        :mod:`serve_app.gallery_erasure`)."""
        if self._reembedding is not None and self._reembedding.state == "running":
            self._erased_while_reembedding.update(face_ids)
        revision = await self.compact(strict=True)
        # Chips go with the change that removes them, unless that failed or this writer ended in between.
        await asyncio.to_thread(self._store.delete_chips, sorted(face_ids))
        known = dict(self._added_by_revision)  # a copy: commits add to it meanwhile
        doomed = await asyncio.to_thread(changes_adding, self._store, face_ids, known)
        newest = max(known, default=0)
        self._added_by_revision = known | {r: f for r, f in self._added_by_revision.items() if r > newest}
        await asyncio.to_thread(self._store.delete_changes, doomed)
        report = await asyncio.to_thread(erase_elsewhere, self._store, self._model_id, face_ids)
        log.info(
            "erased %d removed faces: this model's base rewritten at revision %d and %d changes deleted; elsewhere "
            "%d objects rewritten (%s) and %d changes deleted",
            len(face_ids),
            revision,
            len(doomed),
            len(report.rewritten),
            ", ".join(report.rewritten) or "none",
            report.changes_deleted,
        )

    async def _resume_erasures(self, owed: dict[str, frozenset[str]]) -> None:
        """Finish the erasures an earlier writer recorded and did not finish (it ended, or the store failed)."""
        if not owed:
            return
        # A record whose faces are all still here was written for a change that was never stored: nothing to erase.
        removed = {face_id for ids in owed.values() for face_id in ids if not self._gallery.has_face(face_id)}
        log.info("finishing %d erasures an earlier writer left (%d faces)", len(owed), len(removed))
        self._erase_later(removed, owed=owed)

    async def erasure_settled(self) -> None:
        """Return once every face removed so far is erased from the store, also those erased again after a
        re-embedding that runs, and those an earlier writer left (tests; an operator reads the log)."""
        while True:
            running = [task for task in (self._resuming, self._erasing) if task is not None and not task.done()]
            if self._erased_while_reembedding and self._reembed_task is not None and not self._reembed_task.done():
                running.append(self._reembed_task)
            if not running:
                return
            await asyncio.shield(running[0])

    async def _own_embedder(self) -> Embedder:
        """This writer's model, loaded the first time a chip must be embedded (most writers never need it)."""
        async with self._embedder_lock:  # a catch-up and a cross-model enrolment may both ask at once
            if self._embedder is None:
                recognition = self._recognition
                self._embedder = await asyncio.to_thread(
                    lambda: Embedder(
                        recognition.resolved_checkpoint(),
                        flip=recognition.flip,
                        max_batch=recognition.max_embed_batch,
                        precision=recognition.embed_precision,
                    )
                )
            return self._embedder

    # --- changes --------------------------------------------------------------------------------------------
    async def add_faces(
        self, name: str, embeddings: np.ndarray, model_id: str, chips: list[bytes | None] | None = None
    ) -> tuple[list[str], int]:
        """Enrol embeddings for ``name`` (with each face's chip where given); returns the new face ids and the
        gallery revision that has them. Embeddings of another model (a replica of the model being switched from
        or to) are replaced by this model's embeddings of their chips; without chips they are refused."""
        if model_id != self._model_id:
            if not chips or any(chip is None for chip in chips):
                raise ModelMismatchError(
                    f"embeddings from {model_id!r} without their chips cannot join the {self._model_id!r} gallery "
                    "(the model is being switched)"
                )
            embed = chip_embedder(await self._own_embedder())
            embeddings = await asyncio.to_thread(embed, [chip for chip in chips if chip is not None])
            log.info(
                "enrolment of %s embedded by %s: embedded again from its chips with %s", name, model_id, self._model_id
            )
        flags = None if chips is None else [chip is not None for chip in chips]

        def store_chips(ids: list[str]) -> None:
            for face_id, chip in zip(ids, chips or [], strict=False):
                if chip is not None:
                    self._store.write_chip(face_id, chip)

        ids, revision = await self._mutate(
            lambda g: g.add(name, embeddings, self._model_id, flags), before_store=store_chips
        )
        return list(ids), revision

    async def remove_person(self, name: str) -> tuple[int, int]:
        elsewhere = await self._faces_elsewhere(name)

        def remove(g: StagedChange) -> tuple[int, list[str]]:
            with_chips = [face_id for face_id, chip in g.face_records(name) if chip]
            # Enrolled through another model's writer (a switch under way) and not carried over here yet: forgotten
            # here too (a tombstone, so it is never carried over) and erased from that model with the rest.
            others = {f for f in elsewhere if not g.gallery.has_face(f) and not g.gallery.was_removed(f)}
            removed = g.remove_person(name)
            if others:
                g.forget(others)
            return removed + len(others), with_chips + sorted(others)

        (removed, _), revision = await self._mutate(remove, after_store=lambda out: self._store.delete_chips(out[1]))
        return removed, revision

    async def remove_face(self, name: str, face_id: str) -> tuple[bool, int]:
        removed, revision = await self._mutate(
            lambda g: g.remove_face(name, face_id),
            after_store=lambda gone: self._store.delete_chips([face_id]) if gone else None,
        )
        return bool(removed), revision

    # --- other models' snapshots ------------------------------------------------------------------------------
    async def _faces_elsewhere(self, name: str) -> set[str]:
        """The ids of ``name``'s faces in the other models' snapshots this writer follows, brought up to date
        first (their new changes only: small reads)."""
        found: set[str] = set()
        for model_id, source in list(self._other_galleries.items()):
            try:
                changes = await asyncio.to_thread(read_changes, self._store.for_model(model_id), source.revision)
            except (GalleryStoreError, GalleryError) as exc:
                log.warning(
                    "could not read %s's latest changes (its snapshot as last followed is used): %s", model_id, exc
                )
                changes = []
            _apply_in_order(source, changes)
            found.update(source.faces_of(name))
        return found

    async def _follow_other_models(self) -> None:
        while True:
            await asyncio.sleep(self._sync_period_s)
            try:
                await self.follow_other_models()
            except (GalleryStoreError, GalleryError) as exc:
                log.warning("could not follow the other models' snapshots: %s", exc)
            except Exception:
                # Anything else comes from another model's data (a snapshot or chip this writer cannot use): it
                # must not end the loop, or the health check would replace this writer with one that fails the
                # same way, and enrolments would stop meanwhile.
                log.exception("following the other models' snapshots failed; trying again next period")

    async def follow_other_models(self) -> list[CarryOverReport]:
        """Carry what changed in other models' snapshots since the last look over to this model's (see the
        module docstring); returns what each carry-over did."""
        reports = []
        listed = [info for info in await asyncio.to_thread(self._store.snapshots) if info.model_id != self._model_id]
        for gone in set(self._others) - {info.model_id for info in listed}:  # dropped by an operator
            self._others.pop(gone, None)
            self._followed.pop(gone, None)
            self._other_galleries.pop(gone, None)
        for info in listed:
            token = await asyncio.to_thread(self._store.snapshot_token, info)
            if token is None:
                continue
            other = self._store.for_model(info.model_id)
            source = self._other_galleries.get(info.model_id)
            if source is None or self._followed.get(info.model_id) != token:
                # A new base (compacted, or written whole): read it and the changes after it.
                source = await asyncio.to_thread(load_gallery, other, info.model_id)
                if source is None:
                    continue
            else:
                changes = await asyncio.to_thread(read_changes, other, source.revision)
                if not changes:
                    continue
                _apply_in_order(source, changes)
            self._other_galleries[info.model_id] = source
            self._others[info.model_id] = SnapshotStatus(
                info.model_id, len(source), source.person_count(), source.revision
            )
            async with self._lock:  # the gallery must not change under the plan
                plan = await asyncio.to_thread(plan_carry_over, source, self._gallery)
            if not plan.changes_nothing:
                reports.append(await self._carry_over(source))
            self._followed[info.model_id] = token
        return reports

    async def _carry_over(self, source: Gallery) -> CarryOverReport:
        embed = chip_embedder(await self._own_embedder())
        total = CarryOverReport(source.model_id, self._model_id)
        while True:
            skip = frozenset(face_id for _, face_id in total.missing_chip)
            report, _ = await self._mutate(functools.partial(self._carry_chunk, source, embed, skip))
            total.embedded += report.embedded
            total.removed += report.removed
            total.missing_chip += report.missing_chip
            total.without_chip = report.without_chip
            if report.left == 0:
                break
        log.info(
            "carried %s's snapshot over: %d embedded from chips, %d removed, %d without chips and %d with unusable "
            "chips left out",
            source.model_id,
            total.embedded,
            total.removed,
            len(total.without_chip),
            len(total.missing_chip),
        )
        return total

    def _carry_chunk(
        self, source: Gallery, embed: EmbedChips, skip: frozenset[str], target: StagedChange
    ) -> CarryOverReport:
        return carry_over(source, target, self._store.read_chip, embed, limit=CARRY_OVER_CHUNK, skip=skip)

    # --- re-embedding into another model -------------------------------------------------------------------
    async def reembed(self, checkpoint: str, flip: bool = False) -> dict[str, object]:
        """Start re-embedding this model's snapshot with ``checkpoint`` (in the background); returns its progress
        (``reembed_progress`` follows it). The target model's snapshot is written beside this one."""
        # Checked and recorded under one lock: two requests at once must not both find none running.
        async with self._reembed_starting:
            return await self._start_reembedding(checkpoint, flip)

    async def _start_reembedding(self, checkpoint: str, flip: bool) -> dict[str, object]:
        if self._reembedding is not None and self._reembedding.state == "running":
            raise GalleryError(f"a re-embedding into {self._reembedding.target_model} is already running")
        settings = self._recognition.model_copy(update={"checkpoint": checkpoint, "flip": flip})
        # UnknownCheckpointError (a ValueError) for a bad name; a .pt path is read and hashed: not on the loop.
        target = await asyncio.to_thread(settings.resolved_checkpoint)
        target_model = target.model_id_for(flip)
        if target_model == self._model_id:
            raise GalleryError(f"the gallery is already embedded with {self._model_id}")
        # Recorded as running before anything is read: a face erased from now on is erased again once it ends.
        progress = ReembedProgress(target_model, total=0)
        self._reembedding = progress
        try:
            async with self._lock:  # a copy: the gallery in memory changes with every commit meanwhile
                data = await asyncio.to_thread(self._gallery.to_bytes)
            source = await asyncio.to_thread(Gallery.from_bytes, data)
            store = open_gallery_store(self._uri, self._endpoint)
            progress.total = await asyncio.to_thread(faces_to_embed, store, source, target_model, target.dim)
        except Exception as exc:
            progress.state, progress.error = "failed", f"{type(exc).__name__}: {exc}"
            self._erase_again_after_reembedding()
            raise

        def run() -> None:
            embedder = Embedder(
                target, flip=flip, max_batch=settings.max_embed_batch, precision=settings.embed_precision
            )

            def advance(count: int) -> None:
                progress.done += count

            report = reembed_snapshot(store, source, embedder, progress=advance)
            progress.report = report.as_dict()

        async def background() -> None:
            try:
                await asyncio.to_thread(run)
                progress.state = "done"
            except Exception as exc:
                # Whatever ended it (the store, a weight file, torch), the run is over and says why; a later
                # request may start another.
                progress.state, progress.error = "failed", f"{type(exc).__name__}: {exc}"
                log.exception("re-embedding into %s failed", progress.target_model)
            finally:
                self._erase_again_after_reembedding()  # its target and partial, whether it ended well or not

        self._reembed_task = asyncio.get_running_loop().create_task(background())
        return self.reembed_progress() or {}

    def _erase_again_after_reembedding(self) -> None:
        """Faces erased while a re-embedding ran may have been embedded by it before they were removed."""
        if self._erased_while_reembedding:
            self._erase_later(self._erased_while_reembedding)
            self._erased_while_reembedding = set()

    def reembed_progress(self) -> dict[str, object] | None:
        """The last re-embedding started here: target model, faces done of total, state, report."""
        progress = self._reembedding
        return None if progress is None else dict(progress.__dict__)

    # --- reading ---------------------------------------------------------------------------------------------
    async def chip(self, name: str, face_id: str) -> bytes | None:
        """``face_id``'s chip, if it is a face of ``name`` that has one (``None`` otherwise)."""
        if (face_id, True) not in self._gallery.face_records(name):
            return None
        return await asyncio.to_thread(self._store.read_chip, face_id)

    async def watch_revision(self, subscriber: str, known: int, model_id: str | None, timeout_s: float) -> int:
        """A Recognizer replica's long poll: the revision once it differs from ``known`` (see RevisionWatchers)."""
        return await self._watchers.watch(subscriber, known, model_id, timeout_s)

    def revision(self, model_id: str | None = None) -> int:
        """The revision of the newest snapshot this writer stored (Recognizer replicas ask before a batch); 0 for
        another model's replica (revisions count each model's snapshot on its own)."""
        return self._gallery.revision if model_id in (None, self._model_id) else 0

    def people(self) -> tuple[dict[str, int], int]:
        return self._gallery.people(), self._gallery.revision

    def person(self, name: str) -> tuple[list[tuple[str, bool]], int]:
        """``(face id, has a chip)`` for each face of ``name``, and the revision."""
        return self._gallery.face_records(name), self._gallery.revision

    def snapshots(self) -> list[SnapshotStatus]:
        """This model's snapshot (active) and the others this writer has seen in the store."""
        own = SnapshotStatus(
            self._model_id, len(self._gallery), self._gallery.person_count(), self._gallery.revision, active=True
        )
        return [own, *sorted(self._others.values(), key=lambda s: s.model_id)]
