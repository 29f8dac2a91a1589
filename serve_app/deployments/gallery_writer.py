"""The GalleryWriter deployment: the single writer of the shared gallery.

Every change (enrol, remove) goes through this one replica, which applies it under a lock to the newest
snapshot in the store and writes the result back. Serialising writers here is what makes two concurrent
enrolments keep each other's faces; Recognizer replicas only ever read the store.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from serve_app.gallery_store import GalleryStore, open_gallery_store
from serve_app.metrics import metrics
from serve_app.model.gallery import Gallery

log = logging.getLogger(f"ray.serve.{__name__}")


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

    async def _mutate(self, change: Any) -> tuple[Any, int]:
        async with self._lock:
            # Apply the change to the store's newest snapshot, freshly read (in case anything else wrote it: an
            # operator restoring a backup, a previous writer replica), and keep it only once it is stored: the
            # gallery in memory never holds a change the store does not have.
            stored = await asyncio.to_thread(self._load)
            candidate = stored if stored.revision >= self._gallery.revision else self._copy()
            before = candidate.revision
            outcome = change(candidate)
            if candidate.revision != before:
                await asyncio.to_thread(self._store.write, candidate.to_bytes())
            self._gallery = candidate
            metrics().gallery_faces.set(len(self._gallery))
            return outcome, self._gallery.revision

    def _copy(self) -> Gallery:
        # The store went back to an older revision than this writer wrote (restored by hand): never go back.
        log.warning(
            "the store holds an older gallery than this writer wrote; keeping revision %d", self._gallery.revision
        )
        return Gallery.from_bytes(self._gallery.to_bytes(), expected_model_id=self._model_id)

    async def add_faces(self, name: str, embeddings: np.ndarray, model_id: str) -> tuple[list[str], int]:
        """Enrol embeddings for ``name``; returns the new face ids and the gallery revision that has them."""
        ids, revision = await self._mutate(lambda g: g.add(name, embeddings, model_id))
        return list(ids), revision

    async def remove_person(self, name: str) -> tuple[int, int]:
        removed, revision = await self._mutate(lambda g: g.remove_person(name))
        return int(removed), revision

    async def remove_face(self, name: str, face_id: str) -> tuple[bool, int]:
        removed, revision = await self._mutate(lambda g: g.remove_face(name, face_id))
        return bool(removed), revision

    def revision(self) -> int:
        """The revision of the newest snapshot this writer stored (Recognizer replicas ask before a batch)."""
        return self._gallery.revision

    def people(self) -> tuple[dict[str, int], int]:
        return self._gallery.people(), self._gallery.revision

    def person(self, name: str) -> tuple[list[str], int]:
        return self._gallery.faces_of(name), self._gallery.revision
