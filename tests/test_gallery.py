"""Gallery maths and persistence, with synthetic unit vectors and no model loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import serve_app.model.gallery_rows as gallery_rows
from serve_app.model.gallery import GALLERY_FILENAME, Gallery, GalleryError, ModelMismatchError

MODEL = "test-model"


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


@pytest.fixture
def gallery() -> Gallery:
    g = Gallery(MODEL, 3)
    g.add("alice", np.stack([unit(1, 0, 0), unit(1, 0.2, 0)]), MODEL)
    g.add("bob", unit(0, 1, 0)[None], MODEL)
    g.add("carol", unit(0, 0, 1)[None], MODEL)
    return g


def test_best_match_threshold_margin_and_candidates(gallery: Gallery) -> None:
    query = unit(1, 0.1, 0)
    (match,) = gallery.match(query[None], threshold=0.5, top_k=3)
    assert match.name == "alice"
    best_alice = max(float(query @ unit(1, 0, 0)), float(query @ unit(1, 0.2, 0)))
    assert match.similarity == pytest.approx(best_alice, abs=1e-6)
    assert [c.name for c in match.candidates] == ["alice", "bob", "carol"]
    assert match.margin == pytest.approx(best_alice - float(query @ unit(0, 1, 0)), abs=1e-6)


def test_below_threshold_is_unknown_but_keeps_candidates(gallery: Gallery) -> None:
    (match,) = gallery.match(unit(1, 1, 1)[None], threshold=0.9, top_k=2)
    assert match.name is None
    assert len(match.candidates) == 2
    assert match.similarity == pytest.approx(match.candidates[0].similarity)


def test_batch_matching_equals_one_by_one(gallery: Gallery) -> None:
    rng = np.random.default_rng(7)
    queries = rng.normal(size=(50, 3)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    batch = gallery.match(queries, threshold=0.3, top_k=3)
    single = [gallery.match(q[None], threshold=0.3, top_k=3)[0] for q in queries]
    for one, other in zip(batch, single, strict=True):
        assert one.name == other.name
        assert [c.name for c in one.candidates] == [c.name for c in other.candidates]
        assert one.similarity == pytest.approx(other.similarity, abs=1e-6)
        assert one.margin == pytest.approx(other.margin, abs=1e-6)
    # Brute force: the best person is the one owning the most similar single face.
    names = gallery.names
    for query, match in zip(queries, batch, strict=True):
        sims = gallery.embeddings @ query
        assert match.candidates[0].name == names[int(np.argmax(sims))]
        assert match.similarity == pytest.approx(float(sims.max()), abs=1e-6)


def test_empty_gallery_answers_unknown() -> None:
    (match,) = Gallery(MODEL, 3).match(unit(1, 0, 0)[None], threshold=0.0)
    assert match.name is None and match.candidates == ()


def test_single_person_margin_is_against_nobody() -> None:
    g = Gallery(MODEL, 3)
    g.add("solo", unit(1, 0, 0)[None], MODEL)
    (match,) = g.match(unit(1, 0, 0)[None], threshold=0.5)
    assert match.name == "solo"
    assert match.margin == pytest.approx(2.0)


def test_add_remove_person_and_face(gallery: Gallery) -> None:
    assert gallery.people() == {"alice": 2, "bob": 1, "carol": 1}
    first_alice = gallery.faces_of("alice")[0]
    assert gallery.remove_face("alice", first_alice)
    assert not gallery.remove_face("alice", first_alice)
    assert gallery.people()["alice"] == 1
    assert gallery.remove_person("bob") == 1
    assert gallery.remove_person("bob") == 0
    (match,) = gallery.match(unit(0, 1, 0)[None], threshold=0.9)
    assert match.name is None


def test_refuses_other_models_and_bad_shapes(gallery: Gallery) -> None:
    with pytest.raises(ModelMismatchError):
        gallery.add("eve", unit(1, 0, 0)[None], "other-model")
    with pytest.raises(GalleryError):
        gallery.add("eve", np.ones((1, 4), dtype=np.float32), MODEL)
    with pytest.raises(GalleryError):
        gallery.add("   ", unit(1, 0, 0)[None], MODEL)
    with pytest.raises(GalleryError):
        gallery.add("eve", np.zeros((1, 3), dtype=np.float32), MODEL)


def test_add_normalises(gallery: Gallery) -> None:
    gallery.add("dave", np.array([[0.0, 3.0, 4.0]], dtype=np.float32), MODEL)
    norms = np.linalg.norm(gallery.embeddings, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-6)


def test_save_load_roundtrip_is_atomic_and_checks_model(gallery: Gallery, tmp_path: Path) -> None:
    before = gallery.match(unit(1, 0.1, 0.3)[None], threshold=0.2)
    path = gallery.save(tmp_path)
    assert path.name == GALLERY_FILENAME
    assert [p.name for p in tmp_path.iterdir()] == [GALLERY_FILENAME]  # no temp files left behind
    loaded = Gallery.load(tmp_path, expected_model_id=MODEL)
    assert loaded.people() == gallery.people()
    assert loaded.match(unit(1, 0.1, 0.3)[None], threshold=0.2) == before
    with pytest.raises(ModelMismatchError):
        Gallery.load(tmp_path, expected_model_id="other-model")


def test_corrupt_file_is_a_gallery_error(tmp_path: Path) -> None:
    (tmp_path / GALLERY_FILENAME).write_bytes(b"not an npz at all")
    with pytest.raises(GalleryError):
        Gallery.load(tmp_path)
    with pytest.raises(GalleryError):
        Gallery.load(tmp_path / "missing")


def test_import_legacy_data_pt(tmp_path: Path) -> None:
    embeddings = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[0.9, 0.1, 0.0]])]
    names = ["Paul", "Ringo", "Paul"]
    torch.save((embeddings, names), tmp_path / "data.pt")
    gallery = Gallery.import_legacy(tmp_path / "data.pt", "facenet-pytorch-vggface2-512")
    assert gallery.model_id == "facenet-pytorch-vggface2-512"
    assert gallery.people() == {"Paul": 2, "Ringo": 1}
    (match,) = gallery.match(unit(0, 1, 0)[None], threshold=0.9)
    assert match.name == "Ringo"
    (tmp_path / "broken.pt").write_bytes(b"junk")
    with pytest.raises(GalleryError):
        Gallery.import_legacy(tmp_path / "broken.pt", "x")


@pytest.mark.parametrize("half_for", [(False, False), (True, True), (True, False)], ids=["float32", "float16", "mixed"])
def test_match_agrees_with_a_brute_force_per_person_maximum(
    half_for: tuple[bool, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The candidate search (float32 or float16, whichever this CPU runs faster) then float32 re-scoring gives the
    exact per-person ranking and scores, whichever kernel picked the candidates."""
    rng = np.random.default_rng(7)
    gallery = Gallery("m", 128)
    centres = rng.normal(size=(300, 128))
    for person in range(300):
        faces = centres[person] + 0.6 * rng.normal(size=(1 + person % 7, 128))
        gallery.add(f"p{person:03d}", faces, "m")
    # Removals move rows around (the last row fills the gap): the answers must not care.
    for person in range(0, 300, 17):
        gallery.remove_face(f"p{person:03d}", gallery.faces_of(f"p{person:03d}")[0])
    gallery._store.force_half(half_for)
    queries = centres[rng.integers(0, 300, size=50)] + 0.8 * rng.normal(size=(50, 128))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    queries = queries.astype(np.float32)
    rows, names = gallery.embeddings, np.asarray(gallery.names)
    people = sorted(set(gallery.names))
    brute = np.stack([(queries @ rows[names == p].T).max(axis=1) for p in people], axis=1)
    matches = gallery.match(queries, threshold=0.3, top_k=5) + [
        gallery.match(q[None], 0.3, top_k=5)[0] for q in queries
    ]
    for query, match in zip(list(range(len(queries))) * 2, matches, strict=True):
        order = np.argsort(-brute[query], kind="stable")[:5]
        assert [c.name for c in match.candidates] == [people[i] for i in order]
        assert np.allclose([c.similarity for c in match.candidates], brute[query, order], atol=1e-5)
        assert match.margin == pytest.approx(brute[query, order[0]] - brute[query, order[1]], abs=1e-5)


