"""A gallery of millions in a worker's memory: compact per-face tables, float16 rows on replicas, and a base read a
chunk at a time.

Memory is asserted in bytes the gallery holds (its arrays, and Python's traced allocations while it reads a
snapshot), never in time. The faces matched are real LFW faces among distractors drawn from the real embeddings'
mean and covariance.
"""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve_app.model.gallery import READ_CHUNK, Gallery, GalleryError
from serve_app.model.gallery_change import GalleryChange, StagedChange
from serve_app.model.gallery_faces import FOLD_AT, UNCODED, FaceTable, id_code, id_codes

from .test_gallery_index import gallery_of

MODEL = "m"


def unit_rows(count: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, 128)).astype(np.float32)
    normalised: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return normalised


def test_face_ids_are_numbers_where_the_service_made_them_and_strings_otherwise() -> None:
    made = [f"{v:012x}" for v in np.random.default_rng(0).integers(0, 1 << 48, 3 * FOLD_AT)]
    others = ["face-1", "ABCDEF012345", "0123456789abc", "01234567890", "é1234567890a", "0000000000 0"]
    # Vectorised coding (how a snapshot's column is read) agrees with one id at a time, at any column width.
    for column in (np.array(made[:50] + others), np.array(made[:50]), np.array([*made[:50], "a" * 40])):
        assert [int(c) for c in id_codes(column)] == [int(id_code(str(f))) for f in column]
    assert all(id_code(f) == UNCODED for f in others) and id_code(made[0]) != UNCODED

    table = FaceTable()
    table.append(0, np.array(made[: 2 * FOLD_AT]), np.zeros(2 * FOLD_AT, bool))  # a snapshot's chunk: sorted later
    key = 2 * FOLD_AT
    for face_id in made[2 * FOLD_AT :] + others:  # one at a time: a dict, folded into the sorted arrays as it grows
        table.append(key, [face_id], [key % 2 == 0])
        key += 1
    every = made + others
    assert [table.key_of(f) for f in every] == list(range(len(every)))
    assert table.ids_of(np.arange(len(every))) == every
    assert table.chip_of(2 * FOLD_AT) and not table.chip_of(2 * FOLD_AT + 1)
    assert table.key_of("ffffffffffff") is None and table.key_of("nobody") is None
    assert not table.duplicated()
    # Well under the ~250 bytes a face of a str, a dict entry and an int.
    assert table.nbytes / len(table) <= 40
    twice = FaceTable()
    twice.append(0, np.array(made[:5] + made[:1]), np.zeros(6, bool))
    assert twice.duplicated()
    again = FaceTable()
    again.append(0, ["face-1", "face-1"], [False, False])
    assert again.duplicated()


def test_an_id_recorded_again_gives_its_newest_key_whatever_the_order_of_appends() -> None:
    """One at a time (a dict), a chunk (sorted later), folded or not: the last key recorded for an id wins."""
    chunk = [f"{i:012x}" for i in range(100, 100 + FOLD_AT)]
    again = chunk[0]
    table = FaceTable()
    table.append(0, [again], [False])  # recent
    table.append(1, np.array(chunk), np.zeros(FOLD_AT, bool))  # a chunk after it: pending
    assert table.key_of(again) == 1
    table.append(1 + FOLD_AT, [again], [False])  # recent again, after the chunk
    assert table.key_of(again) == 1 + FOLD_AT
    table._fold()
    assert table.key_of(again) == 1 + FOLD_AT and table.duplicated()


