"""Erasure that leaves nothing: once faces are removed, no object of the gallery store holds them any more.

A removal is a change (its face ids only); the faces themselves are still in the objects written before it: the
base snapshot, the change objects that added them, another model's base and changes (a model switched from, or
one re-embedded into), a re-embedding's partial snapshot, and a ``gallery.npz`` left from before snapshots were kept
per model. The GalleryWriter erases them from all of these after every change that removes faces (see
:meth:`~serve_app.deployments.gallery_writer.GalleryWriterDeployment.erasure_settled`): its own model by compacting
at once and deleting every change the new base holds, every other model here (:func:`erase_from_model`). Chips are
deleted by the change itself, and again by the erasure (in case that failed). The writer records each erasure it
owes in the store before the change that removes the faces, and deletes the record once the erasure is done, so a
writer that starts finishes what one that ended left. The gallery bucket is not versioned, so a replaced or deleted
object is gone.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from serve_app.gallery_journal import PARALLEL_READS, load_gallery
from serve_app.gallery_store import GalleryStore
from serve_app.model.gallery import Gallery
from serve_app.model.gallery_change import GalleryChange

log = logging.getLogger(f"ray.serve.{__name__}")

#: Times a model's erasure is tried again after its own writer stored the same revision first.
ATTEMPTS = 8


@dataclass
class ErasureReport:
    """What one erasure rewrote (objects by key) and how many change objects it deleted."""

    rewritten: list[str] = field(default_factory=list)
    changes_deleted: int = 0

    def add(self, other: ErasureReport) -> None:
        self.rewritten += other.rewritten
        self.changes_deleted += other.changes_deleted


def erase_from_model(store: GalleryStore, model_id: str, face_ids: frozenset[str]) -> ErasureReport:
    """Remove ``face_ids`` from ``model_id``'s snapshot in ``store`` (bound to it), whoever writes it: a change that
    removes them (stored like a writer's, so a live writer of that model takes it), then a base without them, then
    the changes that added them deleted."""
    report = ErasureReport()
    for _ in range(ATTEMPTS):
        gallery = load_gallery(store, model_id)
        if gallery is None:
            return report
        revision = gallery.revision
        gallery.forget(face_ids)
        if gallery.revision == revision and store.base_revision() == revision and not changes_adding(store, face_ids):
            return report  # not in the gallery, which is its base (no change after it), nor in a change
        if gallery.revision != revision:
            change = GalleryChange(model_id, gallery.dim, gallery.revision, removed_ids=tuple(sorted(face_ids)))
            if not store.write_change(change.revision, change.to_bytes()):
                continue  # that model's writer stored this revision meanwhile: read again
        store.write_gallery(gallery)
        report.rewritten.append(store.snapshot_key())
        doomed = changes_adding(store, face_ids)
        store.delete_changes(doomed)
        report.changes_deleted += len(doomed)
        return report
    raise RuntimeError(f"{model_id}: its writer stored a new revision each of {ATTEMPTS} times")


def changes_adding(
    store: GalleryStore, face_ids: frozenset[str], known: dict[int, frozenset[str]] | None = None
) -> list[int]:
    """The revisions of the stored changes (of the model ``store`` is bound to) that add any of ``face_ids``.

    Only those are deleted: a replica that already applied them is unaffected, and one that still needs one (it is
    joining) finds it missing and reads the new base instead, as after a compaction. The changes that remove the
    faces hold only their ids, and stay. ``known`` (revision -> the face ids it adds) spares reading the changes a
    writer stored itself; the ones read are added to it, and the ones no longer stored dropped."""
    known = {} if known is None else known
    stored = store.change_revisions()
    for gone in set(known) - set(stored):
        del known[gone]
    unread = [revision for revision in stored if revision not in known]
    with ThreadPoolExecutor(PARALLEL_READS) as readers:
        for revision, data in zip(unread, readers.map(store.read_change, unread), strict=True):
            if data is not None:
                known[revision] = frozenset(GalleryChange.from_bytes(data).face_ids)
    return [revision for revision in stored if face_ids & known.get(revision, frozenset())]


def erase_from_partial(store: GalleryStore, face_ids: frozenset[str]) -> ErasureReport:
    """Remove ``face_ids`` from the partial re-embedding of the model ``store`` is bound to, if it holds them."""
    report = ErasureReport()
    data = store.read_partial()
    if data is None:
        return report
    partial = Gallery.from_bytes(data)
    if _without(partial, face_ids):
        store.write_partial(partial.to_bytes())
        report.rewritten.append(f"{store.model_id} (partial)")
    return report


def erase_from_root(store: GalleryStore, face_ids: frozenset[str]) -> ErasureReport:
    """Remove ``face_ids`` from ``gallery.npz`` (``store`` unbound), kept from before per-model snapshots, if it
    holds them. A model whose snapshot it still is has it rewritten by :func:`erase_from_model` already."""
    report = ErasureReport()
    with store.open_snapshot() as snapshot:
        root = None if snapshot is None else Gallery.read_from(snapshot)
    if root is not None and _without(root, face_ids):
        store.write_gallery(root)
        report.rewritten.append(store.snapshot_key())
    return report


def erase_elsewhere(store: GalleryStore, own_model: str, face_ids: frozenset[str]) -> ErasureReport:
    """Erase ``face_ids`` from every model's snapshot but ``own_model``'s, every partial re-embedding, and the
    root ``gallery.npz``."""
    report = ErasureReport()
    for info in store.snapshots():
        if info.model_id != own_model:
            report.add(erase_from_model(store.for_model(info.model_id), info.model_id, face_ids))
    for model_id in store.partial_models():
        report.add(erase_from_partial(store.for_model(model_id), face_ids))
    report.add(erase_from_root(store.unbound(), face_ids))
    return report


def _without(gallery: Gallery, face_ids: frozenset[str]) -> bool:
    """Remove those of ``face_ids`` that ``gallery`` holds, keeping its revision (a partial's or a stale root's
    revision says what it grew from; the removal is not a change of its own); whether it held any."""
    revision = gallery.revision
    removed = gallery.forget(frozenset(f for f in face_ids if gallery.has_face(f)))
    gallery.revision = revision
    return removed > 0