def test_chip_flags_follow_their_faces_through_changes_and_snapshots(gallery: Gallery) -> None:
    ids = gallery.add("dave", np.stack([unit(1, 1, 0), unit(1, 1, 1)]), MODEL, [True, False])
    assert gallery.face_records("dave") == [(ids[0], True), (ids[1], False)]
    gallery.match(unit(1, 1, 0)[None], threshold=0.5)  # matching changes nothing
    gallery.remove_person("bob")
    loaded = Gallery.from_bytes(gallery.to_bytes())
    assert loaded.face_records("dave") == [(ids[0], True), (ids[1], False)]
    assert [chip for _, _, chip in loaded.faces()].count(True) == 1
    with pytest.raises(GalleryError, match="chip flags"):
        gallery.add("eve", unit(0, 1, 1)[None], MODEL, [True, True])


def test_a_snapshot_from_before_chips_reads_as_faces_without_chips(gallery: Gallery) -> None:
    import io

    with np.load(io.BytesIO(gallery.to_bytes())) as archive:
        old = {key: archive[key] for key in archive.files if key != "has_chip"}
    buffer = io.BytesIO()
    np.savez(buffer, **old)
    loaded = Gallery.from_bytes(buffer.getvalue())
    assert len(loaded) == 4 and not any(chip for _, _, chip in loaded.faces())


