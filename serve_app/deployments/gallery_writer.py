"""The GalleryWriter deployment: the single writer of the shared gallery.

Every change (enrol, remove) goes through this one replica, which applies it under a lock to the newest
snapshot in the store and writes the result back. Serialising writers here is what makes two concurrent
enrolments keep each other's faces; Recognizer replicas only ever read the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from serve_app.gallery_store import GalleryStore, GalleryStoreError, open_gallery_store
from serve_app.metrics import metrics
from serve_app.model.gallery import Gallery

log = logging.getLogger(f"ray.serve.{__name__}")

T = TypeVar("T")


class GalleryWriterDeployment:
    def __init__(self, gallery_uri: str, model_id: str, dim: int, gallery_endpoint: str | None = None) -> None:
        self._store: GalleryStore = open_gallery_store(gallery_uri, gallery_endpoint)
        self._model_id = model_id
        self._dim = dim
        self._lock = asyncio.Lock()
        self._gallery = self._load()
        metrics().gallery_faces.set(len(self._gallery))
        log.info("GalleryWriter on %s: revision %d", self._store.describe(), self._gallery.revision)

    def _load(self) -> Gallery:
        data = self._store.read()
        if data is None:
            return Gallery(self._model_id, self._dim)
        return Gallery.from_bytes(data, expected_model_id=self._model_id)

    async def _mutate(
        self,
        change: Callable[[Gallery], T],
        before_store: Callable[[T], None] | None = None,
        after_store: Callable[[T], None] | None = None,
    ) -> tuple[T, int]:
        """Apply ``change`` and store the result; ``before_store`` / ``after_store`` run (in a thread) around the
        snapshot's write when the change changed anything: chips are stored before the snapshot that names them
        and deleted after the one that no longer does."""
        async with self._lock:
            # Apply the change to the store's newest snapshot, freshly read (in case anything else wrote it: an
            # operator restoring a backup, a previous writer replica), and keep it only once it is stored: the
            # gallery in memory never holds a change the store does not have.
            stored = await asyncio.to_thread(self._load)
            candidate = stored if stored.revision >= self._gallery.revision else self._copy()
            before = candidate.revision
            outcome = change(candidate)
            if candidate.revision != before:
                if before_store is not None:
                    await asyncio.to_thread(before_store, outcome)
                await asyncio.to_thread(self._store.write, candidate.to_bytes())
                if after_store is not None:
                    try:
                        await asyncio.to_thread(after_store, outcome)
                    except GalleryStoreError as exc:  # the change is stored; an unreferenced chip is harmless
                        log.warning("could not delete the chips of removed faces: %s", exc)
            self._gallery = candidate
            metrics().gallery_faces.set(len(self._gallery))
            return outcome, self._gallery.revision

    def _copy(self) -> Gallery:
        # The store went back to an older revision than this writer wrote (restored by hand): never go back.
        log.warning(
            "the store holds an older gallery than this writer wrote; keeping revision %d", self._gallery.revision
        )
        return Gallery.from_bytes(self._gallery.to_bytes(), expected_model_id=self._model_id)

    async def add_faces(
        self, name: str, embeddings: np.ndarray, model_id: str, chips: list[bytes | None] | None = None
    ) -> tuple[list[str], int]:
        """Enrol embeddings for ``name`` (with each face's chip where given); returns the new face ids and the
        gallery revision that has them."""
        flags = None if chips is None else [chip is not None for chip in chips]

        def store_chips(ids: list[str]) -> None:
            for face_id, chip in zip(ids, chips or [], strict=False):
                if chip is not None:
                    self._store.write_chip(face_id, chip)

        ids, revision = await self._mutate(lambda g: g.add(name, embeddings, model_id, flags), before_store=store_chips)
        return list(ids), revision

    async def remove_person(self, name: str) -> tuple[int, int]:
        def remove(g: Gallery) -> tuple[int, list[str]]:
            with_chips = [face_id for face_id, chip in g.face_records(name) if chip]
            return g.remove_person(name), with_chips

        (removed, _), revision = await self._mutate(remove, after_store=lambda out: self._store.delete_chips(out[1]))
        return removed, revision

    async def remove_face(self, name: str, face_id: str) -> tuple[bool, int]:
        removed, revision = await self._mutate(
            lambda g: g.remove_face(name, face_id),
            after_store=lambda gone: self._store.delete_chips([face_id]) if gone else None,
        )
        return bool(removed), revision

    async def chip(self, name: str, face_id: str) -> bytes | None:
        """``face_id``'s chip, if it is a face of ``name`` that has one (``None`` otherwise)."""
        if (face_id, True) not in self._gallery.face_records(name):
            return None
        return await asyncio.to_thread(self._store.read_chip, face_id)

    def revision(self) -> int:
        """The revision of the newest snapshot this writer stored (Recognizer replicas ask before a batch)."""
        return self._gallery.revision

    def people(self) -> tuple[dict[str, int], int]:
        return self._gallery.people(), self._gallery.revision

    def person(self, name: str) -> tuple[list[tuple[str, bool]], int]:
        """``(face id, has a chip)`` for each face of ``name``, and the revision."""
        return self._gallery.face_records(name), self._gallery.revision
