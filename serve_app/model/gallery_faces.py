"""Each face's id and chip flag by key, and the key of an id, in about 25 bytes a face instead of ~250.

A gallery names its rows by keys (:class:`~serve_app.model.gallery_rows.RowStore`: numbered in the order faces
were appended, never reused). At ten million faces, Python strings and dicts for the ids (a str, a dict entry and
an int per face) would take about 2.5 GB of a worker's 8; here the service's own ids (twelve lowercase hex
digits, see :meth:`~serve_app.model.gallery.Gallery.checked_faces`) are kept as 64-bit numbers, and found by
binary search over a sorted copy plus a small dict of the ids added since that copy was made. Any other id (an
older snapshot's, or one given by a caller) is kept as a string in a dict: correct for every id, compact for the
ids the service makes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: Length of the service's own face ids (hex digits), which fit in 48 bits.
CODED_LENGTH = 12
#: Marks a key whose id is not coded (its string is in :attr:`FaceTable._other_id`).
UNCODED = np.uint64(1 << 63)
#: The dict of recently added coded ids is folded into the sorted arrays once it holds this many (or an eighth
#: of the sorted ones, whichever is more): amortised O(log n) a face, and the dict stays small.
FOLD_AT = 65_536

_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
_SHIFTS = np.arange(4 * (CODED_LENGTH - 1), -1, -4, dtype=np.uint64)


def id_codes(face_ids: np.ndarray) -> np.ndarray:
    """The 64-bit codes of an array of ids (``UNCODED`` where an id is not twelve lowercase hex digits)."""
    ids = np.asarray(face_ids)
    codes = np.full(len(ids), UNCODED, dtype=np.uint64)
    if not len(ids):
        return codes
    if ids.dtype.kind == "U" and ids.dtype.itemsize >= 4 * CODED_LENGTH:
        # Fixed-width unicode (how snapshots hold ids): the first twelve code points must be hex digits and the
        # rest padding, vectorised.
        points = np.ascontiguousarray(ids).view(np.uint32).reshape(len(ids), ids.dtype.itemsize // 4)
        head, tail = points[:, :CODED_LENGTH], points[:, CODED_LENGTH:]
        digits = _HEX_VALUE[np.minimum(head, 255).astype(np.uint8)]
        coded = np.all(head < 256, axis=1) & np.all(digits != 255, axis=1) & np.all(tail == 0, axis=1)
        codes[coded] = (digits[coded].astype(np.uint64) << _SHIFTS).sum(axis=1, dtype=np.uint64)
        return codes
    for i, face_id in enumerate(ids.tolist()):
        codes[i] = id_code(str(face_id))
    return codes


def id_code(face_id: str) -> np.uint64:
    """One id's code (``UNCODED`` where it is not twelve lowercase hex digits)."""
    if len(face_id) == CODED_LENGTH and all(c in "0123456789abcdef" for c in face_id):
        return np.uint64(int(face_id, 16))
    return UNCODED


