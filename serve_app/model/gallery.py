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

import contextlib
import io
import json
import os
import pickle
import shutil
import struct
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from serve_app.model.gallery_faces import CODED_LENGTH as CODED_ID_WIDTH
from serve_app.model.gallery_faces import FaceTable
from serve_app.model.gallery_index import FaceIndex, IndexPolicy
from serve_app.model.gallery_rows import INITIAL_CAPACITY, RowStore

FORMAT_NAME = "facerec-gallery"
FORMAT_VERSION = 1
#: Candidate faces gathered first for each query (more only when they hold fewer than ``k`` people).
FIRST_DEPTH = 64
GALLERY_FILENAME = "gallery.npz"
#: Bytes copied at a time when a snapshot is written from a file.
COPY_BUFFER = 16 << 20
#: Faces read from a snapshot at a time (about 80 MB of a file's arrays).
READ_CHUNK = 1 << 17


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
    the last row (:class:`~serve_app.model.gallery_rows.RowStore`). Rows are named by keys that never change
    (:class:`~serve_app.model.gallery_faces.FaceTable` holds each key's face id and chip flag), and each row's
    owner is a person number: no Python object per face, so ten million faces fit a worker
    (see :attr:`nbytes`). A person's faces are found by scanning the row labels (a few milliseconds at ten
    million faces), which only gallery management does.

    ``half_rows_from`` keeps the rows in float16 from that many faces on (Recognizer replicas: half the memory,
    scores within about 1e-3); a gallery that writes snapshots keeps them float32.
    """

    def __init__(self, model_id: str, dim: int, half_rows_from: int | None = None) -> None:
        self.model_id = model_id
        self.dim = dim
        self.half_rows_from = half_rows_from
        self._store = RowStore(dim, half_rows_from=half_rows_from)
        self._faces = FaceTable()
        #: Person numbers, the row store's labels: a number is never reused while this gallery lives.
        self._person_number: dict[str, int] = {}
        self._person_name: list[str] = []
        self._face_count: list[int] = []  # by person number
        self._people = 0  # people with at least one face
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
        return self._store.n

    def person_count(self) -> int:
        """How many people have at least one face."""
        return self._people

    def people(self) -> dict[str, int]:
        """Each enrolled person with their number of faces, sorted by name."""
        return {name: count for name, count in sorted(zip(self._person_name, self._face_count, strict=True)) if count}

    def _rows_of_person(self, name: str) -> np.ndarray:
        """``name``'s rows, in the order their faces were enrolled."""
        number = self._person_number.get(name)
        if number is None or not self._face_count[number]:
            return np.empty(0, dtype=np.intp)
        rows = np.flatnonzero(self._store.labels == number)
        ordered: np.ndarray = rows[np.argsort(self._store.keys[rows], kind="stable")]
        return ordered

    def faces_of(self, name: str) -> list[str]:
        """The face ids enrolled for ``name`` (empty if unknown), in the order they were enrolled."""
        return self._faces.ids_of(self._store.keys[self._rows_of_person(name)])

    def face_records(self, name: str) -> list[tuple[str, bool]]:
        """``(face id, has a chip)`` for each face of ``name`` (empty if unknown)."""
        keys = self._store.keys[self._rows_of_person(name)]
        return list(zip(self._faces.ids_of(keys), self._faces.chips_of(keys).tolist(), strict=True))

    def faces(self) -> list[tuple[str, str, bool]]:
        """``(name, face id, has a chip)`` for every enrolled face, row by row (as :attr:`embeddings`)."""
        keys = self._store.keys
        return list(zip(self.names, self._faces.ids_of(keys), self._faces.chips_of(keys).tolist(), strict=True))

    def face_ids(self) -> set[str]:
        """Every enrolled face's id."""
        return set(self._faces.ids_of(self._store.keys))

    def _row_of(self, face_id: str) -> int | None:
        """The row of an enrolled face (``None``: not enrolled, or removed)."""
        key = self._faces.key_of(face_id)
        if key is None:
            return None
        row = self._store.row_of_key(key)
        return None if row < 0 else row

    def has_face(self, face_id: str) -> bool:
        return self._row_of(face_id) is not None

    def person_of(self, face_id: str) -> str | None:
        """The person ``face_id`` belongs to (``None`` if it is not enrolled)."""
        row = self._row_of(face_id)
        return None if row is None else self._person_name[int(self._store.labels[row])]

    @property
    def removed_ids(self) -> frozenset[str]:
        """The ids of every face ever removed from this gallery (they never return under the same id)."""
        return frozenset(self._removed)

    def was_removed(self, face_id: str) -> bool:
        return face_id in self._removed

    @property
    def embeddings(self) -> np.ndarray:
        """All enrolled embeddings in float32, row ``i`` belonging to ``names[i]`` (read-only; a copy where the
        rows are kept in float16)."""
        view = self._store.rows.view() if not self._store.in_half else self._store.rows.astype(np.float32)
        view.flags.writeable = False
        return view

    def embedding_of(self, face_id: str) -> np.ndarray:
        """One enrolled face's (normalised) embedding, a copy."""
        row = self._row_of(face_id)
        if row is None:
            raise KeyError(face_id)
        embedding: np.ndarray = self._store.exact_rows(np.array([row]))[0]
        return embedding

    @property
    def names(self) -> list[str]:
        return [self._person_name[label] for label in self._store.labels.tolist()]

    @property
    def rows_in_half(self) -> bool:
        """Whether the rows are kept in float16 (see ``half_rows_from``)."""
        return self._store.in_half

    @property
    def nbytes(self) -> int:
        """Bytes this gallery holds in arrays (rows with their spare capacity, per-face tables, the index)."""
        index = self._index.nbytes if self._index is not None else 0
        return self._store.nbytes + self._faces.nbytes + int(self._in_index.nbytes) + index

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
        self._append(self._labels_of(names), vectors, np.array(chips, dtype=bool), ids)
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
        staged = also_taken or (lambda _: False)

        def taken(face_id: str) -> bool:
            return self.has_face(face_id) or face_id in self._removed or staged(face_id)

        if face_ids is None:
            # 48 random bits: among ten million faces two would share one about once in six galleries, so a new
            # id is drawn again until it is one no face, tombstone or staged face has.
            fresh: dict[str, None] = {}
            while len(fresh) < len(vectors):
                face_id = uuid.uuid4().hex[:12]
                if face_id not in fresh and not taken(face_id):
                    fresh[face_id] = None
            ids = list(fresh)
        else:
            ids = [str(f) for f in face_ids]
            if len(ids) != len(vectors) or any(taken(f) for f in ids) or len(set(ids)) != len(ids):
                raise GalleryError(f"face ids must be {len(vectors)} new, distinct ids")
        return names, vectors, chips, ids

    def _number_of(self, name: str) -> int:
        number = self._person_number.get(name)
        if number is None:
            number = self._person_number[name] = len(self._person_name)
            self._person_name.append(name)
            self._face_count.append(0)
        return number

    def _labels_of(self, names: Sequence[str]) -> np.ndarray:
        return np.fromiter((self._number_of(name) for name in names), dtype=np.int32, count=len(names))

    def _append(
        self, labels: np.ndarray, vectors: np.ndarray, chips: np.ndarray, ids: Sequence[str] | np.ndarray
    ) -> None:
        """Append rows owned by person numbers ``labels``."""
        numbers, counts = np.unique(labels, return_counts=True)  # O(faces added), not O(people)
        for number, count in zip(numbers.tolist(), counts.tolist(), strict=True):
            if not self._face_count[number]:
                self._people += 1
            self._face_count[number] += count
        keys = self._store.append(vectors, labels)
        self._faces.append(int(keys[0]), ids, chips)
        if self._index is not None:
            if self._store.next_key > len(self._in_index):
                grown = np.zeros(max(self._store.next_key, 2 * len(self._in_index)), dtype=bool)
                grown[: len(self._in_index)] = self._in_index
                self._in_index = grown
            self._index.add(vectors, keys)
            self._in_index[keys] = True

    def remove_person(self, name: str) -> int:
        """Forget ``name`` entirely; returns how many faces were removed (0 if unknown)."""
        rows = self._rows_of_person(name)
        if len(rows):
            self._remove_rows(rows)
            self.revision += 1
        return len(rows)

    def remove_face(self, name: str, face_id: str) -> bool:
        """Forget one face of ``name``; ``True`` if it existed."""
        if self.person_of(face_id) != name:
            return False
        self._remove_rows(np.array([self._row_of(face_id)]))
        self.revision += 1
        return True

    def forget(self, face_ids: set[str] | frozenset[str]) -> int:
        """Remove these faces wherever they are, and remember every one of these ids as removed (also ids this
        gallery never had: another model's snapshot removed them); returns how many faces were removed."""
        rows = [row for row in (self._row_of(face_id) for face_id in face_ids) if row is not None]
        if rows:
            self._remove_rows(np.array(rows))
        if rows or not self._removed.issuperset(face_ids):
            self._removed.update(face_ids)
            self.revision += 1
        return len(rows)

    def _remove_rows(self, rows: np.ndarray) -> None:
        """Remove these rows (distinct), remembering their ids as removed; the index drops them in one pass."""
        keys = self._store.keys[rows].copy()
        self._removed.update(self._faces.ids_of(keys))
        for number in self._store.labels[rows].tolist():
            self._face_count[number] -= 1
            if not self._face_count[number]:
                self._people -= 1
        if self._index is not None:
            indexed = keys[self._in_index[keys]]
            self._index.remove(indexed)
            self._in_index[indexed] = False
        for key in keys.tolist():  # by key: a removal moves another row into the removed one's place
            self._store.remove(self._store.row_of_key(key))

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
        if not len(self):
            return [Match(None, -1.0, 0.0, ()) for _ in range(len(queries))]
        k = min(max(top_k, 2), self._people)
        store, labels = self._store, self._store.labels
        total = len(self)
        first_depth = min(total, max(FIRST_DEPTH, 8 * k))
        index = None if exact else self.index
        coarse: torch.Tensor | None = None
        if index is not None:
            found = index.search(queries, first_depth)
        else:
            with torch.inference_mode():
                coarse = store.coarse(queries)
        matches = []
        for row in range(len(queries)):
            depth = first_depth
            while True:
                if coarse is not None:
                    faces = torch.topk(coarse[row], depth, sorted=False).indices.numpy()
                else:
                    assert index is not None
                    keys = found[row] if depth == first_depth else index.search(queries[row : row + 1], depth)[0]
                    faces = store.rows_of_keys(keys[keys >= 0])
                scores = store.exact_rows(faces) @ queries[row]  # float32 scores of the candidates only
                order = np.argsort(-scores, kind="stable")
                best_of: dict[int, tuple[float, int]] = {}
                for face, score in zip(faces[order].tolist(), scores[order].tolist(), strict=True):
                    best_of.setdefault(int(labels[face]), (score, face))  # first seen is the person's best
                    if len(best_of) == k:
                        break
                if len(best_of) == k:
                    break
                if coarse is None and len(faces) < depth:
                    # The probed cells hold too few faces for this query: exact search answers it (at this depth
                    # first; also when the depth is every face already).
                    with torch.inference_mode():
                        coarse = store.coarse(queries)
                elif depth == total:
                    break
                else:
                    depth = min(total, depth * 4)
            ranked = list(best_of.items())
            best = ranked[0][1][0]
            second = ranked[1][1][0] if len(ranked) > 1 else -1.0
            candidates = tuple(
                Candidate(self._person_name[p], float(score), self._faces.id_of(int(store.keys[face])))
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
        if count >= len(self):
            return self._store.exact_rows(np.arange(len(self)))
        return self._store.exact_rows(np.sort(np.random.default_rng(0).choice(len(self), count, replace=False)))

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
        buffer = io.BytesIO()
        self.write_to(buffer)
        return buffer.getvalue()

    def write_to(self, target: IO[bytes] | Path) -> None:
        """Write the gallery in the documented ``.npz`` format to a file or stream, ``READ_CHUNK`` faces at a time:
        a writer compacting ten million faces holds its gallery and one chunk, not a second copy of it."""
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model_id": self.model_id,
            "dim": self.dim,
            "revision": self.revision,
        }
        # In the order faces were enrolled (rows in memory are not: a removal fills its row with the last one), so
        # a gallery read back lists everyone's faces as this one does.
        keys = np.sort(self._store.keys)
        person_names = np.array(self._person_name or [""], dtype=np.str_)
        id_width = max([CODED_ID_WIDTH, *(len(f) for f in self._faces.uncoded_ids())])

        def chunks(column: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Iterator[np.ndarray]:
            for start in range(0, len(keys), READ_CHUNK):
                chunk = keys[start : start + READ_CHUNK]
                yield column(chunk, self._store.rows_of_keys(chunk))

        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            write_member(archive, "meta", np.array(json.dumps(meta)))
            shape = (len(keys), self.dim)
            write_column(archive, "embeddings", np.dtype("<f4"), shape, chunks(lambda _, r: self._store.exact_rows(r)))
            write_column(
                archive,
                "names",
                person_names.dtype,
                (len(keys),),
                chunks(lambda _, r: person_names[self._store.labels[r]]),
            )
            write_column(
                archive,
                "face_ids",
                np.dtype(f"<U{id_width}"),
                (len(keys),),
                chunks(lambda k, _: np.array(self._faces.ids_of(k), dtype=f"<U{id_width}")),
            )
            chips = chunks(lambda k, _: self._faces.chips_of(k))
            write_column(archive, "has_chip", np.dtype(bool), (len(keys),), chips)
            write_member(archive, "removed_ids", np.array(sorted(self._removed), dtype=np.str_))

    @classmethod
    def from_bytes(
        cls, data: bytes, expected_model_id: str | None = None, half_rows_from: int | None = None
    ) -> Gallery:
        """Read a gallery written by :meth:`to_bytes`; refuse one made by another model than expected."""
        return cls.read_from(io.BytesIO(data), expected_model_id, half_rows_from)

    @classmethod
    def read_from(
        cls, source: IO[bytes] | Path, expected_model_id: str | None = None, half_rows_from: int | None = None
    ) -> Gallery:
        """Read a gallery from a ``.npz`` file or seekable stream, ``READ_CHUNK`` faces at a time: joining a gallery
        of ten million faces holds the gallery and one chunk, never the whole file's arrays beside it."""
        try:
            with zipfile.ZipFile(source) as archive:
                members = {name.removesuffix(".npy") for name in archive.namelist()}
                if not {"meta", "embeddings", "names", "face_ids"} <= members:
                    raise GalleryError(f"not a facerec gallery file: members {sorted(members)}")
                meta = json.loads(str(_read_member(archive, "meta")))
                if not isinstance(meta, dict):
                    raise GalleryError("not a facerec gallery file: no facerec meta")
                if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
                    raise GalleryError(f"unsupported gallery format {meta.get('format')!r} v{meta.get('version')}")
                if expected_model_id is not None and meta["model_id"] != expected_model_id:
                    raise ModelMismatchError(
                        f"the gallery was made by {meta['model_id']!r}, this service embeds with {expected_model_id!r}"
                    )
                gallery = cls(str(meta["model_id"]), int(meta["dim"]), half_rows_from)
                gallery._read_faces(archive, "has_chip" in members)
                removed = _read_member(archive, "removed_ids") if "removed_ids" in members else np.array([], dtype=str)
                gallery._removed = set(removed.tolist())
                gallery.revision = int(meta.get("revision", 0))
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, zipfile.BadZipFile) as exc:
            if isinstance(exc, GalleryError):
                raise
            raise GalleryError(f"not a facerec gallery file: {exc}") from exc
        return gallery

    def _read_faces(self, archive: zipfile.ZipFile, chips_stored: bool) -> None:
        """Read the faces of a snapshot into this (empty) gallery, a chunk at a time."""
        with (
            archive.open("embeddings.npy") as embeddings,
            archive.open("names.npy") as names,
            archive.open("face_ids.npy") as ids,
            archive.open("has_chip.npy") if chips_stored else contextlib.nullcontext() as chips,
        ):
            shape, embeddings_dtype = _npy_header(embeddings)
            count = shape[0]
            columns = [(names, "names"), (ids, "face ids")] + ([(chips, "chip flags")] if chips is not None else [])
            column_dtypes = []
            for stream, what in columns:
                column_shape, column_dtype = _npy_header(stream)
                if column_shape != (count,):
                    raise GalleryError(f"gallery file is inconsistent: {what} and embeddings differ in length")
                column_dtypes.append(column_dtype)
            if len(shape) != 2 or shape[1] != self.dim:
                raise GalleryError(f"gallery file is inconsistent: embeddings of shape {shape} for dim {self.dim}")
            self._store = RowStore(self.dim, capacity=max(INITIAL_CAPACITY, count), half_rows_from=self.half_rows_from)
            for start in range(0, count, READ_CHUNK):
                size = min(READ_CHUNK, count - start)
                vectors = np.asarray(_read_rows(embeddings, embeddings_dtype, size, self.dim), np.float32)
                chunk_names = _read_rows(names, column_dtypes[0], size)
                chunk_ids = _read_rows(ids, column_dtypes[1], size)
                chunk_chips = _read_rows(chips, column_dtypes[2], size) if chips is not None else np.zeros(size, bool)
                self._append(self._labels_of_column(chunk_names), vectors, chunk_chips, chunk_ids)
        if self._faces.duplicated():
            raise GalleryError("gallery file is inconsistent: a face id appears twice")

    def _labels_of_column(self, names: np.ndarray) -> np.ndarray:
        """Person numbers of a column of names, looked up once per run of equal names (a snapshot holds each
        person's faces together when they were enrolled together)."""
        labels = np.empty(len(names), dtype=np.int32)
        if not len(names):
            return labels
        starts = np.flatnonzero(np.concatenate([[True], names[1:] != names[:-1]]))
        ends = np.append(starts[1:], len(names))
        for start, end, name in zip(starts.tolist(), ends.tolist(), names[starts].tolist(), strict=True):
            labels[start:end] = self._number_of(str(name))
        return labels

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
        return cls.read_from(path, expected_model_id)

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


