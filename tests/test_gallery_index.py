"""The approximate index of a large gallery: it names who exact search names, follows every change, and is
built while the gallery keeps serving exactly.

The gallery here is real LFW faces (one photo of each person enrolled, another held out as the query) among
distractors drawn from a Gaussian with the real embeddings' mean and covariance; the index is forced on at this
size (the service builds one only where an exact query takes longer than 20 ms).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from serve_app.model.gallery import Gallery
from serve_app.model.gallery_index import FILL_CHUNK, IndexPolicy, build_index, list_count

from .conftest import LFW

DISTRACTORS = 60_000
FORCED = IndexPolicy(considered_from=1, budget_s=0.0)


def gallery_of(real_faces: tuple[list[str], np.ndarray, np.ndarray], model_id: str) -> Gallery:
    people, enrolled, held_out = real_faces
    real = np.concatenate([enrolled, held_out])
    rng = np.random.default_rng(7)
    drawn = rng.multivariate_normal(real.mean(axis=0), np.cov(real, rowvar=False), DISTRACTORS, method="eigh")
    gallery = Gallery(model_id, enrolled.shape[1])
    gallery.add_faces(people, enrolled, model_id)
    gallery.add_faces([f"distractor-{i // 5}" for i in range(DISTRACTORS)], drawn.astype(np.float32), model_id)
    return gallery


def test_the_index_names_who_exact_search_names(models: Any, real_faces: Any) -> None:
    people, _, held_out = real_faces
    exact = gallery_of(real_faces, models.embedder.model_id)
    indexed = gallery_of(real_faces, models.embedder.model_id)
    index = build_index(indexed, threading.Lock(), FORCED)
    assert index is not None and indexed.index is index and len(index) == len(indexed)
    assert exact.index is None
    assert indexed.coarse_in_half_for == (False, False)  # the float16 mirror is freed: the index chooses now
    queries = held_out / np.linalg.norm(held_out, axis=1, keepdims=True)
    by_exact = exact.match(queries, threshold=0.5, top_k=3)
    by_index = indexed.match(queries, threshold=0.5, top_k=3)
    top1 = [a.candidates[0].name == b.candidates[0].name for a, b in zip(by_exact, by_index, strict=True)]
    assert np.mean(top1) >= 0.95, f"recall@1 {np.mean(top1):.3f} against exact search"
    # Where both found the same person, the score is the exact one, not the index's 8-bit estimate.
    for a, b in zip(by_exact, by_index, strict=True):
        if a.candidates[0].name == b.candidates[0].name:
            assert a.similarity == pytest.approx(b.similarity, abs=1e-6)
    named = sum(m.name == p for m, p in zip(by_index, people, strict=True))
    assert named >= 0.8 * len(people)


def test_changes_while_the_index_fills_are_all_in_it(models: Any, real_faces: Any) -> None:
    people, enrolled, _ = real_faces
    gallery = gallery_of(real_faces, models.embedder.model_id)
    lock = threading.Lock()
    # Train and attach by hand, then interleave fills with changes: removals move rows not yet added below the
    # fill's cursor, and new faces arrive while it runs.
    from serve_app.model.gallery_index import FaceIndex

    index = FaceIndex(gallery.dim, list_count(len(gallery)))
    index.train(gallery.sample_rows(40 * index.lists))
    gallery.attach_index(index)
    assert gallery.index is None  # not searched until complete
    removed = [gallery.faces_of(f"distractor-{i}")[0] for i in range(0, 400, 3)]
    removed_rows = np.stack([gallery.embedding_of(face_id) for face_id in removed])
    added = enrolled[:20] + 0.01
    with lock:
        assert not gallery.fill_index(FILL_CHUNK // 8)
    for face_id in removed:
        gallery.remove_face(str(gallery.person_of(face_id)), face_id)
    gallery.add_faces([f"late-{i}" for i in range(20)], added, models.embedder.model_id)
    gallery.remove_person(people[0])
    while not gallery.fill_index(FILL_CHUNK // 8):
        pass
    assert gallery.index is index and len(index) == len(gallery)
    # Every face is found by its own embedding, and no removed face is ever a candidate.
    sample = sorted(gallery.face_ids())[::97]
    own = gallery.match(np.stack([gallery.embedding_of(f) for f in sample]), threshold=0.5, top_k=3)
    assert [m.candidates[0].face_id for m in own] == sample
    late = gallery.match(added / np.linalg.norm(added, axis=1, keepdims=True), threshold=0.5)
    assert [m.name for m in late] == [f"late-{i}" for i in range(20)]
    for match in gallery.match(removed_rows, threshold=0.5, top_k=5):
        assert not {c.face_id for c in match.candidates} & set(removed)
    assert people[0] not in gallery.people()


def test_a_removed_face_is_never_a_candidate_again(models: Any, real_faces: Any) -> None:
    people, enrolled, held_out = real_faces
    gallery = gallery_of(real_faces, models.embedder.model_id)
    assert build_index(gallery, threading.Lock(), FORCED) is not None
    for person in people[:10]:
        gallery.remove_person(person)
    queries = np.concatenate([enrolled[:10], held_out[:10]])
    for match in gallery.match(queries / np.linalg.norm(queries, axis=1, keepdims=True), threshold=0.5, top_k=5):
        assert not {c.name for c in match.candidates} & set(people[:10])
    assert len(gallery.index or ()) == len(gallery)


def test_a_gallery_that_shrinks_under_its_index_still_answers_as_exact_search(models: Any, real_faces: Any) -> None:
    """Removed down to fewer faces than the first depth of candidates (erasures can do that): the index's short
    lists hand the query to exact search, never a short or empty answer."""
    people, _, held_out = real_faces
    gallery = gallery_of(real_faces, models.embedder.model_id)
    assert build_index(gallery, threading.Lock(), FORCED) is not None
    queries = held_out / np.linalg.norm(held_out, axis=1, keepdims=True)
    for left in (40, 3):
        keep = set(people[:left])
        gallery.forget(frozenset(f for f in gallery.face_ids() if gallery.person_of(f) not in keep))
        assert gallery.person_count() == left and gallery.index is not None
        found = gallery.match(queries, threshold=0.5)
        exact = gallery.match(queries, threshold=0.5, exact=True)
        assert [len(m.candidates) for m in found] == [len(m.candidates) for m in exact] == [3] * len(queries)
        if left == 3:  # every person is a candidate: the same three, in the same order
            assert [m.candidates for m in found] == [m.candidates for m in exact]


def test_an_index_is_built_only_where_exact_search_is_too_slow(models: Any, real_faces: Any) -> None:
    gallery = gallery_of(real_faces, models.embedder.model_id)
    lock = threading.Lock()
    assert build_index(gallery, lock, IndexPolicy(considered_from=len(gallery) + 1, budget_s=0.0)) is None
    # Fast enough at this size (a budget no query can exceed): not built, and not timed again until it doubles.
    assert build_index(gallery, lock, IndexPolicy(considered_from=1, budget_s=60.0)) is None
    assert not gallery.index_due(FORCED)
    assert build_index(gallery, lock, FORCED) is None and gallery.index is None
    more = len(gallery) + 1
    gallery.add_faces(
        [f"more-{i}" for i in range(more)], np.tile(real_faces[1][:1], (more, 1)) + 0.0, models.embedder.model_id
    )
    assert gallery.index_due(FORCED)
    assert build_index(gallery, lock, FORCED) is not None and gallery.index is not None


def test_the_snapshot_does_not_change_with_an_index(models: Any, real_faces: Any) -> None:
    plain = gallery_of(real_faces, models.embedder.model_id)
    indexed = Gallery.from_bytes(plain.to_bytes())
    build_index(indexed, threading.Lock(), FORCED)
    for gallery in (plain, indexed):
        gallery.remove_person("distractor-3")
    assert indexed.to_bytes() == plain.to_bytes()


def test_a_recognizer_builds_the_index_in_the_background_and_names_real_photos(models: Any, real_faces: Any) -> None:
    from serve_app.model.images import decode_image
    from serve_app.model.recognizer import Recognizer

    people, _, _ = real_faces
    gallery = gallery_of(real_faces, models.embedder.model_id)
    recognizer = Recognizer(models.detector, models.embedder, gallery, threshold=0.5, index_policy=FORCED)
    recognizer.wait_for_index(timeout=240)
    assert gallery.index is not None and len(gallery.index) == len(gallery)
    photos = [sorted((LFW / "images" / person).glob("*.jpg"))[1] for person in people[:10]]
    results = recognizer.recognize([decode_image(p.read_bytes()) for p in photos])
    named = [r.faces[0].name if r.faces else None for r in results]
    assert sum(n == p for n, p in zip(named, people[:10], strict=True)) >= 8
    # A change mirrors into the index at once (the replica applies stored changes this way).
    with recognizer.gallery_lock:
        gallery.remove_person(people[0])
        recognizer.gallery_changed()
    again = recognizer.recognize([decode_image(photos[0].read_bytes())])[0]
    assert all(face.name != people[0] for face in again.faces)
    assert len(gallery.index) == len(gallery)