def test_each_candidate_names_the_persons_closest_face(gallery: Gallery) -> None:
    closest_alice = gallery.faces_of("alice")[1]  # unit(1, 0.2, 0)
    (match,) = gallery.match(unit(1, 0.25, 0)[None], threshold=0.5, top_k=3)
    by_name = {c.name: c.face_id for c in match.candidates}
    assert by_name["alice"] == closest_alice
    assert by_name["bob"] == gallery.faces_of("bob")[0]


def test_a_large_gallery_times_the_two_candidate_products_once_and_matches_exactly() -> None:
    """From TIMED_FROM_ROWS faces the index measures float16 against float32 on its own rows (once per process
    and size class) and keeps a float16 copy only if it wins somewhere; the answers are the exact ones either way."""
    rng = np.random.default_rng(3)
    rows = gallery_rows.TIMED_FROM_ROWS
    gallery = Gallery("m", 64)
    vectors = rng.normal(size=(rows, 64)).astype(np.float32)
    gallery.add_faces([f"p{i // 4:05d}" for i in range(rows)], vectors, "m")
    queries = vectors[[5, 999, rows - 1]] + 0.05 * rng.normal(size=(3, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    batch = gallery.match(queries, threshold=0.5)
    assert [m.name for m in batch] == ["p00001", "p00249", f"p{(rows - 1) // 4:05d}"]
    assert [gallery.match(q[None], threshold=0.5)[0].name for q in queries] == [m.name for m in batch]
    key = (1 << (rows - 1).bit_length(), 64)
    assert gallery_rows._HALF_WINS[key] == gallery.coarse_in_half_for


def test_one_person_with_thousands_of_faces_does_not_hide_the_others() -> None:
    """Candidates gathered to a small depth first: a query nearest a person with 5,000 faces still gets its top
    people right (the depth grows for that query only), and every other query is unaffected."""
    rng = np.random.default_rng(11)
    gallery = Gallery("m", 64)
    crowd_centre = rng.normal(size=64)
    gallery.add("crowd", crowd_centre + 0.3 * rng.normal(size=(5000, 64)), "m")
    centres = rng.normal(size=(40, 64))
    for person in range(40):
        gallery.add(f"p{person:02d}", centres[person] + 0.3 * rng.normal(size=(3, 64)), "m")
    queries = np.concatenate([crowd_centre[None], centres[:5]]) + 0.2 * rng.normal(size=(6, 64))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    rows, names = gallery.embeddings, np.asarray(gallery.names)
    people = sorted(set(gallery.names))
    brute = np.stack([(queries @ rows[names == p].T).max(axis=1) for p in people], axis=1)
    for query, match in enumerate(gallery.match(queries, threshold=0.3, top_k=3)):
        order = np.argsort(-brute[query], kind="stable")[:3]
        assert [c.name for c in match.candidates] == [people[i] for i in order]
    assert gallery.match(queries[:1], 0.3)[0].name == "crowd"


def test_a_long_run_of_changes_keeps_every_lookup_in_step_with_a_plain_model() -> None:
    """Adds, removals of faces and of people, and forgets in random order: faces, people, chips, embeddings and
    matching all agree with a plain dictionary of what should be there, and with a snapshot read back."""
    rng = np.random.default_rng(5)
    gallery = Gallery("m", 16)
    expected: dict[str, tuple[str, bool, np.ndarray]] = {}  # face id -> (person, chip, normalised vector)
    for step in range(600):
        action = rng.random()
        if action < 0.6 or not expected:
            name = f"p{rng.integers(0, 30):02d}"
            vectors = rng.normal(size=(int(rng.integers(1, 4)), 16)).astype(np.float32)
            chips = [bool(c) for c in rng.integers(0, 2, size=len(vectors))]
            ids = gallery.add(name, vectors, "m", chips)
            for face_id, vector, chip in zip(ids, vectors, chips, strict=True):
                expected[face_id] = (name, chip, vector / np.linalg.norm(vector))
        elif action < 0.8:
            face_id = sorted(expected)[int(rng.integers(0, len(expected)))]
            assert gallery.remove_face(expected[face_id][0], face_id)
            del expected[face_id]
        elif action < 0.9:
            name = expected[sorted(expected)[int(rng.integers(0, len(expected)))]][0]
            of_person = [f for f, (n, _, _) in expected.items() if n == name]
            assert gallery.remove_person(name) == len(of_person)
            for face_id in of_person:
                del expected[face_id]
        else:
            forgotten = set(sorted(expected)[: int(rng.integers(1, 3))]) | {f"{step:012x}"}
            assert gallery.forget(forgotten) == len(forgotten) - 1
            for face_id in forgotten:
                expected.pop(face_id, None)
        if step % 50 == 0 or step == 599:
            for copy in (gallery, Gallery.from_bytes(gallery.to_bytes())):
                assert sorted(copy.faces()) == sorted((n, f, c) for f, (n, c, _) in expected.items())
                people: dict[str, int] = {}
                for name, _, _ in expected.values():
                    people[name] = people.get(name, 0) + 1
                assert copy.people() == dict(sorted(people.items()))
                for face_id, (name, _, vector) in expected.items():
                    assert np.allclose(copy.embedding_of(face_id), vector, atol=1e-6)
                    assert copy.person_of(face_id) == name
                rows = copy.embeddings
                for row, name in enumerate(copy.names):
                    assert np.allclose(rows[row], expected[copy.faces()[row][1]][2], atol=1e-6)
                    assert copy.faces()[row][0] == name
    removed = gallery.removed_ids
    assert not removed & set(expected)
    probe = next(iter(expected.values()))
    assert gallery.match(probe[2][None], threshold=0.99)[0].name == probe[0]


def test_adding_one_face_to_a_large_gallery_copies_nothing_but_that_face() -> None:
    """Appends go into spare capacity: the rows keep their memory (no copy of the whole matrix per change) until
    the capacity doubles; removals move one row."""
    gallery = Gallery("m", 32)
    rng = np.random.default_rng(2)
    gallery.add_faces([f"p{i // 4}" for i in range(4000)], rng.normal(size=(4000, 32)).astype(np.float32), "m")
    gallery.add("first", rng.normal(size=(1, 32)), "m")  # full: the capacity doubles once, here
    before = gallery.embeddings.__array_interface__["data"][0]
    for person in range(50):
        gallery.add(f"new{person}", rng.normal(size=(1, 32)), "m")
        gallery.remove_face(f"p{person}", gallery.faces_of(f"p{person}")[0])
    assert gallery.embeddings.__array_interface__["data"][0] == before
    assert len(gallery) == 4001
