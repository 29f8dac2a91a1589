"""Erasure that leaves nothing: after a person is forgotten, no object of the gallery store holds their face.

Two GalleryWriters of two models on one store (a directory, and S3 on the local moto server; the deployment class
itself, no Serve), real photos. The forgotten person's faces are first spread over everything the store keeps:
the old model's base (compacted) and a change after it, the new model's snapshot (carried over from chips), a
partial re-embedding, a ``gallery.npz`` left from before snapshots were kept per model, and the chips. After the
removal, every byte of every object is searched for each of their embeddings (as stored, float32), their chips and
their name.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import boto3
import pytest

from serve_app.deployments.gallery_writer import GalleryWriterDeployment
from serve_app.gallery_store import open_gallery_store
from serve_app.model.gallery import Gallery
from serve_app.model.pipeline import Models
from tests.store_fixtures import store_uri

from .test_gallery_writer_models import CASIA, KERAS, enrol, photos_of

__all__ = ["store_uri"]  # the fixture, used by name


def objects(store_uri: str) -> dict[str, bytes]:
    """Every object of the store, by key."""
    if not store_uri.startswith("s3://"):
        root = Path(store_uri)
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    bucket = store_uri.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def holding(stored: dict[str, bytes], secrets: dict[str, bytes]) -> dict[str, list[str]]:
    """For each secret found anywhere, the objects that hold it."""
    found = {what: [key for key, data in stored.items() if secret in data] for what, secret in secrets.items()}
    return {what: keys for what, keys in found.items() if keys}


@pytest.mark.timeout(600)
def test_a_forgotten_person_is_in_no_object_of_the_store(models: Models, store_uri: str) -> None:

    async def scenario() -> None:
        old = GalleryWriterDeployment(store_uri, KERAS, sync_period_s=3600)
        obama, biden = photos_of(models, "obama"), photos_of(models, "biden")
        await enrol(old, "biden", biden)
        await enrol(old, "obama", obama[:1])
        await old.compact()  # the first face in the base ...
        await enrol(old, "obama", obama[1:])  # ... the second in a change after it
        new = GalleryWriterDeployment(store_uri, CASIA, sync_period_s=3600)
        assert [r.embedded for r in await new.follow_other_models()] == [4]
        # A re-embedding part-way (its partial snapshot) and a root gallery.npz from before per-model snapshots.
        open_gallery_store(store_uri, model_id=CASIA.model_id).write_partial(new._gallery.to_bytes())
        open_gallery_store(store_uri).unbound().write(old._gallery.to_bytes())

        faces = [face_id for face_id, _ in old.person("obama")[0]]
        assert len(faces) == 2
        secrets = {"name (as stored, UTF-32)": "obama".encode("utf-32-le")}
        for writer in (old, new):
            for face_id in faces:
                secrets[f"{writer._model_id} {face_id}"] = writer._gallery.embedding_of(face_id).tobytes()
        store = open_gallery_store(store_uri, model_id=KERAS.model_id)
        for face_id in faces:
            chip = store.read_chip(face_id)
            assert chip is not None
            secrets[f"chip {face_id}"] = chip
        before = holding(objects(store_uri), secrets)
        assert set(before) == set(secrets), f"not spread: {sorted(set(secrets) - set(before))}"
        assert any(".changes/" in key for key in before[f"{KERAS.model_id} {faces[1]}"])

        assert (await old.remove_person("obama"))[0] == 2
        await old.erasure_settled()

        after = holding(objects(store_uri), secrets)
        assert after == {}, f"still stored after the erasure: {after}"
        # Everyone else is still there, in every model, and a writer or replica joining reads them.
        assert old.people()[0] == {"biden": 2}
        for model in (KERAS, CASIA):
            gallery = Gallery.from_bytes(open_gallery_store(store_uri, model_id=model.model_id).read() or b"")
            assert gallery.people() == {"biden": 2} and not set(faces) & gallery.face_ids()
        again = GalleryWriterDeployment(store_uri, CASIA, sync_period_s=3600)
        assert again.people()[0] == {"biden": 2}
        # The removal itself stays recorded by face id (a tombstone), so the faces never come back.
        assert set(faces) <= again._gallery.removed_ids

    asyncio.run(scenario())
