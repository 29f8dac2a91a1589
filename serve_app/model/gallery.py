"""The gallery: enrolled people, each with one or more face embeddings, and matching against them.

A person's similarity is that of their closest enrolled face, so several photos of one person widen the net
instead of averaging it away. Matching a batch of queries is one matrix product (queries x enrolled faces, in
float16 where this CPU runs that faster: see :mod:`serve_app.model.gallery_rows`) to find candidate faces, then
exact float32 scores for those candidates only: the scores reported are always the float32 ones.

Serialised format (``gallery.npz``, see :meth:`Gallery.to_bytes`): a NumPy ``.npz`` archive, readable without
pickles, holding

* ``meta``: a JSON string ``{"format": "facerec-gallery", "version": 1, "model_id": ..., "dim": ...,
  "revision": ...}`` (``revision`` counts the changes made to the gallery since it was created);
* ``embeddings``: ``(N, dim)`` float32, L2-normalised rows;
* ``names``: ``(N,)`` unicode, the person each row belongs to;
* ``face_ids``: ``(N,)`` unicode, a stable id per enrolled face (for removing one face);
* ``has_chip``: ``(N,)`` bool, whether the face's chip (the aligned crop that was embedded, a JPEG stored beside
  the snapshot as ``chips/<face_id>.jpg``, see :mod:`serve_app.gallery_store`) exists. Optional: a snapshot
  written before chips existed, or imported from the legacy app tier, has none, and reads as all ``False``;
* ``removed_ids``: ``(R,)`` unicode, the ids of faces removed from this gallery (tombstones). Optional. A model
  change carries faces from one model's snapshot to another's by face id (:mod:`serve_app.model.reembedding`):
  a removed face must stay removed there too, and never come back from a snapshot that still has it.

Embeddings from different checkpoints are not comparable, so a gallery records its ``model_id`` and refuses
embeddings or files made by another model.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from serve_app.model.gallery_index import FaceIndex, IndexPolicy
from serve_app.model.gallery_rows import INITIAL_CAPACITY, RowStore

FORMAT_NAME = "facerec-gallery"
FORMAT_VERSION = 1
#: Candidate faces gathered first for each query (more only when they hold fewer than ``k`` people).
FIRST_DEPTH = 64
GALLERY_FILENAME = "gallery.npz"


class GalleryError(ValueError):
    """A gallery operation or file is invalid (wrong model, wrong shape, unknown person, corrupt file)."""


class ModelMismatchError(GalleryError):
    """Embeddings or a gallery file from another checkpoint: they live in a different space."""


@dataclass(frozen=True)
class Candidate:
    name: str
    similarity: float
    #: The person's closest enrolled face (the one whose chip shows why they are a candidate).
    face_id: str = ""


@dataclass(frozen=True)
class Match:
    """The answer for one query embedding."""

    #: The best person if their similarity reaches the threshold, else ``None`` (unknown).
    name: str | None
    #: Cosine similarity to the best person's closest face (``-1.0`` on an empty gallery).
    similarity: float
    #: Best minus second-best person's similarity: how clear-cut the answer is (``similarity + 1`` with one person).
    margin: float
    #: The ``top_k`` closest people, best first, whether or not they pass the threshold.
    candidates: tuple[Candidate, ...]


class Gallery:
    """People and their embeddings for one embedding model. Not thread-safe: callers serialise mutations.

    A change costs what it changes: faces are appended into spare capacity and a removed face's row is filled by
    the last row (:class:`~serve_app.model.gallery_rows.RowStore`), and the lookups (face id -> row, person ->
    faces) are kept up to date with it. Matching needs no regrouping of the rows after a change.
    """

    def __init__(self, model_id: str, dim: int) -> None:
        self.model_id = model_id
        self.dim = dim
        self._store = RowStore(dim)
        # Per row, in step with the row store.
        self._names: list[str] = []
        self._face_ids: list[str] = []
        self._has_chip: list[bool] = []
        self._row_of: dict[str, int] = {}
        #: Each person's face ids in the order they were enrolled (a dict as an ordered set).
        self._faces_of: dict[str, dict[str, None]] = {}
        #: Person numbers, the row store's labels: a number is never reused while this gallery lives.
        self._person_number: dict[str, int] = {}
        self._person_name: list[str] = []
        self._removed: set[str] = set()
        #: Increases with every change; shared copies compare revisions to know which is newer.
        self.revision = 0
        # An approximate index over a large gallery (see :mod:`serve_app.model.gallery_index`): by key, whether
        # the key's row is in it yet, and how far its filling has come.
        self._index: FaceIndex | None = None
        self._in_index = np.zeros(0, dtype=bool)
        self._fill_cursor = 0
        self._index_considered_at = 0

    # --- contents -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of enrolled faces."""
        return len(self._names)

    def person_count(self) -> int:
        """How many people have at least one face."""
        return len(self._faces_of)

    def people(self) -> dict[str, int]:
        """Each enrolled person with their number of faces, sorted by name."""
        return {name: len(faces) for name, faces in sorted(self._faces_of.items())}

    def faces_of(self, name: str) -> list[str]:
        """The face ids enrolled for ``name`` (empty if unknown), in the order they were enrolled."""
        return list(self._faces_of.get(name, ()))

    def face_records(self, name: str) -> list[tuple[str, bool]]:
        """``(face id, has a chip)`` for each face of ``name`` (empty if unknown)."""
        return [(fid, self._has_chip[self._row_of[fid]]) for fid in self._faces_of.get(name, ())]

    def faces(self) -> list[tuple[str, str, bool]]:
        """``(name, face id, has a chip)`` for every enrolled face."""
        return list(zip(self._names, self._face_ids, self._has_chip, strict=True))

    def face_ids(self) -> set[str]:
        """Every enrolled face's id."""
        return set(self._row_of)

    def has_face(self, face_id: str) -> bool:
        return face_id in self._row_of

    def person_of(self, face_id: str) -> str | None:
        """The person ``face_id`` belongs to (``None`` if it is not enrolled)."""
        row = self._row_of.get(face_id)
        return None if row is None else self._names[row]

    @property
    def removed_ids(self) -> frozenset[str]:
        """The ids of every face ever removed from this gallery (they never return under the same id)."""
        return frozenset(self._removed)

    def was_removed(self, face_id: str) -> bool:
        return face_id in self._removed

    @property
    def embeddings(self) -> np.ndarray:
        """A read-only view of all enrolled embeddings, row ``i`` belonging to ``names[i]``."""
        view = self._store.rows.view()
        view.flags.writeable = False
        return view

    def embedding_of(self, face_id: str) -> np.ndarray:
        """One enrolled face's (normalised) embedding, a copy."""
        return np.array(self._store.rows[self._row_of[face_id]])

    @property
    def names(self) -> list[str]:
        return list(self._names)

    # --- mutation -------------------------------------------------------------------------------------------
    def add(
        self,
        name: str,
        embeddings: np.ndarray,
        model_id: str,
        has_chip: Sequence[bool] | None = None,
        face_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Enrol ``embeddings`` (``(k, dim)``) for ``name``; returns the new face ids. ``has_chip`` says which of
        them get a chip stored under their new id (the caller stores it before this snapshot is written).
        ``face_ids`` keeps the ids the faces already have in another model's snapshot (re-embedding)."""
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
        """:meth:`add` for faces of several people at once (``names[i]`` owns row ``i``): one change, one copy of
        the embeddings however many people (a re-embedding adds thousands)."""
        names, vectors, chips, ids = self.checked_faces(names, embeddings, model_id, has_chip, face_ids)
        self._append(names, vectors, chips, ids)
        self.revision += 1
        return ids

    def checked_faces(
        self,
        names: Sequence[str],
        embeddings: np.ndarray,
        model_id: str,
        has_chip: Sequence[bool] | None = None,
        face_ids: Sequence[str] | None = None,
        also_taken: Callable[[str], bool] | None = None,
    ) -> tuple[list[str], np.ndarray, list[bool], list[str]]:
        """What :meth:`add_faces` would add (names, normalised rows, chip flags, new face ids), checked, without
        adding it; ``also_taken`` marks further ids as used (changes staged but not applied yet)."""
        if model_id != self.model_id:
            raise ModelMismatchError(f"embeddings from {model_id!r} cannot join a gallery of {self.model_id!r}")
        names = [name.strip() for name in names]
        if not all(names):
            raise GalleryError("a person's name must not be empty")
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] != self.dim:
            raise GalleryError(f"expected embeddings of shape (k, {self.dim}), got {vectors.shape}")
        if len(names) != len(vectors):
            raise GalleryError(f"{len(names)} names for {len(vectors)} embeddings")
        if not np.all(np.isfinite(vectors)):
            raise GalleryError("embeddings must be finite")
        vectors = _normalise(vectors)
        chips = [False] * len(vectors) if has_chip is None else [bool(c) for c in has_chip]
        if len(chips) != len(vectors):
            raise GalleryError(f"{len(chips)} chip flags for {len(vectors)} embeddings")
        if face_ids is None:
            ids = [uuid.uuid4().hex[:12] for _ in range(len(vectors))]
        else:
            ids = [str(f) for f in face_ids]
            staged = also_taken or (lambda _: False)
            taken = any(f in self._row_of or f in self._removed or staged(f) for f in ids)
            if len(ids) != len(vectors) or taken or len(set(ids)) != len(ids):
                raise GalleryError(f"face ids must be {len(vectors)} new, distinct ids")
        return names, vectors, chips, ids

    def _append(self, names: list[str], vectors: np.ndarray, chips: list[bool], ids: list[str]) -> None:
        labels = np.empty(len(names), dtype=np.int64)
        for i, (name, face_id) in enumerate(zip(names, ids, strict=True)):
            number = self._person_number.get(name)
            if number is None:
                number = self._person_number[name] = len(self._person_name)
                self._person_name.append(name)
            labels[i] = number
            self._row_of[face_id] = len(self._names) + i
            self._faces_of.setdefault(name, {})[face_id] = None
        keys = self._store.append(vectors, labels)
        if self._index is not None:
            if self._store.next_key > len(self._in_index):
                grown = np.zeros(max(self._store.next_key, 2 * len(self._in_index)), dtype=bool)
                grown[: len(self._in_index)] = self._in_index
                self._in_index = grown
            self._index.add(vectors, keys)
            self._in_index[keys] = True
        self._names.extend(names)
        self._face_ids.extend(ids)
        self._has_chip.extend(chips)

    def remove_person(self, name: str) -> int:
        """Forget ``name`` entirely; returns how many faces were removed (0 if unknown)."""
        doomed = self.faces_of(name)
        for face_id in doomed:
            self._remove_row(face_id)
        if doomed:
            self.revision += 1
        return len(doomed)

    def remove_face(self, name: str, face_id: str) -> bool:
        """Forget one face of ``name``; ``True`` if it existed."""
        if face_id not in self._faces_of.get(name, ()):
            return False
        self._remove_row(face_id)
        self.revision += 1
        return True

    def forget(self, face_ids: set[str] | frozenset[str]) -> int:
        """Remove these faces wherever they are, and remember every one of these ids as removed (also ids this
        gallery never had: another model's snapshot removed them); returns how many faces were removed."""
        present = [face_id for face_id in face_ids if face_id in self._row_of]
        for face_id in present:
            self._remove_row(face_id)
        if present or not self._removed.issuperset(face_ids):
            self._removed.update(face_ids)
            self.revision += 1
        return len(present)

    def _remove_row(self, face_id: str) -> None:
        row = self._row_of.pop(face_id)
        name = self._names[row]
        faces = self._faces_of[name]
        del faces[face_id]
        if not faces:
            del self._faces_of[name]
        self._removed.add(face_id)
        key = self._store.keys[row]
        if self._index is not None and self._in_index[key]:
            self._index.remove(np.array([key]))
            self._in_index[key] = False
        moved = self._store.remove(row)
        last = len(self._names) - 1
        if moved is not None:
            self._names[row], self._face_ids[row], self._has_chip[row] = (
                self._names[last],
                self._face_ids[last],
                self._has_chip[last],
            )
            self._row_of[self._face_ids[row]] = row
        del self._names[last], self._face_ids[last], self._has_chip[last]

    # --- matching -------------------------------------------------------------------------------------------
    def match(
        self, queries: np.ndarray, threshold: float, top_k: int = 3, min_margin: float = 0.0, *, exact: bool = False
    ) -> list[Match]:
        """Match each row of ``queries`` (``(Q, dim)``, L2-normalised) against every enrolled person at once.

        A face is named when its best person reaches ``threshold`` and leads the second-best person by at least
        ``min_margin`` (a face between two people is nobody's for sure).

        A person's score is that of their closest face, so the ``k`` best people are the first ``k`` distinct
        people among the faces in order of score. Candidate faces are gathered to a depth that starts small and
        grows (by four) only for a query whose candidates hold fewer than ``k`` people, so one person with
        thousands of faces costs only the queries that are closest to that person.

        With an index (:attr:`index`) the candidates come from it, unless ``exact``; they are scored exactly either
        way.
        """
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if len(queries) == 0:
            return []
        if not self._names:
            return [Match(None, -1.0, 0.0, ()) for _ in range(len(queries))]
        k = min(max(top_k, 2), len(self._faces_of))
        rows, labels = self._store.rows, self._store.labels
        first_depth = min(len(rows), max(FIRST_DEPTH, 8 * k))
        index = None if exact else self.index
        coarse: torch.Tensor | None = None
        if index is not None:
            found = index.search(queries, first_depth)
        else:
            with torch.inference_mode():
                coarse = self._store.coarse(queries)
        matches = []
        for row in range(len(queries)):
            depth = first_depth
            while True:
                if coarse is not None:
                    faces = torch.topk(coarse[row], depth, sorted=False).indices.numpy()
                else:
                    assert index is not None
                    keys = found[row] if depth == first_depth else index.search(queries[row : row + 1], depth)[0]
                    faces = self._store.rows_of_keys(keys[keys >= 0])
                scores = rows[faces] @ queries[row]  # exact float32 scores of the candidates only
                order = np.argsort(-scores, kind="stable")
                best_of: dict[int, tuple[float, int]] = {}
                for face, score in zip(faces[order].tolist(), scores[order].tolist(), strict=True):
                    best_of.setdefault(int(labels[face]), (score, face))  # first seen is the person's best
                    if len(best_of) == k:
                        break
                if len(best_of) == k or depth == len(rows):
                    break
                if coarse is None and len(faces) < depth:
                    # The probed cells hold too few people for this query: exact search answers it.
                    with torch.inference_mode():
                        coarse = self._store.coarse(queries)
                depth = min(len(rows), depth * 4)
            ranked = list(best_of.items())
            best = ranked[0][1][0]
            second = ranked[1][1][0] if len(ranked) > 1 else -1.0
            candidates = tuple(
                Candidate(self._person_name[p], float(score), self._face_ids[face])
                for p, (score, face) in ranked[:top_k]
            )
            name = self._person_name[ranked[0][0]] if best >= threshold and best - second >= min_margin else None
            matches.append(Match(name, float(best), float(best - second), candidates))
        return matches

    # --- the approximate index (built by :func:`serve_app.model.gallery_index.build_index`) --------------------
    @property
    def index(self) -> FaceIndex | None:
        """The approximate index matching uses (``None``: exact search; also while one is being filled)."""
        return self._index if self._index is not None and self._index.complete else None

    def index_due(self, policy: IndexPolicy) -> bool:
        """Whether to consider an index now: large enough, none yet, and not yet considered at this size class
        (a gallery that was fast enough is timed again when its size doubles)."""
        return (
            len(self) >= policy.considered_from
            and self._index is None
            and self._size_class() != self._index_considered_at
        )

    def index_considered(self) -> None:
        """An index was considered at this size (see :meth:`index_due`)."""
        self._index_considered_at = self._size_class()

    def _size_class(self) -> int:
        return 1 << max(0, len(self) - 1).bit_length()

    def exact_query_seconds(self) -> float:
        """One query's exact matching time on this gallery (best of three after a warm-up)."""
        query = _normalise(np.random.default_rng(0).standard_normal((1, self.dim)).astype(np.float32))
        times = []
        for attempt in range(4):
            started = time.perf_counter()
            self.match(query, threshold=1.0, exact=True)
            if attempt:
                times.append(time.perf_counter() - started)
        return min(times)

    def sample_rows(self, count: int) -> np.ndarray:
        """A copy of ``count`` rows drawn at random (all rows when there are fewer)."""
        rows = self._store.rows
        if count >= len(rows):
            return np.array(rows)
        return rows[np.sort(np.random.default_rng(0).choice(len(rows), count, replace=False))]

    def attach_index(self, index: FaceIndex) -> None:
        """Mirror every change into ``index`` from now on; :meth:`fill_index` adds the rows there already."""
        self._index = index
        self._in_index = np.zeros(max(1, self._store.next_key), dtype=bool)
        self._fill_cursor = 0

    def fill_index(self, chunk: int) -> bool:
        """Add up to ``chunk`` more rows to the attached index; ``True`` once every row is in it (then it is
        complete, and matching uses it). A removal may move a row not yet added below the cursor: the last step
        checks every row."""
        index = self._index
        if index is None or index.complete:
            return True
        stop = min(self._fill_cursor + chunk, len(self))
        if stop < len(self):
            span = slice(self._fill_cursor, stop)
            self._fill_cursor = stop
        else:
            span = slice(0, len(self))
        keys = self._store.keys[span]
        missing = ~self._in_index[keys]
        index.add(self._store.rows[span][missing], keys[missing])
        self._in_index[keys[missing]] = True
        index.complete = stop >= len(self)
        if index.complete:
            self._store.drop_half()  # candidates come from the index now: 2 bytes a coordinate saved
        return index.complete

    @property
    def coarse_in_half_for(self) -> tuple[bool, bool]:
        """Whether matching runs its candidate product in float16 for one query, and for a batch."""
        return self._store.half_for

    # --- persistence ----------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The gallery in the documented ``.npz`` format."""
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_id": self.model_id,
            "dim": self.dim,
            "revision": self.revision,
        }
        # Person by person, each person's faces in the order they were enrolled (rows in memory are not: a removal
        # fills its row with the last one), so a gallery read back lists everyone's faces as this one does.
        order = np.fromiter(
            (self._row_of[face_id] for faces in self._faces_of.values() for face_id in faces),
            dtype=np.intp,
            count=len(self._names),
        )
        buffer = io.BytesIO()
        np.savez(
            buffer,
            meta=np.array(json.dumps(meta)),
            embeddings=self._store.rows[order],
            names=np.array([self._names[row] for row in order], dtype=np.str_),
            face_ids=np.array([self._face_ids[row] for row in order], dtype=np.str_),
            has_chip=np.array([self._has_chip[row] for row in order], dtype=bool),
            removed_ids=np.array(sorted(self._removed), dtype=np.str_),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, expected_model_id: str | None = None) -> Gallery:
        """Read a gallery written by :meth:`to_bytes`; refuse one made by another model than expected."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                embeddings = np.asarray(archive["embeddings"], dtype=np.float32)
                names = [str(n) for n in archive["names"]]
                face_ids = [str(f) for f in archive["face_ids"]]
                has_chip = [bool(c) for c in archive["has_chip"]] if "has_chip" in archive.files else None
                removed = {str(f) for f in archive["removed_ids"]} if "removed_ids" in archive.files else set()
        except (OSError, ValueError, KeyError) as exc:
            raise GalleryError(f"not a facerec gallery file: {exc}") from exc
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise GalleryError(f"unsupported gallery format {meta.get('format')!r} v{meta.get('version')}")
        if expected_model_id is not None and meta["model_id"] != expected_model_id:
            raise ModelMismatchError(
                f"the gallery was made by {meta['model_id']!r}, this service embeds with {expected_model_id!r}"
            )
        gallery = cls(str(meta["model_id"]), int(meta["dim"]))
        if embeddings.shape != (len(names), gallery.dim) or len(face_ids) != len(names):
            raise GalleryError("gallery file is inconsistent: embeddings, names and face ids differ in length")
        if has_chip is not None and len(has_chip) != len(names):
            raise GalleryError("gallery file is inconsistent: chip flags and names differ in length")
        if len(set(face_ids)) != len(face_ids):
            raise GalleryError("gallery file is inconsistent: a face id appears twice")
        gallery._store = RowStore(gallery.dim, capacity=max(INITIAL_CAPACITY, len(names)))
        gallery._append(names, embeddings, has_chip if has_chip is not None else [False] * len(names), face_ids)
        gallery._removed = removed
        gallery.revision = int(meta.get("revision", 0))
        return gallery

    def save(self, directory: Path) -> Path:
        """Write ``directory/gallery.npz`` atomically: readers see the old file or the new one, never half."""
        target = directory / GALLERY_FILENAME
        write_atomically(target, self.to_bytes())
        return target

    @classmethod
    def load(cls, directory: Path, expected_model_id: str | None = None) -> Gallery:
        """Read ``directory/gallery.npz`` (see :meth:`from_bytes`)."""
        path = directory / GALLERY_FILENAME
        if not path.is_file():
            raise GalleryError(f"no gallery at {path}")
        return cls.from_bytes(path.read_bytes(), expected_model_id)

    @classmethod
    def import_legacy(cls, path: Path, model_id: str) -> Gallery:
        """Import the legacy app tier's ``data.pt``: a pair ``(list of embeddings, list of names)``.

        The file does not say which checkpoint made its embeddings; ``model_id`` must name it, and the result
        only matches queries embedded by that same checkpoint.
        """
        import torch  # local: the rest of the gallery needs no torch

        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            embeddings, names = loaded
            vectors = np.stack([np.asarray(torch.as_tensor(e).detach().float()).reshape(-1) for e in embeddings])
        except (OSError, RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError, struct.error) as exc:
            raise GalleryError(f"{path} is not a legacy (embeddings, names) file: {exc}") from exc
        if len(vectors) != len(names):
            raise GalleryError(f"{path}: {len(vectors)} embeddings but {len(names)} names")
        gallery = cls(model_id, int(vectors.shape[1]))
        for name in dict.fromkeys(str(n) for n in names):
            rows = [i for i, n in enumerate(names) if str(n) == name]
            gallery.add(name, vectors[rows], model_id)
        return gallery


def snapshot_meta(source: bytes | Path) -> dict[str, object]:
    """A snapshot's ``meta`` (model id, dim, revision) without reading its embeddings."""
    try:
        with np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
    except (OSError, ValueError, KeyError) as exc:
        raise GalleryError(f"not a facerec gallery file: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise GalleryError("not a facerec gallery file: no facerec meta")
    return meta


def write_atomically(target: Path, data: bytes, *, only_if_new: bool = False) -> bool:
    """Write to a temporary file beside ``target``, fsync it, then rename it over ``target``; with ``only_if_new``,
    hard-link it to ``target`` instead, which the file system refuses if ``target`` exists (``False``: nothing
    written). Readers see the old file or the new one, never half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not only_if_new:
            Path(tmp).replace(target)
            return True
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)  # the name that stays is the target's
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise GalleryError("an embedding is all zeros")
    normalised: np.ndarray = (vectors / norms).astype(np.float32)
    return normalised