def test_a_new_face_never_gets_an_id_in_use_removed_or_staged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Face ids are 48 random bits: among ten million faces two collide about once in six galleries, so a drawn
    id that is taken is drawn again."""
    gallery = Gallery(MODEL, 128)
    (kept, gone) = gallery.add_faces(["ann", "bob"], unit_rows(2, 1), MODEL)
    gallery.remove_person("bob")
    staged = "0000000000aa"
    draws = iter([kept, gone, staged, kept, "0000000000bb", "0000000000bb", "0000000000cc"])

    class Drawn:
        def __init__(self) -> None:
            self.hex = next(draws) + "0" * 20

    monkeypatch.setattr("serve_app.model.gallery.uuid.uuid4", Drawn)
    _, _, _, ids = gallery.checked_faces(["cy", "cy"], unit_rows(2, 2), MODEL, also_taken=lambda f: f == staged)
    assert ids == ["0000000000bb", "0000000000cc"]
    assert gallery.person_of(kept) == "ann" and gallery.was_removed(gone)


def test_a_replica_with_float16_rows_names_who_the_writer_names(models: Any, real_faces: Any) -> None:
    people, _, held_out = real_faces
    writer = gallery_of(real_faces, models.embedder.model_id)
    replica = Gallery.from_bytes(writer.to_bytes(), half_rows_from=1)
    assert replica.rows_in_half and not writer.rows_in_half
    assert replica.nbytes < 0.62 * writer.nbytes  # 256 bytes a face of rows instead of 512
    queries = held_out / np.linalg.norm(held_out, axis=1, keepdims=True)
    exact, half = writer.match(queries, threshold=0.5), replica.match(queries, threshold=0.5)
    for a, b in zip(exact, half, strict=True):
        assert a.name == b.name and [c.name for c in a.candidates] == [c.name for c in b.candidates]
        assert a.similarity == pytest.approx(b.similarity, abs=1e-3)
    assert sum(m.name == p for m, p in zip(half, people, strict=True)) >= 0.8 * len(people)
    # Changes follow as on the writer: a face added is named, a person removed is gone.
    replica.add(people[0] + " again", queries[0], models.embedder.model_id)
    assert replica.match(queries[:1], threshold=0.5)[0].name == people[0] + " again"
    replica.remove_person(people[0] + " again")
    replica.remove_person(people[1])
    assert replica.match(queries[:2], threshold=0.5)[0].name == people[0]
    assert replica.match(queries[1:2], threshold=0.5)[0].name != people[1]
    # The writer's float32 snapshot reads back byte for byte: nothing it stores is rounded.
    assert Gallery.from_bytes(writer.to_bytes()).to_bytes() == writer.to_bytes()


def test_rows_turn_float16_when_the_gallery_grows_past_the_threshold() -> None:
    gallery = Gallery(MODEL, 128, half_rows_from=3000)
    first = unit_rows(2000, 1)
    ids = gallery.add_faces([f"p{i // 4}" for i in range(2000)], first, MODEL)
    assert not gallery.rows_in_half
    gallery.add_faces([f"q{i // 4}" for i in range(100)], unit_rows(100, 2), MODEL)  # the rows grow, float32
    assert not gallery.rows_in_half
    # Past the threshold with room to spare: float16 then, not only when the rows next grow.
    gallery.add_faces([f"r{i // 4}" for i in range(1000)], unit_rows(1000, 3), MODEL)
    assert gallery.rows_in_half and len(gallery) == 3100
    for i in (0, 999, 1999):
        assert np.allclose(gallery.embedding_of(ids[i]), first[i], atol=1e-3)
        assert gallery.match(first[i : i + 1], threshold=0.9)[0].name == f"p{i // 4}"
    exact = gallery.match(first[:16], threshold=0.9, exact=True)
    assert [m.name for m in exact] == [f"p{i // 4}" for i in range(16)]


def test_joining_reads_the_base_a_chunk_at_a_time(tmp_path: Path) -> None:
    count = 3 * READ_CHUNK + 1000
    writer = Gallery(MODEL, 128)
    writer.add_faces([f"person-{i // 5:06d}" for i in range(count)], unit_rows(count, 3), MODEL)
    writer.remove_person("person-000007")
    path = tmp_path / "base.npz"
    with path.open("wb") as handle:
        writer.write_to(handle)
    file_bytes = path.stat().st_size
    tracemalloc.start()
    try:
        replica = Gallery.read_from(path, half_rows_from=1)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # What a replica holds: float16 rows and compact tables (the model apart); never the file's arrays beside it.
    assert held / len(replica) <= 400, f"{held / len(replica):.0f} bytes a face"
    # Beyond that, one chunk of the file's arrays at a time and what is made from it (the file is three chunks).
    chunk_bytes = file_bytes * READ_CHUNK / count
    assert peak - held <= 2 * chunk_bytes < file_bytes, f"read held {peak - held} bytes beyond the gallery"
    assert replica.faces() == Gallery.from_bytes(path.read_bytes()).faces()
    assert replica.people() == writer.people() and replica.removed_ids == writer.removed_ids
    assert replica.revision == writer.revision


def test_a_snapshot_with_a_face_twice_or_cut_short_is_refused(tmp_path: Path) -> None:
    meta = json.dumps({"format": "facerec-gallery", "version": 1, "model_id": MODEL, "dim": 128, "revision": 1})
    rows = unit_rows(3, 4)

    def snapshot(face_ids: list[str], embeddings: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(meta), embeddings=embeddings, names=np.array(["a", "b", "c"]), face_ids=face_ids)
        return buffer.getvalue()

    assert len(Gallery.from_bytes(snapshot(["0000000000a1", "x", "0000000000a2"], rows))) == 3
    with pytest.raises(GalleryError, match="twice"):
        Gallery.from_bytes(snapshot(["0000000000a1", "x", "0000000000a1"], rows))
    with pytest.raises(GalleryError, match="twice"):
        Gallery.from_bytes(snapshot(["x", "x", "0000000000a1"], rows))
    with pytest.raises(GalleryError, match="differ in length"):
        Gallery.from_bytes(snapshot(["0000000000a1", "x", "0000000000a2"], rows[:2]))
    # An embeddings member whose header promises more rows than it holds.
    whole = snapshot(["0000000000a1", "x", "0000000000a2"], rows)
    cut = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(whole)) as source, zipfile.ZipFile(cut, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, data[:-200] if item.filename == "embeddings.npy" else data)
    with pytest.raises(GalleryError, match="truncated"):
        Gallery.from_bytes(cut.getvalue())
    # A meta without a usable dim, and a change whose embeddings are not rows: refused as files, not crashes.
    no_dim = io.BytesIO()
    nulled = meta.replace('"dim": 128', '"dim": null')
    np.savez(no_dim, meta=np.array(nulled), embeddings=rows, names=np.array(["a", "b", "c"]), face_ids=["1", "2", "3"])
    with pytest.raises(GalleryError, match="not a facerec gallery file"):
        Gallery.from_bytes(no_dim.getvalue())
    staged = StagedChange(Gallery(MODEL, 128))
    staged.add("a", rows[:1], MODEL)
    flat = io.BytesIO()
    with np.load(io.BytesIO(staged.change(1).to_bytes())) as archive:
        members = {name: archive[name] for name in archive.files}
    np.savez(flat, **{**members, "embeddings": members["embeddings"].ravel()[:1]})
    with pytest.raises(GalleryError, match="inconsistent"):
        GalleryChange.from_bytes(flat.getvalue())
