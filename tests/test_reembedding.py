"""Re-embedding a gallery with another checkpoint from its chips: same people, same face ids, new model.

Real photos and both shipped checkpoints (facenet-keras-128 and casia-webface-512); the bookkeeping (removals,
resuming, faces without chips) is checked on the same real galleries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serve_app.gallery_store import LocalGalleryStore
from serve_app.model.embedder import Embedder
from serve_app.model.enrollment import embed_for_enrolment
from serve_app.model.gallery import Gallery, GalleryError
from serve_app.model.pipeline import Models
from serve_app.model.recognizer import Recognizer
from serve_app.model.reembedding import carry_over, chip_embedder, plan_carry_over
from serve_app.settings import RecognitionConfig
from serve_app.snapshot_reembed import load_snapshot, reembed_snapshot

from .conftest import SCENES

PEOPLE = ("obama", "biden", "kit_harington")


@pytest.fixture(scope="module")
def casia() -> Models:
    return RecognitionConfig(checkpoint="casia-webface-512").load_models(torch_threads=2)


@pytest.fixture
def enrolled(models: Models, tmp_path: Path) -> tuple[Gallery, LocalGalleryStore]:
    """A 3-person gallery of the default model, its chips in a store."""
    store = LocalGalleryStore(tmp_path / "store").for_model(models.embedder.model_id)
    assert isinstance(store, LocalGalleryStore)
    gallery = Gallery(models.embedder.model_id, models.embedder.dim)
    for person in PEOPLE:
        photos = sorted((SCENES / "knn" / "train" / person).glob("*.jp*g"))
        outcomes = embed_for_enrolment(models.detector, models.embedder, [(p.name, p.read_bytes()) for p in photos])
        accepted = [o for o in outcomes if o.embedding is not None and o.chip is not None]
        ids = gallery.add(
            person,
            np.stack([o.embedding for o in accepted if o.embedding is not None]),
            gallery.model_id,
            [True] * len(accepted),
        )
        for face_id, outcome in zip(ids, accepted, strict=True):
            store.write_chip(face_id, outcome.chip or b"")
    store.write(gallery.to_bytes())
    return gallery, store


def name_of(models: Models, gallery: Gallery, photo: Path) -> str | None:
    recognizer = Recognizer(models.detector, models.embedder, gallery, threshold=models.threshold_rule)
    result = recognizer.recognize_bytes([photo.read_bytes()])[0]
    assert not isinstance(result, Exception)
    return result.main_name


def test_reembedding_keeps_names_and_face_ids_and_the_same_photo_is_named_the_same(
    models: Models, casia: Models, enrolled: tuple[Gallery, LocalGalleryStore]
) -> None:
    keras_gallery, store = enrolled
    report = reembed_snapshot(store, keras_gallery, casia.embedder)
    assert report.embedded == len(keras_gallery) and not report.without_chip and not report.missing_chip
    reembedded = load_snapshot(store.for_model(casia.embedder.model_id))
    assert reembedded is not None
    assert reembedded.model_id == casia.embedder.model_id != keras_gallery.model_id and reembedded.dim == 512
    assert sorted(reembedded.faces()) == sorted(keras_gallery.faces())  # same names, face ids, chip flags
    # The old snapshot stays as it was, for a rollback.
    assert load_snapshot(store).faces() == keras_gallery.faces()  # type: ignore[union-attr]
    for photo, person in (("obama1.jpg", "obama"), ("johnsnow_test1.jpg", "kit_harington")):
        before = name_of(models, keras_gallery, SCENES / "knn" / "test" / photo)
        after = name_of(casia, reembedded, SCENES / "knn" / "test" / photo)
        assert before == after == person


def test_carry_over_follows_removals_keeps_the_targets_own_faces_and_never_revives_a_removed_face(
    casia: Models, enrolled: tuple[Gallery, LocalGalleryStore]
) -> None:
    source, store = enrolled
    embed = chip_embedder(casia.embedder)
    target = Gallery(casia.embedder.model_id, 512)
    carry_over(source, target, store.read_chip, embed)
    stale = Gallery.from_bytes(source.to_bytes())  # the source as it was before the changes below

    removed = source.faces_of("biden")[0]
    assert source.remove_face("biden", removed)
    own = target.add("rose", np.eye(1, 512, dtype=np.float32), target.model_id)[0]  # enrolled under the target
    report = carry_over(source, target, store.read_chip, embed)
    assert report.removed == 1 and report.embedded == 0
    assert removed not in target.face_ids() and removed in target.removed_ids and own in target.face_ids()
    # A stale copy that still has the removed face cannot bring it back (the tombstone travels with the target).
    assert plan_carry_over(stale, target).changes_nothing
    # Tombstones survive the snapshot format.
    assert removed in Gallery.from_bytes(target.to_bytes()).removed_ids
    with pytest.raises(GalleryError):
        target.add("biden", np.eye(1, 512, dtype=np.float32), target.model_id, face_ids=[removed])


def test_an_interrupted_reembedding_resumes_where_it_saved(
    casia: Models, enrolled: tuple[Gallery, LocalGalleryStore], tmp_path: Path
) -> None:
    source, store = enrolled
    calls: list[int] = []
    real = chip_embedder(casia.embedder)

    class CrashError(RuntimeError):
        pass

    def flaky_embedder(crash_after: int) -> Embedder:
        embedder = casia.embedder

        class Flaky(Embedder):
            def __init__(self) -> None:
                self.__dict__.update(embedder.__dict__)

            def embed(self, crops):  # type: ignore[no-untyped-def]
                calls.append(len(crops))
                if len(calls) > crash_after:
                    raise CrashError("the machine went away")
                return embedder.embed(crops)

        return Flaky()

    # Two faces per batch, progress saved after every batch, a crash in the third batch.
    target_store = store.for_model(casia.embedder.model_id)
    with pytest.raises(CrashError):
        carry_over(
            source,
            Gallery(casia.embedder.model_id, 512),
            store.read_chip,
            chip_embedder(flaky_embedder(crash_after=2)),
            batch_size=2,
            save=lambda partial: target_store.write_partial(partial.to_bytes()),
            save_every=1,
        )
    assert target_store.read() is None  # nothing half-done is ever served
    partial = Gallery.from_bytes(target_store.read_partial() or b"")
    assert len(partial) == 4
    calls.clear()
    report = reembed_snapshot(store, source, flaky_embedder(crash_after=99))
    assert report.embedded == len(source) - 4 and report.already == 4 and sum(calls) == len(source) - 4
    assert target_store.read_partial() is None
    done = load_snapshot(target_store)
    assert done is not None and sorted(done.faces()) == sorted(source.faces())
    assert real([store.read_chip(done.faces()[0][1]) or b""]).shape == (1, 512)


def test_faces_without_chips_are_reported_and_left_out(casia: Models, tmp_path: Path) -> None:
    legacy = Gallery(casia.embedder.model_id.replace("casia", "legacy"), 4)
    legacy.add("Paul", np.ones((1, 4), dtype=np.float32), legacy.model_id)
    target = Gallery(casia.embedder.model_id, 512)
    report = carry_over(legacy, target, lambda _: None, chip_embedder(casia.embedder))
    assert report.embedded == 0 and [name for name, _ in report.without_chip] == ["Paul"] and len(target) == 0


def test_an_unusable_chip_is_reported_and_the_rest_carried_over(
    casia: Models, enrolled: tuple[Gallery, LocalGalleryStore]
) -> None:
    source, store = enrolled
    broken = source.faces()[0][1]

    def read_chip(face_id: str) -> bytes | None:
        return b"\xff\xd8 not a jpeg after all" if face_id == broken else store.read_chip(face_id)

    target = Gallery(casia.embedder.model_id, 512)
    report = carry_over(source, target, read_chip, chip_embedder(casia.embedder), batch_size=4)
    assert [face_id for _, face_id in report.missing_chip] == [broken]
    assert report.embedded == len(source) - 1 and broken not in target.face_ids()
    # The next call, told to skip it (what the GalleryWriter does), has nothing left to do.
    again = carry_over(source, target, read_chip, chip_embedder(casia.embedder), skip=frozenset({broken}))
    assert again.embedded == 0 and not again.missing_chip and again.left == 0
