"""Erasure when something goes wrong: a compaction racing it, a re-embedding that fails, a chip delete that fails,
and a store that fails part of a call. (A writer that dies part-way is `test_gallery_journal.py`'s crash test.)

The GalleryWriter deployment class itself (no Serve), on a directory store and on the moto server's S3. Embeddings
are random unit vectors: these tests are about which objects hold a face, not about recognition.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest
from s3transfer.exceptions import S3DownloadFailedError

from serve_app.deployments import gallery_writer
from serve_app.deployments.gallery_writer import GalleryWriterDeployment
from serve_app.gallery_store import GalleryStoreError, S3GalleryStore, open_gallery_store
from serve_app.model.gallery import Gallery
from tests.store_fixtures import store_uri

from .test_erasure import holding, objects
from .test_gallery_journal import CONFIG, MODEL, run, stopped, vectors

pytestmark = pytest.mark.aws

__all__ = ["store_uri"]  # the fixture, used by name
OTHER_MODEL = "casia-webface-512"


def test_a_compaction_that_lands_after_the_erasure_does_not_bring_the_face_back(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A routine compaction serialised the gallery before the removal and uploads slowly (a large base); the
    erasure's base must not be overwritten by it."""
    monkeypatch.setattr(gallery_writer, "COMPACT_AFTER_CHANGES", 3)

    async def scenario() -> None:
        writer = GalleryWriterDeployment(store_uri, CONFIG, sync_period_s=3600)
        ids, _ = await writer.add_faces("obama", vectors(1, 2), MODEL, [b"chip of obama"])
        secrets = {"embedding": writer._gallery.embedding_of(ids[0]).tobytes(), "chip": b"chip of obama"}
        write, started = writer._store.write, threading.Event()

        def slow_write(data: Any) -> None:
            started.set()
            time.sleep(0.5)
            write(data)

        writer._store.write = slow_write  # type: ignore[method-assign]
        await writer.add_faces("bob", vectors(1, 3), MODEL)
        await writer.add_faces("cy", vectors(1, 4), MODEL)  # the third change: the routine compaction starts
        assert writer._compacting is not None
        assert await asyncio.to_thread(started.wait, 10)  # it is uploading a base that holds obama
        writer._store.write = write  # type: ignore[method-assign]
        await writer.remove_person("obama")
        await writer.erasure_settled()
        await writer._compacting
        await stopped(writer)
        assert holding(objects(store_uri), secrets) == {}
        assert open_gallery_store(store_uri, model_id=MODEL).erasures() == {}

    run(scenario)


def test_a_re_embedding_that_fails_leaves_no_erased_face_in_its_partial(
    store_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-embedding had embedded the face before it was removed, saves its partial after the erasure, then
    fails: the face is erased from the partial once the run is over, however it ended."""
    removed = threading.Event()
    writers: list[GalleryWriterDeployment] = []

    class Embedder:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.model_id, self.dim = OTHER_MODEL, 512

    def failing_reembedding(store: Any, source: Gallery, embedder: Embedder, progress: Any = None) -> None:
        target = Gallery(embedder.model_id, embedder.dim)
        names, face_ids = [name for name, _, _ in source.faces()], [face_id for _, face_id, _ in source.faces()]
        rows = np.random.default_rng(9).normal(size=(len(source), embedder.dim)).astype(np.float32)
        target.add_faces(names, rows, embedder.model_id, face_ids=face_ids)
        assert removed.wait(10)
        erasing = writers[0]._erasing
        deadline = time.monotonic() + 10
        while not (erasing is not None and erasing.done()) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the removal's erasure is over (it found no partial yet)
        store.for_model(embedder.model_id).write_partial(target.to_bytes())  # its next save, after the erasure
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gallery_writer, "Embedder", Embedder)
    monkeypatch.setattr(gallery_writer, "reembed_snapshot", failing_reembedding)

    async def scenario() -> None:
        writer = GalleryWriterDeployment(store_uri, CONFIG, sync_period_s=3600)
        writers.append(writer)
        ids, _ = await writer.add_faces("obama", vectors(1, 2), MODEL, [b"chip of obama"])
        await writer.add_faces("bob", vectors(1, 3), MODEL)
        await writer.reembed(OTHER_MODEL)
        await writer.remove_person("obama")
        removed.set()
        await writer.erasure_settled()
        assert writer._reembed_task is not None
        await writer._reembed_task
        await writer.erasure_settled()
        await stopped(writer)
        progress = writer.reembed_progress()
        assert progress is not None and progress["state"] == "failed"
        data = open_gallery_store(store_uri, model_id=OTHER_MODEL).read_partial()
        assert data is not None
        partial = Gallery.from_bytes(data)
        assert not partial.has_face(ids[0]) and partial.people() == {"bob": 1}

    run(scenario)


def test_a_chip_whose_delete_failed_is_deleted_by_the_erasure(store_uri: str) -> None:
    async def scenario() -> None:
        writer = GalleryWriterDeployment(store_uri, CONFIG, sync_period_s=3600)
        ids, _ = await writer.add_faces("obama", vectors(1, 2), MODEL, [b"chip of obama"])
        delete_chips = writer._store.delete_chips

        def failing(face_ids: Any) -> None:
            raise GalleryStoreError("timeout")

        writer._store.delete_chips = failing  # type: ignore[method-assign]
        await writer.remove_person("obama")  # stored and answered; its chip is still there
        writer._store.delete_chips = delete_chips  # type: ignore[method-assign]
        await writer.erasure_settled()
        await stopped(writer)
        assert open_gallery_store(store_uri).read_chip(ids[0]) is None
        assert holding(objects(store_uri), {"chip": b"chip of obama"}) == {}

    run(scenario)


class PartlyFailingS3:
    """An S3 client whose DeleteObjects answers 200 with per-key errors and whose downloads fail their ETag check
    (a base replaced part-way through a multipart download)."""

    def delete_objects(self, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:  # noqa: N803 (boto3's names)
        key = Delete["Objects"][0]["Key"]
        return {"Errors": [{"Key": key, "Code": "AccessDenied", "Message": "Access Denied"}]}

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803
        return {"ETag": '"1"', "Metadata": {"model-id": MODEL, "revision": "1"}}

    def download_fileobj(self, *args: Any, **kwargs: Any) -> None:
        raise S3DownloadFailedError("Contents of stored object did not match expected ETag.")


def test_the_store_reports_what_s3_failed_inside_an_answer() -> None:
    store = S3GalleryStore(PartlyFailingS3(), "bucket", "gallery", model_id=MODEL)
    with pytest.raises(GalleryStoreError, match=r"1 objects not deleted .*AccessDenied"):
        store.delete_chips(["0123456789ab"])
    with pytest.raises(GalleryStoreError, match="S3DownloadFailedError"), store.open_snapshot():
        pass
