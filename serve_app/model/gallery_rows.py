"""The gallery's rows in memory: embeddings that grow and shrink in place, and the candidate product over them.

A change costs the change, not the gallery: rows are appended into spare capacity (doubled when full, so an
append is amortised O(rows appended)), and a removed row is replaced by the last row (O(1) per row removed). The
order of rows is therefore not the order of enrolment; callers keep their own per-row lists in step through the
moves this reports.

The candidate product (queries x rows) runs in float16 where that is faster on this CPU (it halves the bytes read:
about twice as fast at a million faces on an AVX-512 BF16 EPYC) and in float32 where it is not (one query on an AMX
Xeon, any query with kernels capped at AVX2): a large gallery times both once per process and size class
(:func:`coarse_in_half`), and keeps a float16 mirror of its rows, updated with every change, only where float16 wins.

A store made with ``half_rows_from`` keeps its rows themselves in float16 once it holds that many (a Recognizer
replica's gallery: 256 bytes a face instead of 512, which is what lets ten million faces fit a worker's 8 GB).
Candidates are then re-scored in float32 from the float16 rows: within about 1e-3 of the float32 scores (a
coordinate of a unit vector rounds to 11 significant bits). The GalleryWriter's store stays float32, so the
snapshots it writes are exact.
"""

from __future__ import annotations

import time

import numpy as np
import torch

#: Below this many faces either candidate product takes well under a millisecond: float32, nothing timed.
TIMED_FROM_ROWS = 50_000
#: The query counts timed for the choice: one face, and a batch of them.
TIMED_QUERIES = (1, 16)
#: A Recognizer replica's gallery keeps its rows in float16 from this many faces (where it first considers an
#: index, see :class:`~serve_app.model.gallery_index.IndexPolicy`): below it the memory saved is small.
REPLICA_HALF_ROWS_FROM = 200_000
#: Capacity of an empty row store.
INITIAL_CAPACITY = 64
#: Capacity doubles when full up to this many rows, then grows by a quarter (a doubling of ten million rows
#: would hold memory for twenty).
DOUBLING_UNTIL = 1 << 20
#: Rows turned into float32 at a time for a product over float16 rows where float16 kernels are the slower ones.
UPCAST_CHUNK = 65_536

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


