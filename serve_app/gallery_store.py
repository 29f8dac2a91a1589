"""Where the shared gallery lives: an S3 object or a local file, read by every replica, written by one.

A store holds the serialised gallery (see :mod:`serve_app.model.gallery`) and answers two cheap questions:
``token()`` (has it changed since I last read it?) and ``read()``. Writes replace the whole snapshot
atomically (S3 ``PutObject`` is atomic per object; locally, write-then-rename), so a reader sees the old
gallery or the new one, never a mixture.

Beside the snapshot, each enrolled face may have a chip: the aligned crop that was embedded, as a JPEG, under
``chips/<face_id>.jpg`` (``s3://bucket/prefix/chips/...`` or ``<directory>/chips/...``). The GalleryWriter stores
a face's chip before the snapshot that names it, and deletes it after the snapshot that no longer does, so a
snapshot never names a chip that is not there (a crash in between leaves at most an unreferenced chip).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from serve_app.model.gallery import GALLERY_FILENAME, write_atomically

#: The folder beside the snapshot that holds the face chips.
CHIPS_FOLDER = "chips"
FACE_ID_PATTERN = re.compile(r"[0-9a-f]{1,32}")


class GalleryStoreError(RuntimeError):
    """The gallery store cannot be read or written (permissions, missing bucket, network)."""


class GalleryStore(Protocol):
    """Whole-snapshot storage for one gallery."""

    def describe(self) -> str: ...

    def token(self) -> str | None:
        """A value that changes whenever the snapshot changes; ``None`` while there is no snapshot."""
        ...

    def read(self) -> bytes | None:
        """The snapshot bytes, or ``None`` while there is none."""
        ...

    def write(self, data: bytes) -> None:
        """Replace the snapshot atomically."""
        ...

    def write_chip(self, face_id: str, data: bytes) -> None:
        """Store one face's chip (JPEG bytes)."""
        ...

    def read_chip(self, face_id: str) -> bytes | None:
        """One face's chip, or ``None`` if it has none."""
        ...

    def delete_chips(self, face_ids: list[str]) -> None:
        """Delete these faces' chips (missing ones are not an error)."""
        ...


@dataclass
class LocalGalleryStore:
    """``<directory>/gallery.npz`` on a local (or shared) file system."""

    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / GALLERY_FILENAME

    def describe(self) -> str:
        return str(self.path)

    def token(self) -> str | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        # A rename-into-place gives a new inode even when size and mtime happen to match.
        return f"{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}"

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def write(self, data: bytes) -> None:
        write_atomically(self.path, data)

    def _chip(self, face_id: str) -> Path:
        return self.directory / CHIPS_FOLDER / f"{_checked(face_id)}.jpg"

    def write_chip(self, face_id: str, data: bytes) -> None:
        write_atomically(self._chip(face_id), data)

    def read_chip(self, face_id: str) -> bytes | None:
        try:
            return self._chip(face_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete_chips(self, face_ids: list[str]) -> None:
        for face_id in face_ids:
            self._chip(face_id).unlink(missing_ok=True)


@dataclass
class S3GalleryStore:
    """``s3://<bucket>/<prefix>gallery.npz``. The boto3 client is passed in (credentials: the standard chain)."""

    client: Any
    bucket: str
    prefix: str

    @property
    def key(self) -> str:
        return f"{self.prefix.rstrip('/')}/{GALLERY_FILENAME}" if self.prefix.strip("/") else GALLERY_FILENAME

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def token(self) -> str | None:
        head = self._call(self.client.head_object, Bucket=self.bucket, Key=self.key)
        return None if head is None else str(head["ETag"])

    def read(self) -> bytes | None:
        response = self._call(self.client.get_object, Bucket=self.bucket, Key=self.key)
        return None if response is None else bytes(response["Body"].read())

    def write(self, data: bytes) -> None:
        self._call(self.client.put_object, Bucket=self.bucket, Key=self.key, Body=data)

    def _chip(self, face_id: str) -> str:
        folder = f"{self.prefix.strip('/')}/{CHIPS_FOLDER}" if self.prefix.strip("/") else CHIPS_FOLDER
        return f"{folder}/{_checked(face_id)}.jpg"

    def write_chip(self, face_id: str, data: bytes) -> None:
        self._call(
            self.client.put_object, Bucket=self.bucket, Key=self._chip(face_id), Body=data, ContentType="image/jpeg"
        )

    def read_chip(self, face_id: str) -> bytes | None:
        response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._chip(face_id))
        return None if response is None else bytes(response["Body"].read())

    def delete_chips(self, face_ids: list[str]) -> None:
        for start in range(0, len(face_ids), 1000):  # DeleteObjects takes at most 1,000 keys
            keys = [{"Key": self._chip(face_id)} for face_id in face_ids[start : start + 1000]]
            self._call(self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def _call(self, operation: Any, **kwargs: Any) -> Any:
        """One S3 call; ``None`` for a missing snapshot, :class:`GalleryStoreError` for any other failure."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return operation(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise GalleryStoreError(f"{self.describe()}: {exc}") from exc
        except BotoCoreError as exc:
            raise GalleryStoreError(f"cannot reach {self.describe()}: {exc}") from exc


def _checked(face_id: str) -> str:
    # Face ids are the gallery's own (12 hex digits); anything else must never become part of a path or key.
    if not FACE_ID_PATTERN.fullmatch(face_id):
        raise ValueError(f"not a face id: {face_id!r}")
    return face_id


def open_gallery_store(uri: str, endpoint: str | None = None) -> GalleryStore:
    """``s3://bucket/prefix`` or a local directory (``file:///dir`` or a plain path).

    ``endpoint`` points S3 at an S3-compatible store (MinIO, a VPC endpoint URL); ``None`` leaves it to boto3.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"gallery URI {uri!r} names no bucket")
        from aws_stack.clients import QUICK_FAILURE_CONFIG, aws_client

        # No stack here, only a URI: boto3 finds the region and (for the local moto server) AWS_ENDPOINT_URL.
        client = aws_client("s3", endpoint=endpoint, config=QUICK_FAILURE_CONFIG)
        return S3GalleryStore(client, parsed.netloc, parsed.path.lstrip("/"))
    if parsed.scheme in ("", "file"):
        return LocalGalleryStore(Path(parsed.path if parsed.scheme == "file" else uri).expanduser())
    raise ValueError(f"unsupported gallery URI {uri!r}: use s3://bucket/prefix or a directory")
