"""A gallery store of each kind the service runs on: a local directory, and S3 (a bucket of the moto server)."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
import pytest

from serve_app.gallery_store import GalleryStore, open_gallery_store


@pytest.fixture(params=["directory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> GalleryStore:
    if request.param == "directory":
        return open_gallery_store(str(tmp_path / "store"))
    request.getfixturevalue("moto_endpoint")
    bucket = f"store-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return open_gallery_store(f"s3://{bucket}/gallery")