class RowStore:
    """``(n, dim)`` float32 rows with spare capacity, a per-row integer label, and the float16 mirror.

    Each row also has a key that does not change when rows move (numbered from 0 in the order rows were appended,
    never reused): an index over the rows (:mod:`serve_app.model.gallery_index`) names rows by key.
    """

    def __init__(self, dim: int, capacity: int = INITIAL_CAPACITY, half_rows_from: int | None = None) -> None:
        self.dim = dim
        #: Rows are kept in float16 from this many on (``None``: always float32).
        self.half_rows_from = half_rows_from
        rows_dtype = np.float16 if half_rows_from is not None and capacity >= half_rows_from else np.float32
        self._rows = np.empty((max(1, capacity), dim), dtype=rows_dtype)
        self._labels = np.empty(max(1, capacity), dtype=np.int32)
        self._keys = np.empty(max(1, capacity), dtype=np.int64)
        #: ``_row_of_key[key]`` is the key's row, ``-1`` once removed (grown like the rows).
        self._row_of_key = np.empty(max(1, capacity), dtype=np.int64)
        self.next_key = 0
        self._half: np.ndarray | None = None
        self._half_for: tuple[bool, bool] | None = None  # decided for the size class it was timed at
        self._timed_class = 0
        #: No float16 mirror (an index chooses the candidates: the mirror would only cost memory).
        self._without_half = False
        self.n = 0

    @property
    def rows(self) -> np.ndarray:
        """The live rows (a view: valid until the next change)."""
        return self._rows[: self.n]

    @property
    def labels(self) -> np.ndarray:
        """``labels[i]`` is row ``i``'s owner (a person number)."""
        return self._labels[: self.n]

    @property
    def keys(self) -> np.ndarray:
        """``keys[i]`` is row ``i``'s key."""
        return self._keys[: self.n]

    def row_of_key(self, key: int) -> int:
        """The row of one key (``-1``: removed)."""
        return int(self._row_of_key[key])

    @property
    def nbytes(self) -> int:
        """Bytes held, spare capacity included."""
        arrays = (self._rows, self._labels, self._keys, self._row_of_key, self._half)
        return sum(int(array.nbytes) for array in arrays if array is not None)

    def rows_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """The rows of these keys (``-1`` for a key removed since)."""
        rows: np.ndarray = self._row_of_key[keys]
        return rows

    def append(self, vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Append rows; returns their keys."""
        needed = self.n + len(vectors)
        # Float16 from the threshold on, whether or not the rows must grow then (not at the next growth only).
        to_half = self.half_rows_from is not None and needed >= self.half_rows_from and self._rows.dtype != np.float16
        if needed > len(self._rows) or to_half:
            capacity = max(needed, _next_capacity(len(self._rows))) if needed > len(self._rows) else len(self._rows)
            rows_dtype = np.float16 if to_half else self._rows.dtype
            if rows_dtype != self._rows.dtype:
                # The rows are the float16 copy now: no mirror, and the product's kernel is timed again.
                self._half, self._half_for, self._without_half, self._timed_class = None, None, True, 0
            self._rows = _grown(self._rows, capacity, self.n, rows_dtype)
            self._labels = _grown(self._labels, capacity, self.n)
            self._keys = _grown(self._keys, capacity, self.n)
            if self._half is not None:
                self._half = _grown(self._half, capacity, self.n)
        keys = np.arange(self.next_key, self.next_key + len(vectors), dtype=np.int64)
        if self.next_key + len(keys) > len(self._row_of_key):
            capacity = max(self.next_key + len(keys), _next_capacity(len(self._row_of_key)))
            self._row_of_key = _grown(self._row_of_key, capacity, self.next_key)
        self._rows[self.n : needed] = vectors
        self._labels[self.n : needed] = labels
        self._keys[self.n : needed] = keys
        self._row_of_key[keys] = np.arange(self.n, needed)
        if self._half is not None:
            self._half[self.n : needed] = vectors
        self.n = needed
        self.next_key += len(keys)
        return keys

    def remove(self, row: int) -> int | None:
        """Remove ``row`` by moving the last row into its place; returns the row that moved there (``None`` when
        ``row`` was the last)."""
        last = self.n - 1
        moved = None
        self._row_of_key[self._keys[row]] = -1
        if row != last:
            self._rows[row] = self._rows[last]
            self._labels[row] = self._labels[last]
            self._keys[row] = self._keys[last]
            self._row_of_key[self._keys[row]] = row
            if self._half is not None:
                self._half[row] = self._half[last]
            moved = last
        self.n = last
        return moved

    @property
    def in_half(self) -> bool:
        """Whether the rows themselves are float16 (see ``half_rows_from``)."""
        return bool(self._rows.dtype == np.float16)

    def exact_rows(self, rows: np.ndarray) -> np.ndarray:
        """These rows in float32 (a copy), for exact scores."""
        exact: np.ndarray = self._rows[rows].astype(np.float32)
        return exact

    def coarse(self, queries: np.ndarray) -> torch.Tensor:
        """``queries x rows`` in float32 or float16, whichever this CPU runs faster for this many queries."""
        if self.in_half:
            return self._coarse_from_half(queries)
        rows32 = torch.from_numpy(self.rows)
        half = self._half_rows()
        matrix = rows32
        if half is not None and self._half_for is not None and self._half_for[0 if len(queries) == 1 else 1]:
            matrix = torch.from_numpy(half[: self.n])
        return torch.nn.functional.linear(torch.from_numpy(queries).to(matrix.dtype), matrix)

    def _coarse_from_half(self, queries: np.ndarray) -> torch.Tensor:
        """The product over float16 rows: in float16 where that wins on this CPU, else in float32 a chunk of rows
        at a time (never a float32 copy of every row)."""
        half = torch.from_numpy(self.rows)
        size_class = 1 << max(0, self.n - 1).bit_length()
        if size_class != self._timed_class:
            self._timed_class = size_class
            sample = half[: min(self.n, 4 * UPCAST_CHUNK)]
            self._half_for = coarse_in_half(sample.float(), sample)
        assert self._half_for is not None
        probe = torch.from_numpy(queries)
        if self._half_for[0 if len(queries) == 1 else 1]:
            return torch.nn.functional.linear(probe.half(), half)
        return torch.cat(
            [
                torch.nn.functional.linear(probe, half[start : start + UPCAST_CHUNK].float())
                for start in range(0, self.n, UPCAST_CHUNK)
            ],
            dim=1,
        )

    def _half_rows(self) -> np.ndarray | None:
        """The float16 mirror where it wins on this CPU: timed when the store first reaches a size class of at
        least ``TIMED_FROM_ROWS`` rows (and again at each larger class), kept up to date by every change."""
        if self.n < TIMED_FROM_ROWS or self._without_half:
            return self._half
        size_class = 1 << max(0, self.n - 1).bit_length()
        if size_class != self._timed_class:
            self._timed_class = size_class
            half = np.empty(self._rows.shape, dtype=np.float16)
            half[: self.n] = self.rows
            self._half_for = coarse_in_half(torch.from_numpy(self.rows), torch.from_numpy(half[: self.n]))
            self._half = half if any(self._half_for) else None
        return self._half

    @property
    def half_for(self) -> tuple[bool, bool]:
        """Whether the float16 mirror serves one query, and a batch (``(False, False)``: float32 only)."""
        if self.in_half:
            return self._half_for if self._half_for is not None else (True, True)
        return self._half_for if self._half is not None and self._half_for is not None else (False, False)

    def drop_half(self) -> None:
        """Free the float16 mirror for good (the product runs in float32 from now on)."""
        self._without_half = True
        if not self.in_half:  # float16 rows keep their kernel choice
            self._half, self._half_for = None, None

    def force_half(self, half_for: tuple[bool, bool]) -> None:
        """Use the float16 mirror as ``half_for`` says, whatever the timing would (tests of both kernels)."""
        if self.in_half:  # no mirror: the product over the float16 rows runs in float16 or in float32 chunks
            self._timed_class, self._half_for = 1 << max(0, self.n - 1).bit_length(), half_for
            return
        self._timed_class = 1 << max(0, self.n - 1).bit_length() if self.n >= TIMED_FROM_ROWS else 0
        self._half_for = half_for
        if any(half_for):
            self._half = np.empty(self._rows.shape, dtype=np.float16)
            self._half[: self.n] = self.rows
        else:
            self._half = None


def _next_capacity(capacity: int) -> int:
    return 2 * capacity if capacity < DOUBLING_UNTIL else capacity + capacity // 4


def _grown(array: np.ndarray, capacity: int, used: int, dtype: np.dtype | type | None = None) -> np.ndarray:
    grown = np.empty((capacity, *array.shape[1:]), dtype=array.dtype if dtype is None else dtype)
    grown[:used] = array[:used]
    return grown
