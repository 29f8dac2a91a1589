"""The gallery: enrolled people, each with one or more face embeddings, and matching against them.

A person's similarity is that of their closest enrolled face, so several photos of one person widen the net
instead of averaging it away. Matching a batch of queries is one matrix product (queries x enrolled faces) to
find candidate faces, then exact float32 scores for those candidates only: the ``k`` best people are always
among the people of the ``k * most_faces`` best faces. The candidate product runs in float16 where that is
faster on this CPU (it halves the bytes read: about twice as fast at a million faces on an AVX-512 BF16 EPYC)
and in float32 where it is not (one query on an AMX Xeon, any query with kernels capped at AVX2): a large
gallery times both once per process (:func:`coarse_in_half`). The scores reported are always the float32 ones.

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

FORMAT_NAME = "facerec-gallery"
#: Below this many faces either candidate product takes well under a millisecond: float32, nothing timed.
TIMED_FROM_ROWS = 50_000
#: The query counts timed for the choice: one face, and a batch of them.
TIMED_QUERIES = (1, 16)
FORMAT_VERSION = 1
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
    """People and their embeddings for one embedding model. Not thread-safe: callers serialise mutations."""

    def __init__(self, model_id: str, dim: int) -> None:
        self.model_id = model_id
        self.dim = dim
        self._embeddings = np.empty((0, dim), dtype=np.float32)
        self._names: list[str] = []
        self._face_ids: list[str] = []
        self._has_chip: list[bool] = []
        self._removed: set[str] = set()
        self._index: _PersonIndex | None = None
        #: Increases with every change; shared copies compare revisions to know which is newer.
        self.revision = 0

    # --- contents -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of enrolled faces."""
        return len(self._names)

    def people(self) -> dict[str, int]:
        """Each enrolled person with their number of faces, sorted by name."""
        counts: dict[str, int] = {}
        for name in self._names:
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))

    def faces_of(self, name: str) -> list[str]:
        """The face ids enrolled for ``name`` (empty if unknown)."""
        return [fid for n, fid in zip(self._names, self._face_ids, strict=True) if n == name]

    def face_records(self, name: str) -> list[tuple[str, bool]]:
        """``(face id, has a chip)`` for each face of ``name`` (empty if unknown)."""
        return [
            (fid, chip) for n, fid, chip in zip(self._names, self._face_ids, self._has_chip, strict=True) if n == name
        ]

    def faces(self) -> list[tuple[str, str, bool]]:
        """``(name, face id, has a chip)`` for every enrolled face."""
        return list(zip(self._names, self._face_ids, self._has_chip, strict=True))

    def face_ids(self) -> set[str]:
        """Every enrolled face's id."""
        return set(self._face_ids)

    @property
    def removed_ids(self) -> frozenset[str]:
        """The ids of every face ever removed from this gallery (they never return under the same id)."""
        return frozenset(self._removed)

    @property
    def embeddings(self) -> np.ndarray:
        """A read-only view of all enrolled embeddings, row ``i`` belonging to ``names[i]``."""
        view = self._embeddings.view()
        view.flags.writeable = False
        return view

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
            taken = (set(ids) & (set(self._face_ids) | self._removed)) or (len(set(ids)) != len(ids))
            if len(ids) != len(vectors) or taken:
                raise GalleryError(f"face ids must be {len(vectors)} new, distinct ids")
        self._embeddings = np.concatenate([self._embeddings, vectors])
        self._names.extend(names)
        self._face_ids.extend(ids)
        self._has_chip.extend(chips)
        self._index = None
        self.revision += 1
        return ids

    def remove_person(self, name: str) -> int:
        """Forget ``name`` entirely; returns how many faces were removed (0 if unknown)."""
        return self._remove(lambda n, _fid: n == name)

    def remove_face(self, name: str, face_id: str) -> bool:
        """Forget one face of ``name``; ``True`` if it existed."""
        return self._remove(lambda n, fid: n == name and fid == face_id) == 1

    def forget(self, face_ids: set[str] | frozenset[str]) -> int:
        """Remove these faces wherever they are, and remember every one of these ids as removed (also ids this
        gallery never had: another model's snapshot removed them); returns how many faces were removed."""
        before = self.revision
        removed = self._remove(lambda _n, fid: fid in face_ids)
        if not self._removed.issuperset(face_ids):
            self._removed.update(face_ids)
            self.revision = before + 1
        return removed

    def _remove(self, doomed: Callable[[str, str], bool]) -> int:
        keep = [not doomed(n, f) for n, f in zip(self._names, self._face_ids, strict=True)]
        removed = len(keep) - sum(keep)
        if removed:
            self._removed.update(f for f, k in zip(self._face_ids, keep, strict=True) if not k)
            mask = np.asarray(keep, dtype=bool)
            self._embeddings = self._embeddings[mask]
            self._names = [n for n, k in zip(self._names, keep, strict=True) if k]
            self._face_ids = [f for f, k in zip(self._face_ids, keep, strict=True) if k]
            self._has_chip = [c for c, k in zip(self._has_chip, keep, strict=True) if k]
            self._index = None
            self.revision += 1
        return removed

    # --- matching -------------------------------------------------------------------------------------------
    def match(self, queries: np.ndarray, threshold: float, top_k: int = 3, min_margin: float = 0.0) -> list[Match]:
        """Match each row of ``queries`` (``(Q, dim)``, L2-normalised) against every enrolled person at once.

        A face is named when its best person reaches ``threshold`` and leads the second-best person by at least
        ``min_margin`` (a face between two people is nobody's for sure).
        """
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if len(queries) == 0:
            return []
        if not self._names:
            return [Match(None, -1.0, 0.0, ()) for _ in range(len(queries))]
        index = self._person_index()
        k = min(max(top_k, 2), len(index.people))
        depth = min(k * index.most_faces, len(self._names))
        with torch.inference_mode():
            rows = index.rows_for(len(queries))
            coarse = torch.nn.functional.linear(torch.from_numpy(queries).to(rows.dtype), rows)
            faces = torch.topk(coarse, depth, dim=1, sorted=False).indices.numpy()
        # Exact scores of the candidate faces only: (Q, depth).
        exact = np.einsum("qd,qkd->qk", queries, self._embeddings[faces])
        matches = []
        for row in range(len(queries)):
            order = np.argsort(-exact[row], kind="stable")
            best_of: dict[int, tuple[float, int]] = {}
            for face, score in zip(faces[row, order].tolist(), exact[row, order].tolist(), strict=True):
                best_of.setdefault(int(index.row_person[face]), (score, face))  # first seen is the person's best
                if len(best_of) == k:
                    break
            ranked = [(person, score) for person, (score, _) in best_of.items()]
            best = ranked[0][1]
            second = ranked[1][1] if len(ranked) > 1 else -1.0
            candidates = tuple(
                Candidate(index.people[p], float(score), self._face_ids[face])
                for p, (score, face) in list(best_of.items())[:top_k]
            )
            name = index.people[ranked[0][0]] if best >= threshold and best - second >= min_margin else None
            matches.append(Match(name, float(best), float(best - second), candidates))
        return matches

    def _person_index(self) -> _PersonIndex:
        if self._index is None:
            # Group the rows by person once per change, so matching needs no gather of the (N, dim) matrix.
            labels = np.asarray(self._names, dtype=np.str_)
            order = np.argsort(labels, kind="stable")
            self._embeddings = np.ascontiguousarray(self._embeddings[order])
            self._names = [self._names[i] for i in order]
            self._face_ids = [self._face_ids[i] for i in order]
            self._has_chip = [self._has_chip[i] for i in order]
            self._index = _PersonIndex.build(labels[order], self._embeddings)
        return self._index

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
        buffer = io.BytesIO()
        np.savez(
            buffer,
            meta=np.array(json.dumps(meta)),
            embeddings=self._embeddings,
            names=np.array(self._names, dtype=np.str_),
            face_ids=np.array(self._face_ids, dtype=np.str_),
            has_chip=np.array(self._has_chip, dtype=bool),
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
        gallery._embeddings, gallery._names, gallery._face_ids = embeddings, names, face_ids
        gallery._has_chip = has_chip if has_chip is not None else [False] * len(names)
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


#: Per process: (rows rounded up to a power of two, dim) -> whether float16 wins for one query and for a batch.
_HALF_WINS: dict[tuple[int, int], tuple[bool, bool]] = {}


def coarse_in_half(rows: torch.Tensor, half: torch.Tensor) -> tuple[bool, bool]:
    """Whether the float16 candidate product beats the float32 one on this CPU, for one query and for a batch.

    Measured, not assumed: float16 halves the bytes a product reads, but not every CPU has fast float16 kernels
    (on an AMX Xeon one query takes 29-33 ms in float16 against 23 ms in float32 at a million faces; with kernels
    capped at AVX2 a batch of 16 takes 190 ms against 69). Timed once per process and gallery size class, on the
    gallery's own rows (best of three, after a warm-up); both products give the same answers, as the candidates
    are re-scored in float32.
    """
    key = (1 << max(0, len(rows) - 1).bit_length(), rows.shape[1])
    if key not in _HALF_WINS:
        wins = []
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for count in TIMED_QUERIES:
                queries = torch.nn.functional.normalize(torch.randn(count, rows.shape[1], generator=generator), dim=1)
                best = {}
                for matrix in (rows, half):
                    probe = queries.to(matrix.dtype)
                    torch.nn.functional.linear(probe, matrix)
                    times = []
                    for _ in range(3):
                        started = time.perf_counter()
                        torch.nn.functional.linear(probe, matrix)
                        times.append(time.perf_counter() - started)
                    best[matrix.dtype] = min(times)
                wins.append(best[torch.float16] < best[torch.float32])
        _HALF_WINS[key] = (wins[0], wins[1])
    return _HALF_WINS[key]


@dataclass(frozen=True)
class _PersonIndex:
    """The rows grouped by person: who owns each row, and the rows for the coarse product (float32, and a float16
    copy where that is faster on this CPU)."""

    people: list[str]
    #: ``row_person[i]`` is the index in ``people`` of row ``i``'s person.
    row_person: np.ndarray
    #: Faces of the person with the most: the top ``k * most_faces`` faces always hold the top ``k`` people.
    most_faces: int
    #: The gallery's float32 rows (shared, not copied).
    rows: torch.Tensor
    #: A float16 copy for the query counts where it is faster (``None`` where it never is).
    rows_half: torch.Tensor | None
    #: Whether to use ``rows_half`` for one query, and for several.
    half_for: tuple[bool, bool]

    def rows_for(self, queries: int) -> torch.Tensor:
        if self.rows_half is not None and self.half_for[0 if queries == 1 else 1]:
            return self.rows_half
        return self.rows

    @classmethod
    def build(
        cls, sorted_labels: np.ndarray, rows: np.ndarray, half_for: tuple[bool, bool] | None = None
    ) -> _PersonIndex:
        """``half_for`` forces the choice of :func:`coarse_in_half` (tests); by default a gallery of at least
        ``TIMED_FROM_ROWS`` faces measures it and a smaller one uses float32."""
        change = np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1
        starts = np.concatenate([[0], change]).astype(np.intp)
        counts = np.diff(np.append(starts, len(sorted_labels)))
        rows32 = torch.from_numpy(rows)
        half: torch.Tensor | None = None
        if half_for is None:
            half_for = (False, False)
            if len(rows) >= TIMED_FROM_ROWS:
                half = rows32.to(torch.float16)
                half_for = coarse_in_half(rows32, half)
        if not any(half_for):
            half = None
        elif half is None:
            half = rows32.to(torch.float16)
        return cls(
            people=[str(sorted_labels[s]) for s in starts],
            row_person=np.repeat(np.arange(len(starts), dtype=np.intp), counts),
            most_faces=int(counts.max()),
            rows=rows32,
            rows_half=half,
            half_for=half_for,
        )


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


def write_atomically(target: Path, data: bytes) -> None:
    """Write to a temporary file beside ``target``, fsync it, then rename it over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise GalleryError("an embedding is all zeros")
    normalised: np.ndarray = (vectors / norms).astype(np.float32)
    return normalised