class FaceTable:
    """Per key: the face's id and whether it has a chip; and the key of an id (also of a removed face: callers
    check whether the key still has a row)."""

    def __init__(self) -> None:
        self._code = np.empty(0, dtype=np.uint64)
        self._chip = np.empty(0, dtype=bool)
        self._size = 0  # keys held
        self._sorted_codes = np.empty(0, dtype=np.uint64)
        self._sorted_keys = np.empty(0, dtype=np.int64)
        self._recent: dict[int, int] = {}  # code -> key, not yet in the sorted arrays
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # large appends, folded when next looked up
        self._duplicated = False
        self._other_key: dict[str, int] = {}
        self._other_id: dict[int, str] = {}

    def __len__(self) -> int:
        return self._size

    def append(self, first_key: int, face_ids: Sequence[str] | np.ndarray, chips: Iterable[bool] | np.ndarray) -> None:
        """Record the faces with keys ``first_key, first_key + 1, ...`` (keys are appended in order)."""
        ids = np.asarray(face_ids) if not isinstance(face_ids, np.ndarray) else face_ids
        count = len(ids)
        if first_key != self._size:
            raise ValueError(f"key {first_key} does not follow {self._size}")
        needed = self._size + count
        if needed > len(self._code):
            capacity = max(needed, 2 * len(self._code) if len(self._code) < (1 << 20) else len(self._code) * 5 // 4)
            self._code = _grown(self._code, capacity, self._size)
            self._chip = _grown(self._chip, capacity, self._size)
        codes = id_codes(ids)
        self._code[self._size : needed] = codes
        self._chip[self._size : needed] = np.fromiter(chips, dtype=bool, count=count)
        keys = np.arange(self._size, needed, dtype=np.int64)
        uncoded = codes == UNCODED
        if np.any(uncoded):
            for i in np.flatnonzero(uncoded).tolist():
                face_id = str(ids[i])
                self._duplicated |= face_id in self._other_key
                self._other_key[face_id] = int(keys[i])
                self._other_id[int(keys[i])] = face_id
        coded = ~uncoded
        if count >= FOLD_AT:
            # A snapshot read a chunk at a time: sorted once. What is recent goes first, so that the pending
            # arrays and then the recent dict hold keys in the order they were recorded (the newest key wins).
            if self._recent:
                self._pending.append(self._recent_arrays())
                self._recent = {}
            self._pending.append((codes[coded], keys[coded]))
        else:
            before = len(self._recent)
            self._recent.update(zip(codes[coded].tolist(), keys[coded].tolist(), strict=True))
            self._duplicated |= len(self._recent) != before + int(np.count_nonzero(coded))
            if len(self._recent) >= max(FOLD_AT, len(self._sorted_codes) // 8):
                self._fold()
        self._size = needed

    def _recent_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        codes = np.fromiter(self._recent.keys(), dtype=np.uint64, count=len(self._recent))
        keys = np.fromiter(self._recent.values(), dtype=np.int64, count=len(self._recent))
        return codes, keys

    def _fold(self) -> None:
        # Oldest first (sorted, pending, recent) and a stable sort: of an id recorded twice the newest is last.
        parts = [(self._sorted_codes, self._sorted_keys), *self._pending, self._recent_arrays()]
        all_codes = np.concatenate([codes for codes, _ in parts])
        all_keys = np.concatenate([keys for _, keys in parts])
        order = np.argsort(all_codes, kind="stable")
        self._sorted_codes, self._sorted_keys = all_codes[order], all_keys[order]
        self._recent, self._pending = {}, []

    def duplicated(self) -> bool:
        """Whether an id was recorded twice (a snapshot that holds one face twice is corrupt)."""
        self._fold()
        return self._duplicated or bool(np.any(self._sorted_codes[1:] == self._sorted_codes[:-1]))

    def key_of(self, face_id: str) -> int | None:
        """The newest key recorded for ``face_id`` (``None``: never recorded)."""
        code = id_code(face_id)
        if code == UNCODED:
            return self._other_key.get(face_id)
        key = self._recent.get(int(code))
        if key is not None:
            return key
        if self._pending:
            self._fold()
        at = int(np.searchsorted(self._sorted_codes, code, side="right")) - 1
        if at >= 0 and self._sorted_codes[at] == code:
            return int(self._sorted_keys[at])
        return None

    def id_of(self, key: int) -> str:
        code = self._code[key]
        return self._other_id[key] if code == UNCODED else f"{int(code):012x}"

    def ids_of(self, keys: np.ndarray) -> list[str]:
        return [self.id_of(key) for key in keys.tolist()]

    def uncoded_ids(self) -> list[str]:
        """Every id kept as a string (not twelve lowercase hex digits)."""
        return list(self._other_id.values())

    def chip_of(self, key: int) -> bool:
        return bool(self._chip[key])

    def chips_of(self, keys: np.ndarray) -> np.ndarray:
        chips: np.ndarray = self._chip[keys]
        return chips

    @property
    def nbytes(self) -> int:
        """Bytes held in arrays (the dicts of uncoded and recent ids aside)."""
        pending = sum(int(codes.nbytes + keys.nbytes) for codes, keys in self._pending)
        arrays = (self._code, self._chip, self._sorted_codes, self._sorted_keys)
        return sum(int(array.nbytes) for array in arrays) + pending


def _grown(array: np.ndarray, capacity: int, used: int) -> np.ndarray:
    grown = np.empty(capacity, dtype=array.dtype)
    grown[:used] = array[:used]
    return grown
