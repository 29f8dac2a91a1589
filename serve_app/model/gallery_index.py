"""An approximate index over a large gallery's faces (faiss: an inverted file of 8-bit rows), built beside it.

Exact matching reads every enrolled face per query: 26 ms at a million faces on a 2-core AVX-512 EPYC, ten times
that at ten million. Past the point where it takes longer than :attr:`IndexPolicy.budget_s`, a replica builds an
IVF index (faiss ``IndexIVFScalarQuantizer``: ``lists`` k-means cells, rows stored as 8 bits a coordinate) and
matching asks it for candidate faces instead, then scores those candidates exactly as before: the scores answered
are still the float32 ones, only *which* faces are candidates is approximate. Its recall@1 against exact search is
measured by ``bench/gallery_changes.py`` (real held-out faces among distractors drawn to real embeddings'
statistics): 0.997 at a million faces with an eighth of the cells probed, in 2.3 ms.

The index is built in the background while the gallery keeps serving exactly: train on a sample (no lock: the
sample is a copy), attach (every change from then on is mirrored into the index), then fill in chunks under the
caller's lock, so that a batch waits at most one chunk. Only a complete index is searched. It names faces by the
row store's keys, which do not change when a removal moves a row.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np

if TYPE_CHECKING:
    from serve_app.model.gallery import Gallery

log = logging.getLogger(f"ray.serve.{__name__}")

#: Rows added to the index per hold of the gallery's lock while it fills.
FILL_CHUNK = 65_536
#: Training points per cell (faiss asks for at least 39; more costs training time for no recall here).
TRAINING_POINTS_PER_LIST = 40
#: k-means iterations: the cells need not be optimal, only reasonable (10 instead of faiss's 25: 2.5x faster).
TRAINING_ITERATIONS = 10
#: Cells: about four per square root of the faces, a power of two, within these bounds. The upper bound keeps
#: training under half a minute on 2 cores; at ten million faces a probe then reads about 20k rows.
MIN_LISTS, MAX_LISTS = 64, 4096
#: One cell in this many is probed per query (an eighth gave recall@1 0.987 at a million faces: under 0.99).
PROBED_FRACTION = 4


@dataclass(frozen=True)
class IndexPolicy:
    """When a gallery gets an index: from ``considered_from`` faces, if one exact query then takes longer than
    ``budget_s`` (timed on the gallery's own rows, once per size class: CPUs differ by 3x)."""

    considered_from: int = 200_000
    budget_s: float = 0.020


DEFAULT_INDEX_POLICY = IndexPolicy()


def list_count(faces: int) -> int:
    """The number of cells for a gallery of ``faces`` faces."""
    wanted = 4 * max(1.0, faces) ** 0.5
    return int(min(MAX_LISTS, max(MIN_LISTS, 1 << round(np.log2(wanted)))))


class FaceIndex:
    """An IVF index of 8-bit rows keyed by row-store keys.

    A removal scans the stored keys (about 1.5 ms a million faces on 2 cores, once per change whatever it
    removes): faiss's hash table from key to entry would make it O(1) but costs 57 bytes a face, 570 MB of a
    worker's 8 GB at ten million faces.
    """

    def __init__(self, dim: int, lists: int) -> None:
        self.dim = dim
        self.lists = lists
        self._quantizer = faiss.IndexFlatIP(dim)  # kept referenced: the index does not own it
        self._index = faiss.IndexIVFScalarQuantizer(
            self._quantizer, dim, lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        self._index.cp.niter = TRAINING_ITERATIONS
        self._index.nprobe = max(1, lists // PROBED_FRACTION)
        #: Whether every row of the gallery is in the index (only a complete index is searched).
        self.complete = False

    def train(self, sample: np.ndarray) -> None:
        self._index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, vectors: np.ndarray, keys: np.ndarray) -> None:
        if len(keys):
            self._index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.int64)
            )

    def remove(self, keys: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if len(keys):
            self._index.remove_ids(faiss.IDSelectorBatch(len(keys), faiss.swig_ptr(keys)))

    def search(self, queries: np.ndarray, depth: int) -> np.ndarray:
        """The keys of up to ``depth`` candidate faces per query, closest first (``-1`` pads a short list)."""
        _, keys = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)
        found: np.ndarray = keys
        return found

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def nbytes(self) -> int:
        """Bytes held: each face's 8-bit row and key, and the cells' centroids."""
        return len(self) * (int(self._index.code_size) + 8) + self.lists * self.dim * 4

    @property
    def probed(self) -> int:
        return int(self._index.nprobe)


def build_index(gallery: Gallery, lock: threading.Lock, policy: IndexPolicy) -> FaceIndex | None:
    """Give ``gallery`` an index if its size and this CPU call for one (see :class:`IndexPolicy`), while it keeps
    serving: ``lock`` is the one its matching and changes hold. Returns the index (``None``: not needed)."""
    with lock:
        if not gallery.index_due(policy):
            return None
        gallery.index_considered()
        if gallery.exact_query_seconds() <= policy.budget_s:
            return None
        faces = len(gallery)
        lists = list_count(faces)
        sample = gallery.sample_rows(TRAINING_POINTS_PER_LIST * lists)
    started = time.perf_counter()
    index = FaceIndex(gallery.dim, lists)
    index.train(sample)  # the long part (seconds to tens of seconds), with the gallery serving
    trained = time.perf_counter() - started
    with lock:
        gallery.attach_index(index)
    while True:
        with lock:
            if gallery.fill_index(FILL_CHUNK):
                break
    log.info(
        "gallery index ready: %d faces in %d cells (%d probed), trained in %.1f s, filled in %.1f s",
        len(index),
        lists,
        index.probed,
        trained,
        time.perf_counter() - started - trained,
    )
    return index
