"""Two GalleryWriters of two models on one store, as during a model switch (no Serve: the deployment class itself).

Real photos, both shipped checkpoints: an enrolment embedded by the other model's replica is embedded again from
its chips; without chips it is refused; each writer carries the other's enrolments and removals over.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from serve_app.deployments.gallery_writer import GalleryWriterDeployment
from serve_app.gallery_journal import load_gallery
from serve_app.gallery_store import open_gallery_store
from serve_app.model.enrollment import EnrolmentPhoto, embed_for_enrolment
from serve_app.model.gallery import GalleryError, ModelMismatchError
from serve_app.model.pipeline import Models
from serve_app.settings import RecognitionConfig

from .conftest import SCENES

KERAS = RecognitionConfig()
CASIA = RecognitionConfig(checkpoint="casia-webface-512")


def photos_of(models: Models, person: str) -> list[EnrolmentPhoto]:
    paths = sorted((SCENES / "knn" / "train" / person).iterdir())
    outcomes = embed_for_enrolment(models.detector, models.embedder, [(p.name, p.read_bytes()) for p in paths])
    return [o for o in outcomes if o.embedding is not None]


async def enrol(writer: GalleryWriterDeployment, person: str, photos: list[EnrolmentPhoto], with_chips: bool = True):  # type: ignore[no-untyped-def]
    return await writer.add_faces(
        person,
        np.stack([o.embedding for o in photos if o.embedding is not None]),
        photos[0].model_id,
        [o.chip for o in photos] if with_chips else None,
    )


def test_two_writers_of_two_models_keep_each_others_changes(models: Models, tmp_path: Path) -> None:
    store_uri = str(tmp_path / "store")

    async def scenario() -> None:
        old = GalleryWriterDeployment(store_uri, KERAS, sync_period_s=3600)
        for person in ("obama", "biden"):
            await enrol(old, person, photos_of(models, person))
        new = GalleryWriterDeployment(store_uri, CASIA, sync_period_s=3600)
        # The new model's writer catches up with the old snapshot at once (embedding the chips itself).
        reports = await new.follow_other_models()
        assert [r.embedded for r in reports] == [4]
        assert new.people()[0] == old.people()[0] == {"biden": 2, "obama": 2}

        # An enrolment embedded by an old-model replica reaches the new writer: it embeds the chips itself.
        kit = photos_of(models, "kit_harington")
        assert kit[0].model_id == KERAS.model_id
        face_ids, _ = await enrol(new, "kit_harington", kit)
        casia_snapshot = open_gallery_store(store_uri, model_id=CASIA.model_id).read()
        assert casia_snapshot is not None and len(face_ids) == 2
        # Without chips it cannot be: refused (503 model_switching over HTTP), never stored in the wrong space.
        with pytest.raises(ModelMismatchError):
            await enrol(new, "rose_leslie", photos_of(models, "rose_leslie"), with_chips=False)

        # A removal under the new model and the enrolment above reach the old model's snapshot (a rollback).
        removed = new.person("obama")[0][0][0]
        assert (await new.remove_face("obama", removed))[0]
        await old.follow_other_models()
        old_faces = {face_id for face_id, _ in old.person("obama")[0]}
        assert removed not in old_faces and len(old_faces) == 1
        assert {face_id for face_id, _ in old.person("kit_harington")[0]} == set(face_ids)
        await new.follow_other_models()  # nothing to carry back: it only refreshes what it knows of the old one
        statuses = {s.model_id: (s.faces, s.active) for s in new.snapshots()}
        assert statuses == {CASIA.model_id: (5, True), KERAS.model_id: (5, False)}
        # Revisions count each model's snapshot on its own: a replica of the other model hears 0.
        assert new.revision(CASIA.model_id) > 0 and new.revision(KERAS.model_id) == 0

    asyncio.run(scenario())


def test_a_person_forgotten_during_a_switch_is_forgotten_in_both_models(models: Models, tmp_path: Path) -> None:
    """Enrolled through the old model's writer moments before the new one forgets them (it has not carried that
    enrolment over yet): gone from both snapshots, chips included, and never carried back."""
    store_uri = str(tmp_path / "store")

    async def scenario() -> None:
        old = GalleryWriterDeployment(store_uri, KERAS, sync_period_s=3600)
        await enrol(old, "biden", photos_of(models, "biden"))
        new = GalleryWriterDeployment(store_uri, CASIA, sync_period_s=3600)
        assert [r.embedded for r in await new.follow_other_models()] == [2]
        obama, _ = await enrol(old, "obama", photos_of(models, "obama"))  # not followed by the new writer yet
        assert (await new.remove_person("obama"))[0] == len(obama) == 2
        await new.erasure_settled()
        await new.follow_other_models()
        await old.follow_other_models()
        for writer in (new, old):
            assert writer.people()[0] == {"biden": 2}
            writer._background.stop_all()
        for model in (KERAS, CASIA):
            loaded = load_gallery(open_gallery_store(store_uri, model_id=model.model_id), model.model_id)
            assert loaded is not None and loaded.people() == {"biden": 2}
        assert all(open_gallery_store(store_uri).read_chip(face_id) is None for face_id in obama)

    asyncio.run(scenario())


def test_two_reembeddings_asked_at_once_start_one(tmp_path: Path) -> None:
    """Two `POST /v1/gallery/reembed` at the same moment: one starts, the other is told one is running."""

    async def scenario() -> None:
        writer = GalleryWriterDeployment(str(tmp_path / "store"), KERAS, sync_period_s=3600)
        outcomes = await asyncio.gather(
            writer.reembed("casia-webface-512"), writer.reembed("casia-webface-512"), return_exceptions=True
        )
        started = [o for o in outcomes if isinstance(o, dict)]
        refused = [o for o in outcomes if isinstance(o, GalleryError)]
        assert len(started) == 1 and len(refused) == 1, outcomes
        assert "already running" in str(refused[0])
        assert writer._reembed_task is not None
        await asyncio.wait_for(writer._reembed_task, 120)

    asyncio.run(scenario())
