"""Gallery snapshots in a directory and in S3 (the moto server): absent, written, changed, read back."""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pytest

from serve_app.gallery_store import GalleryStore, GalleryStoreError, S3GalleryStore, open_gallery_store
from serve_app.model.gallery import Gallery

pytestmark = pytest.mark.aws


def roundtrip(store: GalleryStore) -> None:
    assert store.token() is None and store.read() is None
    gallery = Gallery("m", 2)
    gallery.add("ann", np.array([[1.0, 0.0]], dtype=np.float32), "m")
    store.write(gallery.to_bytes())
    first = store.token()
    assert first is not None
    assert Gallery.from_bytes(store.read() or b"").people() == {"ann": 1}
    gallery.add("bob", np.array([[0.0, 1.0]], dtype=np.float32), "m")
    store.write(gallery.to_bytes())
    assert store.token() not in (None, first)
    loaded = Gallery.from_bytes(store.read() or b"", expected_model_id="m")
    assert loaded.people() == {"ann": 1, "bob": 1} and loaded.revision == 2


def chips_roundtrip(store: GalleryStore) -> None:
    assert store.read_chip("abc123") is None
    store.write_chip("abc123", b"jpeg one")
    store.write_chip("def456", b"jpeg two")
    assert store.read_chip("abc123") == b"jpeg one" and store.read_chip("def456") == b"jpeg two"
    store.delete_chips(["abc123", "0000"])  # a missing chip is no error
    assert store.read_chip("abc123") is None and store.read_chip("def456") == b"jpeg two"
    with pytest.raises(ValueError, match="not a face id"):
        store.write_chip("../gallery", b"x")  # never a path or key outside chips/


def test_local_directory_store(tmp_path: Path) -> None:
    store = open_gallery_store(str(tmp_path / "gallery"))
    roundtrip(store)
    assert [p.name for p in (tmp_path / "gallery").iterdir()] == ["gallery.npz"]
    chips_roundtrip(store)
    assert [p.name for p in (tmp_path / "gallery" / "chips").iterdir()] == ["def456.jpg"]
    assert open_gallery_store(f"file://{tmp_path}/gallery").describe() == store.describe()


def test_s3_store(moto_endpoint: str) -> None:
    boto3.client("s3").create_bucket(Bucket="store-test")
    store = open_gallery_store("s3://store-test/some/prefix")
    assert isinstance(store, S3GalleryStore) and store.describe() == "s3://store-test/some/prefix/gallery.npz"
    roundtrip(store)
    chips_roundtrip(store)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="store-test")["Contents"]]
    assert sorted(keys) == ["some/prefix/chips/def456.jpg", "some/prefix/gallery.npz"]


def per_model_snapshots(store: GalleryStore) -> None:
    """Each model has its own snapshot; ``gallery.npz`` counts as the snapshot of the model it records."""
    first, second = Gallery("m-one", 2), Gallery("m-two", 2)
    first.add("ann", np.array([[1.0, 0.0]], dtype=np.float32), "m-one")
    store.write(first.to_bytes())  # unbound: gallery.npz (how stores began, and the command line's own)
    bound_first, bound_second = store.for_model("m-one"), store.for_model("m-two")
    assert bound_first.snapshot_key() == "gallery.npz" and Gallery.from_bytes(bound_first.read() or b"").people()
    assert bound_second.read() is None and bound_second.snapshot_key() == "models/m-two.npz"
    second.add("bob", np.array([[0.0, 1.0]], dtype=np.float32), "m-two")
    bound_second.write(second.to_bytes())
    assert [(s.model_id, s.key) for s in store.snapshots()] == [
        ("m-one", "gallery.npz"),
        ("m-two", "models/m-two.npz"),
    ]
    # A re-embedding in progress is not a snapshot, and is never what a replica reads.
    bound_second.write_partial(b"half")
    assert bound_second.read_partial() == b"half" and len(store.snapshots()) == 2
    bound_second.delete_partial()
    assert bound_second.read_partial() is None
    # It keeps writing where its snapshot is.
    first.add("cy", np.array([[0.6, 0.8]], dtype=np.float32), "m-one")
    bound_first.write(first.to_bytes())
    assert bound_first.snapshot_key() == "gallery.npz"
    assert Gallery.from_bytes(store.read() or b"").people() == {"ann": 1, "cy": 1}
    bound_second.drop_snapshot()
    assert [s.model_id for s in store.snapshots()] == ["m-one"]
    with pytest.raises(ValueError, match="not a model id"):
        store.for_model("../escape")


def test_local_store_keeps_one_snapshot_per_model(tmp_path: Path) -> None:
    per_model_snapshots(open_gallery_store(str(tmp_path / "gallery")))
    # A model's own file, once it exists, comes before a gallery.npz of the same model.
    own = Gallery("m-one", 2)
    own.add("dee", np.array([[1.0, 0.0]], dtype=np.float32), "m-one")
    (tmp_path / "gallery" / "models" / "m-one.npz").write_bytes(own.to_bytes())
    bound = open_gallery_store(str(tmp_path / "gallery"), model_id="m-one")
    assert bound.snapshot_key() == "models/m-one.npz"
    assert Gallery.from_bytes(bound.read() or b"").people() == {"dee": 1}
    fresh = open_gallery_store(str(tmp_path / "fresh"), model_id="m-one")
    fresh.write(Gallery("m-one", 2).to_bytes())
    assert [p.relative_to(tmp_path / "fresh").as_posix() for p in (tmp_path / "fresh").rglob("*.npz")] == [
        "models/m-one.npz"
    ]


def test_s3_store_keeps_one_snapshot_per_model(moto_endpoint: str) -> None:
    boto3.client("s3").create_bucket(Bucket="store-models")
    per_model_snapshots(open_gallery_store("s3://store-models/p"))


def test_s3_store_without_a_bucket_is_a_store_error(moto_endpoint: str) -> None:
    with pytest.raises(GalleryStoreError):
        open_gallery_store("s3://no-such-bucket-here/x").write(b"data")


@pytest.mark.parametrize("uri", ["s3://", "ftp://host/dir"])
def test_bad_uris(uri: str) -> None:
    with pytest.raises(ValueError):
        open_gallery_store(uri)
