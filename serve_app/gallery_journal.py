"""Reading a model's gallery from its store: the base snapshot plus the changes made since.

See :mod:`serve_app.gallery_store` for the layout and :mod:`serve_app.model.gallery_change` for a change. A reader
that holds revision ``r`` needs only the changes ``r + 1``, ``r + 2``, ... (each a small object), until the next one
does not exist yet; a reader so far behind that those were cleaned up after a newer base reads that base again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from serve_app.gallery_store import GalleryStore
from serve_app.model.gallery import Gallery
from serve_app.model.gallery_change import GalleryChange, apply_change

#: Changes fetched at once when a reader knows how far behind it is (each read is a round trip to S3).
PARALLEL_READS = 16
#: Times a gallery is read again because a newer base was written while it was read.
LOAD_ATTEMPTS = 4


def load_gallery(
    store: GalleryStore, model_id: str, dim: int | None = None, half_rows_from: int | None = None
) -> Gallery | None:
    """The bound model's gallery: its snapshot plus every change after it (``None`` while it has neither).

    ``dim`` makes the empty gallery of a model whose first changes exist without a snapshot yet;
    ``half_rows_from`` is the gallery's (see :class:`~serve_app.model.gallery.Gallery`). The snapshot is read a
    chunk at a time from a file (see :meth:`~serve_app.gallery_store.GalleryStore.open_snapshot`).

    A base written while it is read (a compaction, an erasure) may have its changes deleted before they are read:
    the changes then stop short of it, and the gallery is read again from the new base.
    """
    gallery = _load_once(store, model_id, dim, half_rows_from)
    for _ in range(LOAD_ATTEMPTS - 1):
        if gallery is None or not behind_the_base(store, gallery.revision):
            break
        gallery = _load_once(store, model_id, dim, half_rows_from)
    return gallery


def _load_once(store: GalleryStore, model_id: str, dim: int | None, half_rows_from: int | None) -> Gallery | None:
    with store.open_snapshot() as snapshot:
        gallery = (
            None
            if snapshot is None
            else Gallery.read_from(snapshot, expected_model_id=model_id, half_rows_from=half_rows_from)
        )
    if gallery is None:
        first = store.read_change(1)
        if first is None:
            return None
        gallery = Gallery(
            model_id, dim if dim is not None else GalleryChange.from_bytes(first).dim, half_rows_from=half_rows_from
        )
    # The changes after the base are listed (one request per thousand) and fetched in parallel: a replica that
    # joins reads up to COMPACT_AFTER_CHANGES of them, which one at a time from S3 would take many seconds.
    stored = [revision for revision in store.change_revisions() if revision > gallery.revision]
    newest = (
        gallery.revision + len(stored)
        if stored == list(range(gallery.revision + 1, gallery.revision + len(stored) + 1))
        else None
    )
    catch_up(store, gallery, until=newest)
    catch_up(store, gallery)  # and any stored since the listing
    return gallery


def read_changes(store: GalleryStore, after: int, until: int | None = None) -> list[GalleryChange]:
    """The changes after revision ``after``, in order, up to the first that does not exist (or ``until``).

    With ``until`` known (the writer said which revision it stored), the changes up to it are fetched in parallel.
    """
    changes: list[GalleryChange] = []
    revision = after
    if until is not None and until - after > 1:
        wanted = list(range(after + 1, until + 1))
        with ThreadPoolExecutor(min(PARALLEL_READS, len(wanted))) as readers:
            for data in readers.map(store.read_change, wanted):
                if data is None:
                    return changes
                changes.append(GalleryChange.from_bytes(data))
        revision = until
    while until is None or revision < until:
        data = store.read_change(revision + 1)
        if data is None:
            break
        changes.append(GalleryChange.from_bytes(data))
        revision += 1
    return changes


def catch_up(store: GalleryStore, gallery: Gallery, until: int | None = None) -> int:
    """Apply to ``gallery`` (in place) the stored changes after its revision; returns how many."""
    changes = read_changes(store, gallery.revision, until)
    for change in changes:
        apply_change(gallery, change)
    return len(changes)


def behind_the_base(store: GalleryStore, revision: int) -> bool:
    """Whether the store's snapshot is newer than ``revision`` (the changes between may have been cleaned up: a
    reader at ``revision`` with no next change must read the snapshot again)."""
    base = store.base_revision()
    return base is not None and base > revision
