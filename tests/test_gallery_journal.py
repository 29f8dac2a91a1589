"""The gallery as a base plus changes: group commits, two writers racing, crashes between steps, compaction, catch-up.

The GalleryWriter deployment class itself (no Serve), on a directory store and on the moto server's S3. Embeddings
are random unit vectors: these tests are about what is stored and read back, not about recognition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve_app.deployments import gallery_writer
from serve_app.deployments.gallery_writer import GalleryWriterDeployment
from serve_app.gallery_journal import behind_the_base, load_gallery, read_changes
from serve_app.gallery_store import GalleryStore, GalleryStoreError, LocalGalleryStore, open_gallery_store
from serve_app.model.gallery import Gallery
from serve_app.model.gallery_change import GalleryChange, StagedChange, apply_change
from serve_app.model.reembedding import plan_carry_over
from serve_app.settings import RecognitionConfig
from tests.store_fixtures import store_uri

pytestmark = pytest.mark.aws

__all__ = ["store_uri"]  # the fixture, used by name
CONFIG = RecognitionConfig()
MODEL = CONFIG.model_id
DIM = CONFIG.resolved_checkpoint().dim


def vectors(count: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    normalised: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return normalised


def bound(uri: str) -> GalleryStore:
    return open_gallery_store(uri, model_id=MODEL)


def run(scenario: Callable[[], Any]) -> Any:
    return asyncio.run(scenario())


async def stopped(*writers: GalleryWriterDeployment) -> None:
    for writer in writers:
        writer._background.stop_all()
    await asyncio.sleep(0)


def test_concurrent_enrolments_are_one_change_each_of_a_few_kilobytes(store_uri: str) -> None:
    async def scenario() -> None:
        writer = GalleryWriterDeployment(store_uri, CONFIG, sync_period_s=3600)
        base_ids, _ = await writer.add_faces("base", vectors(200, 0), MODEL)
        answers = await asyncio.gather(*(writer.add_faces(f"p{i}", vectors(1, i + 1), MODEL) for i in range(16)))
        await stopped(writer)
        store = bound(store_uri)
        revisions = store.change_revisions()
        # The first enrolment, then the 16 that arrived together: stored in far fewer changes than 16.
        assert revisions[0] == 1 and len(revisions) < 1 + 16
        assert {revision for _, revision in answers} <= set(revisions)
        sizes = [len(store.read_change(r) or b"") for r in revisions[1:]]
        assert max(sizes) < 16 * 2048  # a face is about 1 KB: a change holds its faces, not the gallery
        loaded = load_gallery(store, MODEL)
        assert loaded is not None and len(loaded) == 216 and loaded.revision == revisions[-1]
        assert set(base_ids) | {ids[0] for ids, _ in answers} == loaded.face_ids()

    run(scenario)


def test_two_writers_racing_each_store_their_changes_and_neither_overwrites_the_other(store_uri: str) -> None:
    """A second writer (a restart, a model switch) staged the same revision as the first: the store takes one, the
    other learns it lost, takes the winner's change and stores its own on top."""

    async def scenario() -> None:
        first = GalleryWriterDeployment(store_uri, CONFIG, sync_period_s=3600)
        second = GalleryWriterDeployment(store_uri, CONFIG, sync_period_s=3600)  # both at revision 0
        ann, ann_revision = await first.add_faces("ann", vectors(2, 1), MODEL)
        assert len(ann) == 2
        bob, bob_revision = await second.add_faces("bob", vectors(1, 2), MODEL)  # staged as 1: lost, then 2
        assert (ann_revision, bob_revision) == (1, 2)
        removed, revision = await first.remove_person("bob")  # the first takes the second's change first
        assert (removed, revision) == (1, 3)
        eve, _ = await second.add_faces("eve", vectors(1, 3), MODEL)
        await stopped(first, second)
        loaded = load_gallery(bound(store_uri), MODEL)
        assert loaded is not None and loaded.people() == {"ann": 2, "eve": 1}
        assert set(ann) | set(eve) == loaded.face_ids()
        assert loaded.removed_ids == frozenset(bob) and loaded.revision == 4
        assert second.people()[0] == loaded.people()

    run(scenario)


def test_a_stale_change_cannot_be_stored_over_another(store_uri: str) -> None:
    store = bound(store_uri)
    gallery = Gallery(MODEL, DIM)
    staged = StagedChange(gallery)
    staged.add("ann", vectors(1, 1), MODEL)
    mine = staged.change(1).to_bytes()
    other = StagedChange(gallery)
    other.add("bob", vectors(1, 2), MODEL)
    assert store.write_change(1, mine) is True
    assert store.write_change(1, other.change(1).to_bytes()) is False
    assert store.read_change(1) == mine


