"""A gallery store of each kind the service runs on: a local directory, and S3 (a bucket of the moto server)."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import pytest

from serve_app.gallery_store import GalleryStore, open_gallery_store


def new_store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a gallery store lives: a directory, or a prefix of a new bucket of the moto server."""
    if request.param == "directory":
        return str(tmp_path / "store")
    request.getfixturevalue("moto_endpoint")
    bucket = f"store-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/gallery"


@pytest.fixture(params=["directory", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return new_store_uri(request, tmp_path)


@pytest.fixture(params=["directory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> GalleryStore:
    return open_gallery_store(new_store_uri(request, tmp_path))