def snapshot_meta(source: bytes | Path | IO[bytes]) -> dict[str, object]:
    """A snapshot's ``meta`` (model id, dim, revision) without reading its embeddings (a stream is left where it
    was)."""
    try:
        if isinstance(source, bytes | Path):
            with np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
        else:
            at = source.tell()
            try:
                with zipfile.ZipFile(source) as archive:
                    meta = json.loads(str(_read_member(archive, "meta")))
            finally:
                source.seek(at)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise GalleryError(f"not a facerec gallery file: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise GalleryError("not a facerec gallery file: no facerec meta")
    return meta


def write_atomically(target: Path, data: bytes | IO[bytes], *, only_if_new: bool = False) -> bool:
    """Write to a temporary file beside ``target``, fsync it, then rename it over ``target``; with ``only_if_new``,
    hard-link it to ``target`` instead, which the file system refuses if ``target`` exists (``False``: nothing
    written). Readers see the old file or the new one, never half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                shutil.copyfileobj(data, handle, COPY_BUFFER)
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


def _member_info(name: str) -> zipfile.ZipInfo:
    # A fixed time stamp: the same gallery is the same bytes whenever it is written.
    return zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))


def write_member(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    """One whole array member of a snapshot (the documented format; also how benchmarks write a large base)."""
    with archive.open(_member_info(name), "w", force_zip64=True) as stream:
        np.lib.format.write_array(stream, array, allow_pickle=False)


def write_column(
    archive: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterator[np.ndarray]
) -> None:
    """An array member written a chunk at a time (``chunks`` in order, together ``shape``)."""
    with archive.open(_member_info(name), "w", force_zip64=True) as stream:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(stream, header)
        for chunk in chunks:
            stream.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def _read_member(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """One whole (small) array of a snapshot."""
    with archive.open(f"{name}.npy") as stream:
        array: np.ndarray = np.lib.format.read_array(stream, allow_pickle=False)
    return array


def _npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of the ``.npy`` array ``stream`` is at; leaves it at the array's first byte."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    if fortran_order or dtype.hasobject:
        raise GalleryError("not a facerec gallery file: an array is in Fortran order or holds objects")
    return tuple(shape), dtype


def _read_rows(stream: IO[bytes], dtype: np.dtype, count: int, width: int | None = None) -> np.ndarray:
    """The next ``count`` rows (of ``width`` items, or single items) of an array ``stream`` is in."""
    size = count * (width or 1) * dtype.itemsize
    data = stream.read(size)
    if len(data) != size:
        raise GalleryError("gallery file is truncated")
    rows = np.frombuffer(data, dtype=dtype)
    return rows.reshape(count, width) if width else rows


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise GalleryError("an embedding is all zeros")
    normalised: np.ndarray = (vectors / norms).astype(np.float32)
    return normalised