class CrashingStore:
    """Makes the ``nth`` write or delete of a store fail, before or after it happens (a writer dying there)."""

    def __init__(self, nth: int, after: bool) -> None:
        self.nth, self.after, self.count = nth, after, 0

    def wrap(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("_put", "_put_new", "_delete"):
            original = getattr(LocalGalleryStore, name)

            def step(store: LocalGalleryStore, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.count += 1
                if self.count == self.nth and not self.after:
                    raise GalleryStoreError("the writer died before this write")
                result = _original(store, *args, **kwargs)
                if self.count == self.nth and self.after:
                    raise GalleryStoreError("the writer died after this write")
                return result

            monkeypatch.setattr(LocalGalleryStore, name, step)


#: Writes and deletes in the scenario below (26 with its erasures, whose background steps interleave with the
#: enrolments that follow): every one is crashed at, before and after.
STEPS = 26


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("nth", range(1, STEPS + 1))
def test_a_writer_dying_between_any_two_steps_loses_no_acknowledged_change(
    nth: int, after: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enrolments (with chips), removals with their erasures, and a compaction; the writer dies at one write or
    delete. Every change that was answered is in the store a new writer reads, no removed face comes back, a change
    that was not answered is there whole or not at all, and the new writer finishes the erasures the dead one left:
    no object holds a removed face's embedding or chip."""
    monkeypatch.setattr(gallery_writer, "COMPACT_AFTER_CHANGES", 4)
    monkeypatch.setattr(gallery_writer, "RETAINED_CHANGES", 1)
    uri = str(tmp_path / "store")
    crash = CrashingStore(nth, after)
    acknowledged: dict[str, set[str]] = {}  # person -> face ids answered as enrolled
    removed: set[str] = set()
    unanswered: list[tuple[str, str]] = []
    embeddings: dict[str, bytes] = {}  # face id -> its embedding as the gallery stores it

    async def scenario() -> None:
        writer = GalleryWriterDeployment(uri, CONFIG, sync_period_s=3600)
        crash.wrap(monkeypatch)  # from here on (the empty base is written)
        steps: list[tuple[str, str]] = [("enrol", "ann"), ("enrol", "bob"), ("remove", "ann"), ("enrol", "cy")]
        steps += [("enrol", "dee"), ("remove", "bob"), ("enrol", "ann")]
        for index, (action, person) in enumerate(steps):
            try:
                if action == "enrol":
                    ids, _ = await writer.add_faces(person, vectors(1, index), MODEL, [b"chip %d" % index])
                    acknowledged.setdefault(person, set()).update(ids)
                    embeddings.update((face_id, writer._gallery.embedding_of(face_id).tobytes()) for face_id in ids)
                else:
                    count, _ = await writer.remove_person(person)
                    removed.update(acknowledged.pop(person, set()))
                    assert count >= 0
            except GalleryStoreError:
                unanswered.append((action, person))
                break  # the writer is gone
        if writer._compacting is not None:
            await writer._compacting
        for task in (writer._erasing, writer._resuming):  # the writer is gone: what it did not finish stays so
            if task is not None:
                task.cancel()
        await stopped(writer)

    run(scenario)
    monkeypatch.undo()
    loaded = load_gallery(bound(uri), MODEL)
    assert loaded is not None
    pending_removal = {person for action, person in unanswered if action == "remove"}
    for person, ids in acknowledged.items():
        if person in pending_removal and not loaded.faces_of(person):
            continue  # the removal that was not answered was stored whole: it happened
        assert ids <= set(loaded.faces_of(person)), f"{person}'s answered enrolment is lost"
    assert not removed & loaded.face_ids(), "a removed face came back"
    assert removed <= loaded.removed_ids
    assert crash.count >= nth or not unanswered  # the crash happened, or the scenario ended first
    if unanswered:
        action, person = unanswered[0]
        if action == "enrol":  # stored whole (one change) or not at all: zero or one face, never a part
            assert len(set(loaded.faces_of(person)) - acknowledged.get(person, set())) <= 1
    # A new writer starts from it and goes on.

    async def after_restart() -> None:
        writer = GalleryWriterDeployment(uri, CONFIG, sync_period_s=3600)
        ids, revision = await writer.add_faces("zed", vectors(1, 99), MODEL)
        await writer.erasure_settled()
        await stopped(writer)
        again = load_gallery(bound(uri), MODEL)
        assert again is not None and again.revision == revision and set(ids) <= again.face_ids()

    run(after_restart)
    gone = loaded.removed_ids
    stored = {path: path.read_bytes() for path in Path(uri).rglob("*") if path.is_file()}
    for face_id in gone & set(embeddings):
        holding = [str(path) for path, data in stored.items() if embeddings[face_id] in data]
        assert not holding, f"removed face {face_id} is still in {holding}"
        assert not (Path(uri) / "chips" / f"{face_id}.jpg").exists()
    assert bound(uri).erasures() == {}, "an erasure was left owed"


def test_a_replica_behind_catches_up_from_the_changes_or_from_a_compacted_base(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gallery_writer, "COMPACT_AFTER_CHANGES", 10_000)
    monkeypatch.setattr(gallery_writer, "RETAINED_CHANGES", 2)
    store = bound(store_uri)

    async def scenario() -> None:
        writer = GalleryWriterDeployment(store_uri, CONFIG, sync_period_s=3600)
        await writer.add_faces("ann", vectors(3, 1), MODEL)
        replica = load_gallery(store, MODEL)
        assert replica is not None and replica.revision == 1
        for i in range(8):
            await writer.add_faces(f"p{i}", vectors(1, 10 + i), MODEL)
        removed, _ = await writer.remove_person("p3")
        assert removed == 1
        # Behind by 9 changes, all still there: read and applied, one small object each.
        changes = read_changes(store, replica.revision, until=10)
        assert [c.revision for c in changes] == list(range(2, 11))
        for change in changes:
            apply_change(replica, change)
        assert replica.people() == writer.people()[0] and replica.revision == 10
        # A second replica, far behind, after a compaction cleaned up all but the last 2 changes.
        stale = Gallery.from_bytes(replica.to_bytes())
        stale.revision = 1
        await writer.add_faces("late", vectors(1, 50), MODEL)
        base = await writer.compact()
        assert base == 11 and store.change_revisions() == [10, 11]
        assert read_changes(store, 1) == []  # change 2 is gone ...
        assert behind_the_base(store, 1)  # ... and the base is newer: read it again
        fresh = load_gallery(store, MODEL)
        assert fresh is not None and fresh.revision == 11 and fresh.people() == writer.people()[0]
        assert not behind_the_base(store, 11) and read_changes(store, 11) == []
        await stopped(writer)

    run(scenario)


def test_a_removal_stays_removed_across_compaction_and_in_another_models_carry_over(store_uri: str) -> None:
    async def scenario() -> None:
        writer = GalleryWriterDeployment(store_uri, CONFIG, sync_period_s=3600)
        ann, _ = await writer.add_faces("ann", vectors(2, 1), MODEL, [b"a", b"b"])
        await writer.remove_face("ann", ann[0])
        await writer.compact()
        await stopped(writer)
        loaded = load_gallery(bound(store_uri), MODEL)
        assert loaded is not None and loaded.faces_of("ann") == [ann[1]] and ann[0] in loaded.removed_ids
        # Another model's snapshot that still has the face: a carry-over from this one removes it there.
        other = Gallery("other-model", 4)
        other.add_faces(["ann", "ann"], np.eye(4, dtype=np.float32)[:2], "other-model", face_ids=ann)
        plan = plan_carry_over(loaded, other)
        assert plan.to_forget == frozenset({ann[0]})
        # Re-adding the removed id is refused: it never comes back under the same id.
        with pytest.raises(ValueError, match="new, distinct ids"):
            loaded.add("ann", vectors(1, 5), MODEL, face_ids=[ann[0]])

    run(scenario)


def test_a_gallery_written_in_the_single_snapshot_format_is_the_base_of_the_changes(tmp_path: Path) -> None:
    """A store written before changes existed (one ``.npz`` rewritten per change, here the legacy root file):
    read whole, and every later change goes on top of it."""
    old = Gallery(MODEL, DIM)
    old.add("ann", vectors(2, 1), MODEL)
    old.add("bob", vectors(1, 2), MODEL)
    old.remove_person("bob")
    uri = str(tmp_path / "store")
    open_gallery_store(uri).write(old.to_bytes())  # gallery.npz, as an unbound store (and older versions) wrote it

    async def scenario() -> None:
        writer = GalleryWriterDeployment(uri, CONFIG, sync_period_s=3600)
        assert writer.people()[0] == {"ann": 2} and writer.revision() == 3
        ids, revision = await writer.add_faces("cy", vectors(1, 3), MODEL)
        assert revision == 4
        await stopped(writer)
        loaded = load_gallery(bound(uri), MODEL)
        assert loaded is not None and loaded.people() == {"ann": 2, "cy": 1}
        assert loaded.removed_ids == old.removed_ids and set(ids) <= loaded.face_ids()

    run(scenario)


def test_a_change_read_back_is_the_change_written() -> None:
    gallery = Gallery(MODEL, DIM)
    gallery.add("ann", vectors(2, 1), MODEL, [True, False])
    staged = StagedChange(gallery)
    staged.add("bob", vectors(1, 2), MODEL, [True])
    staged.remove_face("ann", gallery.faces_of("ann")[0])
    staged.forget(frozenset({"0123456789ab"}))
    change = staged.change(gallery.revision + 1)
    again = GalleryChange.from_bytes(change.to_bytes())
    assert again.removed_ids == change.removed_ids and again.face_ids == change.face_ids
    assert again.names == ("bob",) and again.has_chip == (True,)
    assert np.array_equal(again.embeddings, change.embeddings)
    apply_change(gallery, again)
    assert gallery.people() == {"ann": 1, "bob": 1} and "0123456789ab" in gallery.removed_ids
    with pytest.raises(ValueError, match="cannot follow"):
        apply_change(gallery, again)  # out of order: refused, nothing applied twice
