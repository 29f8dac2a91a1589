"""One change to a gallery, as it is stored and applied: faces removed, then faces added, and the revision it makes.

The store keeps a model's gallery as a base snapshot plus the changes made since (see
:mod:`serve_app.gallery_store`): the GalleryWriter stages several enrolments and removals into one change
(:class:`StagedChange`, a group commit), writes it as one small object that exists only once per revision, and
then applies it to its own copy; Recognizer replicas apply the same change to theirs. A change holds only what it
changes (a face's embedding, name, id and chip flag, or a removed face's id), so its cost does not grow with the
gallery.

Serialised format (``<revision>.npz`` in the model's ``changes`` folder): a NumPy ``.npz`` archive without pickles
holding ``meta`` (JSON ``{"format": "facerec-gallery-change", "version": 1, "model_id", "dim", "revision"}``),
``removed_ids`` ``(R,)``, and the added faces' ``names``, ``face_ids`` ``(A,)``, ``has_chip`` ``(A,)`` and
``embeddings`` ``(A, dim)`` float32 (L2-normalised).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from serve_app.model.gallery import Gallery, GalleryError, ModelMismatchError

CHANGE_FORMAT = "facerec-gallery-change"
CHANGE_VERSION = 1


@dataclass(frozen=True)
class GalleryChange:
    """Faces removed (by id) and faces added; applied to a gallery at ``revision - 1`` it makes ``revision``."""

    model_id: str
    dim: int
    revision: int
    removed_ids: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    face_ids: tuple[str, ...] = ()
    has_chip: tuple[bool, ...] = ()
    embeddings: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))

    @property
    def added(self) -> int:
        return len(self.face_ids)

    def to_bytes(self) -> bytes:
        meta = {
            "format": CHANGE_FORMAT,
            "version": CHANGE_VERSION,
            "model_id": self.model_id,
            "dim": self.dim,
            "revision": self.revision,
        }
        buffer = io.BytesIO()
        np.savez(
            buffer,
            meta=np.array(json.dumps(meta)),
            removed_ids=np.array(self.removed_ids, dtype=np.str_),
            names=np.array(self.names, dtype=np.str_),
            face_ids=np.array(self.face_ids, dtype=np.str_),
            has_chip=np.array(self.has_chip, dtype=bool),
            embeddings=np.asarray(self.embeddings, dtype=np.float32).reshape(len(self.face_ids), self.dim),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> GalleryChange:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                change = cls(
                    model_id=str(meta["model_id"]),
                    dim=int(meta["dim"]),
                    revision=int(meta["revision"]),
                    removed_ids=tuple(str(f) for f in archive["removed_ids"]),
                    names=tuple(str(n) for n in archive["names"]),
                    face_ids=tuple(str(f) for f in archive["face_ids"]),
                    has_chip=tuple(bool(c) for c in archive["has_chip"]),
                    embeddings=np.asarray(archive["embeddings"], dtype=np.float32),
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GalleryError(f"not a facerec gallery change: {exc}") from exc
        if meta.get("format") != CHANGE_FORMAT or meta.get("version") != CHANGE_VERSION:
            raise GalleryError(f"unsupported gallery change format {meta.get('format')!r} v{meta.get('version')}")
        sizes = {len(change.names), len(change.face_ids), len(change.has_chip), len(change.embeddings)}
        shape_ok = change.embeddings.ndim == 2 and change.embeddings.shape[1] == change.dim
        if len(sizes) != 1 or (change.added and not shape_ok):
            raise GalleryError("gallery change is inconsistent: names, ids, chip flags and embeddings differ")
        return change


def apply_change(gallery: Gallery, change: GalleryChange) -> None:
    """Apply ``change`` to ``gallery`` (which must be at ``change.revision - 1``), in place."""
    if change.model_id != gallery.model_id:
        raise ModelMismatchError(f"a change of {change.model_id!r} cannot apply to a gallery of {gallery.model_id!r}")
    if change.revision != gallery.revision + 1:
        raise GalleryError(f"change {change.revision} cannot follow revision {gallery.revision}")
    gallery.forget(frozenset(change.removed_ids))
    # Faces already there (or removed since) are left as they are: applying a change twice changes nothing twice.
    fresh = [i for i, f in enumerate(change.face_ids) if not gallery.has_face(f) and not gallery.was_removed(f)]
    if fresh:
        gallery.add_faces(
            [change.names[i] for i in fresh],
            change.embeddings[fresh],
            gallery.model_id,
            has_chip=[change.has_chip[i] for i in fresh],
            face_ids=[change.face_ids[i] for i in fresh],
        )
    gallery.revision = change.revision


class StagedChange:
    """Enrolments and removals staged on top of a gallery without changing it, to be stored as one change.

    It answers what the gallery *would* hold (faces, removed ids), so that several requests staged together see
    each other (an enrolment then a removal of the same person), and :meth:`checkpoint` / :meth:`rollback` undo
    one request's part when it fails without touching the others'.
    """

    def __init__(self, gallery: Gallery) -> None:
        self.gallery = gallery
        self.model_id = gallery.model_id
        self._added: dict[str, tuple[str, bool, np.ndarray]] = {}  # face id -> (name, chip, normalised row)
        self._removed: dict[str, None] = {}  # ordered set of removed ids

    # --- what the gallery would hold ------------------------------------------------------------------------
    def _present(self, face_id: str) -> bool:
        if face_id in self._added:
            return True
        return self.gallery.has_face(face_id) and face_id not in self._removed

    def face_ids(self) -> set[str]:
        return (self.gallery.face_ids() - set(self._removed)) | set(self._added)

    @property
    def removed_ids(self) -> frozenset[str]:
        return self.gallery.removed_ids | frozenset(self._removed)

    def face_records(self, name: str) -> list[tuple[str, bool]]:
        kept = [(f, chip) for f, chip in self.gallery.face_records(name) if f not in self._removed]
        return kept + [(f, chip) for f, (n, chip, _) in self._added.items() if n == name]

    def faces_of(self, name: str) -> list[str]:
        return [face_id for face_id, _ in self.face_records(name)]

    @property
    def empty(self) -> bool:
        return not self._added and not self._removed

    # --- changes --------------------------------------------------------------------------------------------
    def add(
        self,
        name: str,
        embeddings: np.ndarray,
        model_id: str,
        has_chip: Sequence[bool] | None = None,
        face_ids: Sequence[str] | None = None,
    ) -> list[str]:
        vectors = np.asarray(embeddings, dtype=np.float32)
        count = 1 if vectors.ndim == 1 else len(vectors)
        return self.add_faces([name] * count, vectors, model_id, has_chip, face_ids)

    def add_faces(
        self,
        names: Sequence[str],
        embeddings: np.ndarray,
        model_id: str,
        has_chip: Sequence[bool] | None = None,
        face_ids: Sequence[str] | None = None,
    ) -> list[str]:
        checked_names, vectors, chips, ids = self.gallery.checked_faces(
            names, embeddings, model_id, has_chip, face_ids, also_taken=lambda f: f in self._added or f in self._removed
        )
        for name, face_id, chip, row in zip(checked_names, ids, chips, vectors, strict=True):
            self._added[face_id] = (name, chip, row)
        return ids

    def remove_person(self, name: str) -> int:
        doomed = self.faces_of(name)
        for face_id in doomed:
            self._remove(face_id)
        return len(doomed)

    def remove_face(self, name: str, face_id: str) -> bool:
        if face_id not in self.faces_of(name):
            return False
        self._remove(face_id)
        return True

    def forget(self, face_ids: set[str] | frozenset[str]) -> int:
        present = [face_id for face_id in face_ids if self._present(face_id)]
        for face_id in face_ids:
            if not self.gallery.was_removed(face_id):  # not removed_ids: a copy of every tombstone per id
                self._remove(face_id)
        return len(present)

    def _remove(self, face_id: str) -> None:
        # A face added and removed in one change is not added, but its id stays used (a tombstone) all the same.
        self._added.pop(face_id, None)
        self._removed[face_id] = None

    # --- one request's part -----------------------------------------------------------------------------------
    def checkpoint(self) -> tuple[dict[str, tuple[str, bool, np.ndarray]], dict[str, None]]:
        return dict(self._added), dict(self._removed)

    def rollback(self, checkpoint: tuple[dict[str, tuple[str, bool, np.ndarray]], dict[str, None]]) -> None:
        self._added, self._removed = dict(checkpoint[0]), dict(checkpoint[1])

    def change(self, revision: int) -> GalleryChange:
        """The staged changes as the change that makes ``revision``."""
        added = list(self._added.items())
        rows = np.stack([row for _, (_, _, row) in added]) if added else np.empty((0, self.gallery.dim), np.float32)
        return GalleryChange(
            model_id=self.model_id,
            dim=self.gallery.dim,
            revision=revision,
            removed_ids=tuple(self._removed),
            names=tuple(name for _, (name, _, _) in added),
            face_ids=tuple(face_id for face_id, _ in added),
            has_chip=tuple(chip for _, (_, chip, _) in added),
            embeddings=rows,
        )
