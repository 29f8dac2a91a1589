"""The gallery's rows in memory: embeddings that grow and shrink in place, and the candidate product over them.

A change costs the change, not the gallery: rows are appended into spare capacity (doubled when full, so an
append is amortised O(rows appended)), and a removed row is replaced by the last row (O(1) per row removed). The
order of rows is therefore not the order of enrolment; callers keep their own per-row lists in step through the
moves this reports.

The candidate product (queries x rows) runs in float16 where that is faster on this CPU (it halves the bytes read:
about twice as fast at a million faces on an AVX-512 BF16 EPYC) and in float32 where it is not (one query on an AMX
Xeon, any query with kernels capped at AVX2): a large gallery times both once per process and size class
(:func:`coarse_in_half`), and keeps a float16 mirror of its rows, updated with every change, only where float16 wins.
"""

from __future__ import annotations

import time

import numpy as np
import torch

#: Below this many faces either candidate product takes well under a millisecond: float32, nothing timed.
TIMED_FROM_ROWS = 50_000
#: The query counts timed for the choice: one face, and a batch of them.
TIMED_QUERIES = (1, 16)
#: Capacity of an empty row store.
INITIAL_CAPACITY = 64

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

    def __init__(self, dim: int, capacity: int = INITIAL_CAPACITY) -> None:
        self.dim = dim
        self._rows = np.empty((max(1, capacity), dim), dtype=np.float32)
        self._labels = np.empty(max(1, capacity), dtype=np.int64)
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

    def rows_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """The rows of these keys (``-1`` for a key removed since)."""
        rows: np.ndarray = self._row_of_key[keys]
        return rows

    def append(self, vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Append rows; returns their keys."""
        needed = self.n + len(vectors)
        if needed > len(self._rows):
            capacity = max(needed, 2 * len(self._rows))
            self._rows = _grown(self._rows, capacity, self.n)
            self._labels = _grown(self._labels, capacity, self.n)
            self._keys = _grown(self._keys, capacity, self.n)
            if self._half is not None:
                self._half = _grown(self._half, capacity, self.n)
        keys = np.arange(self.next_key, self.next_key + len(vectors), dtype=np.int64)
        if self.next_key + len(keys) > len(self._row_of_key):
            capacity = max(self.next_key + len(keys), 2 * len(self._row_of_key))
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

    def coarse(self, queries: np.ndarray) -> torch.Tensor:
        """``queries x rows`` in float32 or float16, whichever this CPU runs faster for this many queries."""
        rows32 = torch.from_numpy(self.rows)
        half = self._half_rows()
        matrix = rows32
        if half is not None and self._half_for is not None and self._half_for[0 if len(queries) == 1 else 1]:
            matrix = torch.from_numpy(half[: self.n])
        return torch.nn.functional.linear(torch.from_numpy(queries).to(matrix.dtype), matrix)

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
        return self._half_for if self._half is not None and self._half_for is not None else (False, False)

    def drop_half(self) -> None:
        """Free the float16 mirror for good (the product runs in float32 from now on)."""
        self._without_half = True
        self._half, self._half_for = None, None

    def force_half(self, half_for: tuple[bool, bool]) -> None:
        """Use the float16 mirror as ``half_for`` says, whatever the timing would (tests of both kernels)."""
        self._timed_class = 1 << max(0, self.n - 1).bit_length() if self.n >= TIMED_FROM_ROWS else 0
        self._half_for = half_for
        if any(half_for):
            self._half = np.empty(self._rows.shape, dtype=np.float16)
            self._half[: self.n] = self.rows
        else:
            self._half = None


def _grown(array: np.ndarray, capacity: int, used: int) -> np.ndarray:
    grown = np.empty((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[:used] = array[:used]
    return grown
