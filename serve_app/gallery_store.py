"""Where the shared gallery lives: an S3 prefix or a local directory, read by every replica, written by one.

A store holds one snapshot per embedding model (see :mod:`serve_app.model.gallery`: embeddings of different
checkpoints cannot be mixed), and the face chips they share:

* ``models/<model id>.npz``: the snapshot of that model;
* ``gallery.npz``: the snapshot of the model it records, in a store that began before snapshots were kept per
  model (and what an unbound store, ``Gallery.save`` or the legacy import of old versions wrote); a model's
  own ``models/<model id>.npz``, once it exists, comes first;
* ``models/<model id>.changes/<revision>.npz``: the changes made to that model's gallery since its snapshot (each
  one a :class:`~serve_app.model.gallery_change.GalleryChange`, the revision zero-padded to 12 digits). The
  snapshot is the base: it records the revision it holds, and the gallery is the base plus every change after it,
  in order (:func:`serve_app.gallery_journal.load_gallery`). A change is written only if no object of its
  revision exists (S3's ``If-None-Match: *``; locally, a hard link that fails if the name is taken), so of two
  writers that staged the same revision exactly one stores it and the other learns it lost;
* ``models/<model id>.erasures/<revision>-<random>.json``: erasures owed: the ids of faces a change removed (face ids
  only) while other objects may still hold them; written before that change, deleted once they are erased
  everywhere (see :mod:`serve_app.gallery_erasure`), so a writer that starts finishes what an earlier one left;
* ``models/<model id>.partial.npz``: a re-embedding in progress (never served; see ``facerec gallery reembed``);
* ``access/keys/<key id>.json``: the API keys (name, scopes, the key's SHA-256, when created and revoked; never the
  key itself), see :mod:`serve_app.access.keys`;
* ``access/audit/<YYYY-MM-DD>/<time>-<writer>-<n>.jsonl``: the audit trail (who read or changed what, and every
  refused key), one object per flush of one ingress replica, each written once and never replaced, see
  :mod:`serve_app.access.audit`;
* ``chips/<face id>.jpg``: the aligned crop each enrolled face was embedded from. Face ids are kept across models,
  so every model's snapshot refers to the same chips.

A store object is bound to one model (:meth:`GalleryStore.for_model`), and ``token()`` (has it changed since I last
read it?), ``read()`` and ``write()`` address that model's snapshot (the base), and ``write_change()`` /
``read_change()`` its changes; an unbound store addresses ``gallery.npz``. A base is replaced atomically (S3
``PutObject`` is atomic per object; locally, write-then-rename), so a reader sees the old base or the new one,
never a mixture; a change is written once and never replaced.

The GalleryWriter stores a face's chip before the change that names it, and deletes it after the change that
removes it. Another model's snapshot may still name that face until it follows the removal (see
:mod:`serve_app.deployments.gallery_writer`); it already holds the face's embedding, and a re-embedding reports
such a face as having no usable chip.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from serve_app.model.gallery import GALLERY_FILENAME, Gallery, GalleryError, snapshot_meta, write_atomically

#: The folder beside the snapshot that holds the face chips.
CHIPS_FOLDER = "chips"
#: The folder of per-model snapshots.
MODELS_FOLDER = "models"
#: The folder of API key records.
KEYS_FOLDER = "access/keys"
AUDIT_FOLDER = "access/audit"
AUDIT_DAY_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")
AUDIT_NAME_PATTERN = re.compile(r"[0-9A-Za-z._-]{1,128}\.jsonl")
KEY_ID_PATTERN = re.compile(r"[0-9a-f]{8,32}")
FACE_ID_PATTERN = re.compile(r"[0-9a-f]{1,32}")
#: Model ids as the checkpoint registry makes them (``facenet-keras-ms-celeb-128-v1+flip``, ``pt-<hash>``).
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
PARTIAL_SUFFIX = ".partial.npz"
#: S3 object metadata on each snapshot: which model it records, so a HEAD tells (no download of the snapshot).
MODEL_METADATA = "model-id"
#: S3 object metadata on each snapshot: the revision it holds (a HEAD tells whether a newer base was written).
REVISION_METADATA = "revision"
CHANGES_SUFFIX = ".changes"
CHANGE_KEY = re.compile(r"(\d{12})\.npz")
ERASURES_SUFFIX = ".erasures"
ERASURE_KEY = re.compile(r"\d{12}-[0-9a-f]{8}\.json")


class GalleryStoreError(RuntimeError):
    """The gallery store cannot be read or written (permissions, missing bucket, network)."""


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot in a store, as listed by :meth:`GalleryStore.snapshots`."""

    model_id: str
    #: Where it is, relative to the store (``gallery.npz`` or ``models/<model id>.npz``).
    key: str


class GalleryStore(ABC):
    """Snapshots (one per model) and face chips. Subclasses provide five object operations on relative keys."""

    #: The model whose snapshot ``token``/``read``/``write`` address; ``None``: ``gallery.npz``.
    model_id: str | None = None
    _root_owner: tuple[str, str | None] | None = None  # (root token, the model it records)

    # --- storage primitives ---------------------------------------------------------------------------------
    @abstractmethod
    def _where(self, key: str) -> str: ...

    @abstractmethod
    def _token(self, key: str) -> str | None:
        """A value that changes whenever the object changes; ``None`` while it does not exist."""

    @abstractmethod
    def _get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def _put(
        self,
        key: str,
        data: bytes | IO[bytes],
        content_type: str,
        model_id: str | None = None,
        revision: int | None = None,
    ) -> None:
        """Write an object (from its bytes, or a file read from where it is); a snapshot's ``model_id`` and
        ``revision`` go with it where the store can keep them (S3 metadata)."""

    @abstractmethod
    def _put_new(self, key: str, data: bytes) -> bool:
        """Write an object only if none exists under ``key``: ``False`` (nothing written) when one does."""

    @abstractmethod
    def _revision_of(self, key: str) -> int | None:
        """The revision a snapshot holds, read as cheaply as the store allows (``None``: no snapshot)."""

    @abstractmethod
    def _model_of(self, key: str) -> str | None:
        """The model a snapshot records, read as cheaply as the store allows (``None``: not a snapshot)."""

    @abstractmethod
    def _delete(self, keys: list[str]) -> None: ...

    @abstractmethod
    def _list(self, folder: str) -> list[str]:
        """The keys directly in ``folder``."""

    # --- binding --------------------------------------------------------------------------------------------
    def for_model(self, model_id: str) -> GalleryStore:
        """The same store, addressing ``model_id``'s snapshot."""
        bound = copy.copy(self)
        bound.model_id = _checked_model(model_id)
        bound._root_owner = None
        return bound

    def unbound(self) -> GalleryStore:
        """The same store, addressing ``gallery.npz`` (kept from before snapshots were kept per model)."""
        root = copy.copy(self)
        root.model_id = None
        root._root_owner = None
        return root

    def describe(self) -> str:
        return self._where(self.snapshot_key())

    def snapshot_key(self) -> str:
        """Where this store's model's snapshot is (or will be written)."""
        return self._resolve()[0]

    def _resolve(self) -> tuple[str, str | None]:
        """The bound model's snapshot key and its token (``None`` while there is no snapshot), in one or two HEADs."""
        if self.model_id is None:
            return GALLERY_FILENAME, self._token(GALLERY_FILENAME)
        own = f"{MODELS_FOLDER}/{self.model_id}.npz"
        token = self._token(own)
        if token is not None:
            return own, token
        root_token, root_model = self._root()
        if root_model == self.model_id:
            return GALLERY_FILENAME, root_token
        return own, None

    def _root(self) -> tuple[str | None, str | None]:
        """``gallery.npz``'s token and the model it records (``None``s if there is none); the model is read again
        only when the token changes."""
        token = self._token(GALLERY_FILENAME)
        if token is None:
            return None, None
        if self._root_owner is None or self._root_owner[0] != token:
            self._root_owner = (token, self._model_of(GALLERY_FILENAME))
        return token, self._root_owner[1]

    # --- the bound model's snapshot --------------------------------------------------------------------------
    def token(self) -> str | None:
        """A value that changes whenever the snapshot changes; ``None`` while there is no snapshot."""
        key, token = self._resolve()
        return None if token is None else f"{key}:{token}"

    def read(self) -> bytes | None:
        """The snapshot bytes, or ``None`` while there is none."""
        return self._get(self.snapshot_key())

    @contextlib.contextmanager
    def open_snapshot(self) -> Iterator[IO[bytes] | None]:
        """The snapshot as a seekable file (``None`` while there is none), for reading a large base a chunk at a
        time instead of holding its bytes beside the gallery made from them."""
        with self._open(self.snapshot_key()) as snapshot:
            yield snapshot

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[IO[bytes] | None]:
        """An object as a seekable file (``None``: missing). By default its bytes in memory."""
        data = self._get(key)
        yield None if data is None else io.BytesIO(data)

    def write(self, data: bytes | IO[bytes]) -> None:
        """Replace the snapshot (the base) atomically, from its bytes or from a file (read from where it is: a
        large base is written to a temporary file and sent from there, see :meth:`write_gallery`)."""
        try:
            meta = snapshot_meta(data)
            model_id: str | None = str(meta["model_id"])
            revision: int | None = int(str(meta.get("revision", 0)))
        except GalleryError:
            model_id = revision = None  # not a gallery (a caller's mistake, or a test's stand-in bytes): as it is
        self._put(self.snapshot_key(), data, "application/octet-stream", model_id, revision)

    def write_gallery(self, gallery: Gallery) -> int:
        """Write ``gallery`` as the base through a temporary file on local disk (never a second copy of it in
        memory); returns the bytes written."""
        with tempfile.TemporaryFile(prefix="facerec-base-") as handle:
            gallery.write_to(handle)
            size = handle.tell()
            handle.seek(0)
            self.write(handle)
        return size

    def base_revision(self) -> int | None:
        """The revision the bound model's snapshot holds (``None`` while there is none), without reading it."""
        return self._revision_of(self.snapshot_key())

    # --- the bound model's changes since its snapshot -----------------------------------------------------------
    def _changes_folder(self) -> str:
        if self.model_id is None:
            raise ValueError("changes belong to a model: bind the store with for_model()")
        return f"{MODELS_FOLDER}/{self.model_id}{CHANGES_SUFFIX}"

    def _change_key(self, revision: int) -> str:
        return f"{self._changes_folder()}/{revision:012d}.npz"

    def write_change(self, revision: int, data: bytes) -> bool:
        """Store the change that makes ``revision``, unless one is stored already: ``False`` then (another writer
        stored that revision first; nothing was written)."""
        return self._put_new(self._change_key(revision), data)

    def read_change(self, revision: int) -> bytes | None:
        """The change that makes ``revision`` (``None`` if there is none, or it was cleaned up after a base)."""
        return self._get(self._change_key(revision))

    def change_revisions(self) -> list[int]:
        """The revisions of every change stored, in order."""
        found = []
        for key in self._list(self._changes_folder()):
            match = CHANGE_KEY.fullmatch(key.rsplit("/", 1)[-1])
            if match:
                found.append(int(match.group(1)))
        return sorted(found)

    def delete_changes(self, revisions: list[int]) -> None:
        self._delete([self._change_key(revision) for revision in revisions])

    # --- erasures owed (the bound model's) ------------------------------------------------------------------------
    def _erasures_folder(self) -> str:
        if self.model_id is None:
            raise ValueError("erasures belong to a model: bind the store with for_model()")
        return f"{MODELS_FOLDER}/{self.model_id}{ERASURES_SUFFIX}"

    def write_erasure(self, revision: int, face_ids: Iterable[str]) -> str:
        """Record that the change of ``revision`` removes ``face_ids``, which are not yet erased from every
        object; returns the record's name (its own: a record is only ever deleted by who listed or wrote it).
        Written before that change is stored: a crash in between leaves a record of faces still there, which
        erasing finds nothing of."""
        name = f"{revision:012d}-{uuid.uuid4().hex[:8]}.json"
        self._put(f"{self._erasures_folder()}/{name}", json.dumps(sorted(face_ids)).encode(), "application/json")
        return name

    def erasures(self) -> dict[str, frozenset[str]]:
        """The erasures owed: each record's face ids, by the record's name."""
        owed = {}
        for key in self._list(self._erasures_folder()):
            name = key.rsplit("/", 1)[-1]
            data = self._get(key) if ERASURE_KEY.fullmatch(name) else None
            if data is not None:
                owed[name] = frozenset(str(face_id) for face_id in json.loads(data))
        return owed

    def delete_erasures(self, names: Iterable[str]) -> None:
        folder = self._erasures_folder()
        self._delete([f"{folder}/{name}" for name in names if ERASURE_KEY.fullmatch(name)])

    # --- every model's snapshots ------------------------------------------------------------------------------
    def snapshots(self) -> list[SnapshotInfo]:
        """Every model's snapshot in the store (a model's own file before ``gallery.npz``), by model id."""
        found: dict[str, SnapshotInfo] = {}
        for key in sorted(self._list(MODELS_FOLDER)):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".npz") and not name.endswith(PARTIAL_SUFFIX):
                model_id = name.removesuffix(".npz")
                if MODEL_ID_PATTERN.fullmatch(model_id):
                    found[model_id] = SnapshotInfo(model_id, key)
        root = self._root()[1]
        if root is not None and root not in found:
            found[root] = SnapshotInfo(root, GALLERY_FILENAME)
        return [found[model] for model in sorted(found)]

    def read_snapshot(self, info: SnapshotInfo) -> bytes | None:
        return self._get(info.key)

    def snapshot_token(self, info: SnapshotInfo) -> str | None:
        return self._token(info.key)

    def drop_snapshot(self) -> None:
        """Delete the bound model's snapshot (after a model change is confirmed; chips stay)."""
        self._delete([self.snapshot_key()])

    # --- a re-embedding in progress (the bound model's) --------------------------------------------------------
    def _partial_key(self) -> str:
        if self.model_id is None:
            raise ValueError("a partial snapshot belongs to a model: bind the store with for_model()")
        return f"{MODELS_FOLDER}/{self.model_id}{PARTIAL_SUFFIX}"

    def partial_models(self) -> list[str]:
        """The models with a re-embedding in progress (a partial snapshot)."""
        names = (key.rsplit("/", 1)[-1] for key in self._list(MODELS_FOLDER))
        found = (name.removesuffix(PARTIAL_SUFFIX) for name in names if name.endswith(PARTIAL_SUFFIX))
        return sorted(model for model in found if MODEL_ID_PATTERN.fullmatch(model))

    def read_partial(self) -> bytes | None:
        return self._get(self._partial_key())

    def write_partial(self, data: bytes) -> None:
        self._put(self._partial_key(), data, "application/octet-stream", self.model_id)  # never a base

    def delete_partial(self) -> None:
        self._delete([self._partial_key()])

    # --- API key records ----------------------------------------------------------------------------------------
    def write_key_record(self, key_id: str, data: bytes) -> None:
        self._put(_key_record(key_id), data, "application/json")

    def read_key_record(self, key_id: str) -> bytes | None:
        return self._get(_key_record(key_id))

    def key_ids(self) -> list[str]:
        names = [key.rsplit("/", 1)[-1] for key in self._list(KEYS_FOLDER)]
        return sorted(n.removesuffix(".json") for n in names if KEY_ID_PATTERN.fullmatch(n.removesuffix(".json")))

    # --- the audit trail (append-only: each object written once) ----------------------------------------------
    def write_audit(self, day: str, name: str, data: bytes) -> bool:
        """Store one batch of audit events; ``False`` if an object of that name exists (nothing is replaced)."""
        if not AUDIT_DAY_PATTERN.fullmatch(day) or not AUDIT_NAME_PATTERN.fullmatch(name):
            raise ValueError(f"not an audit object name: {day}/{name}")
        return self._put_new(f"{AUDIT_FOLDER}/{day}/{name}", data)

    def audit_days(self) -> list[str]:
        """The days (``YYYY-MM-DD``) the trail has objects for, oldest first."""
        return sorted(day for day in self._subfolders(AUDIT_FOLDER) if AUDIT_DAY_PATTERN.fullmatch(day))

    def audit_objects(self, day: str) -> list[str]:
        """One day's audit objects (keys to :meth:`read_audit`), in the order they were written."""
        return sorted(self._list(f"{AUDIT_FOLDER}/{day}"))

    def read_audit(self, key: str) -> bytes | None:
        return self._get(key)

    @abstractmethod
    def _subfolders(self, folder: str) -> list[str]: ...

    # --- chips ------------------------------------------------------------------------------------------------
    def write_chip(self, face_id: str, data: bytes) -> None:
        """Store one face's chip (JPEG bytes)."""
        self._put(_chip_key(face_id), data, "image/jpeg")

    def read_chip(self, face_id: str) -> bytes | None:
        """One face's chip, or ``None`` if it has none."""
        return self._get(_chip_key(face_id))

    def delete_chips(self, face_ids: Iterable[str]) -> None:
        """Delete these faces' chips (missing ones are not an error; ids that cannot have one are skipped)."""
        self._delete([_chip_key(face_id) for face_id in face_ids if FACE_ID_PATTERN.fullmatch(face_id)])


@dataclass
class LocalGalleryStore(GalleryStore):
    """A directory on a local (or shared) file system."""

    directory: Path
    model_id: str | None = None
    _root_owner: tuple[str, str | None] | None = field(default=None, repr=False)

    def _where(self, key: str) -> str:
        return str(self.directory / key)

    def _token(self, key: str) -> str | None:
        try:
            stat = (self.directory / key).stat()
        except FileNotFoundError:
            return None
        # A rename-into-place gives a new inode even when size and mtime happen to match.
        return f"{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}"

    def _get(self, key: str) -> bytes | None:
        try:
            return (self.directory / key).read_bytes()
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[IO[bytes] | None]:
        # The file itself: a base replaced meanwhile is renamed over, and this open file keeps the old one.
        try:
            handle = (self.directory / key).open("rb")
        except FileNotFoundError:
            yield None
            return
        with handle:
            yield handle

    def _put(
        self,
        key: str,
        data: bytes | IO[bytes],
        content_type: str,
        model_id: str | None = None,
        revision: int | None = None,
    ) -> None:
        write_atomically(self.directory / key, data)

    def _put_new(self, key: str, data: bytes) -> bool:
        return write_atomically(self.directory / key, data, only_if_new=True)  # a hard link: the local If-None-Match

    def _model_of(self, key: str) -> str | None:
        try:
            return str(snapshot_meta(self.directory / key)["model_id"])  # the archive's meta member only
        except GalleryError:
            return None  # gone meanwhile, or not a gallery: nobody's snapshot

    def _revision_of(self, key: str) -> int | None:
        try:
            return int(str(snapshot_meta(self.directory / key).get("revision", 0)))
        except GalleryError:
            return None

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            (self.directory / key).unlink(missing_ok=True)

    def _list(self, folder: str) -> list[str]:
        where = self.directory / folder
        return [f"{folder}/{p.name}" for p in where.iterdir() if p.is_file()] if where.is_dir() else []

    def _subfolders(self, folder: str) -> list[str]:
        where = self.directory / folder
        return [p.name for p in where.iterdir() if p.is_dir()] if where.is_dir() else []


@dataclass
class S3GalleryStore(GalleryStore):
    """``s3://<bucket>/<prefix>``. The boto3 client is passed in (credentials: the standard chain)."""

    client: Any
    bucket: str
    prefix: str
    model_id: str | None = None
    _root_owner: tuple[str, str | None] | None = field(default=None, repr=False)

    def _full(self, key: str) -> str:
        return f"{self.prefix.strip('/')}/{key}" if self.prefix.strip("/") else key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _token(self, key: str) -> str | None:
        head = self._call(self.client.head_object, Bucket=self.bucket, Key=self._full(key))
        return None if head is None else str(head["ETag"])

    def _get(self, key: str) -> bytes | None:
        response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._full(key))
        return None if response is None else bytes(response["Body"].read())

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[IO[bytes] | None]:
        # Downloaded to a temporary file on local disk by boto3's transfer manager (ranged GETs in parallel for a
        # large object), never held in memory: a 10M-face base is 6 GB.
        with tempfile.TemporaryFile(prefix="facerec-base-") as handle:
            found = self._call(self._download, key=key, handle=handle)
            if found is None:
                yield None
                return
            handle.seek(0)
            yield handle

    def _upload(self, key: str, handle: IO[bytes], extra: dict[str, Any]) -> bool:
        self.client.upload_fileobj(handle, self.bucket, self._full(key), ExtraArgs=extra, Config=_transfer_config())
        return True

    def _download(self, key: str, handle: IO[bytes]) -> bool:
        self.client.download_fileobj(self.bucket, self._full(key), handle, Config=_transfer_config())
        return True

    def _put(
        self,
        key: str,
        data: bytes | IO[bytes],
        content_type: str,
        model_id: str | None = None,
        revision: int | None = None,
    ) -> None:
        metadata = {MODEL_METADATA: model_id} if model_id else {}
        if revision is not None:
            metadata[REVISION_METADATA] = str(revision)
        if not isinstance(data, bytes):
            # A file: boto3's transfer manager sends it in parts (a single PUT stops at 5 GB; a 10M-face base is 6.7).
            extra = {"ContentType": content_type, "Metadata": metadata}
            self._call(self._upload, key=key, handle=data, extra=extra)
            return
        self._call(
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._full(key),
            Body=data,
            ContentType=content_type,
            Metadata=metadata,
        )

    def _put_new(self, key: str, data: bytes) -> bool:
        try:
            self._call(
                self.client.put_object,
                Bucket=self.bucket,
                Key=self._full(key),
                Body=data,
                ContentType="application/octet-stream",
                IfNoneMatch="*",
                passing=("PreconditionFailed", "ConditionalRequestConflict", "412", "409"),
            )
        except _RefusedError:
            return False
        return True

    def _revision_of(self, key: str) -> int | None:
        head = self._call(self.client.head_object, Bucket=self.bucket, Key=self._full(key))
        if head is None:
            return None
        recorded = head.get("Metadata", {}).get(REVISION_METADATA)
        if recorded is not None:
            return int(recorded)
        data = self._get(key)  # written before the metadata existed: read the snapshot's own meta
        try:
            return None if data is None else int(str(snapshot_meta(data).get("revision", 0)))
        except GalleryError:
            return None

    def _model_of(self, key: str) -> str | None:
        head = self._call(self.client.head_object, Bucket=self.bucket, Key=self._full(key))
        if head is None:
            return None
        recorded = head.get("Metadata", {}).get(MODEL_METADATA)
        if recorded:
            return str(recorded)
        data = self._get(key)  # written before the metadata existed: read the snapshot's own meta
        try:
            return None if data is None else str(snapshot_meta(data)["model_id"])
        except GalleryError:
            return None

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            objects = [{"Key": self._full(key)} for key in keys[start : start + 1000]]
            answer = self._call(
                self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
            )
            # A DeleteObjects that succeeds can still fail per key (AccessDenied, InternalError): erasure must know.
            failed = (answer or {}).get("Errors") or []
            if failed:
                first = failed[0]
                raise GalleryStoreError(
                    f"s3://{self.bucket}/{self.prefix}: {len(failed)} objects not deleted "
                    f"({first.get('Key')}: {first.get('Code')} {first.get('Message')})"
                )

    def _list(self, folder: str) -> list[str]:
        keys: list[str] = []
        start = self._full(folder) + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=start, Delimiter="/")))
        for page in pages or []:
            keys += [f"{folder}/{item['Key'][len(start) :]}" for item in page.get("Contents", [])]
        return keys

    def _subfolders(self, folder: str) -> list[str]:
        start = self._full(folder) + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=start, Delimiter="/")))
        return [
            entry["Prefix"][len(start) :].rstrip("/")
            for page in pages or []
            for entry in page.get("CommonPrefixes", [])
        ]

    def _call(self, operation: Any, passing: tuple[str, ...] = (), **kwargs: Any) -> Any:
        """One S3 call; ``None`` for a missing object, :class:`_RefusedError` for an error code in ``passing`` (a
        condition that failed), :class:`GalleryStoreError` for any other failure."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError, S3UploadFailedError

        # The transfer manager's own failures (a base replaced during a multipart download fails its ETag check;
        # retries exhausted) are the store's failures too: callers catch GalleryStoreError.
        transfer_errors = (Boto3Error, RetriesExceededError, S3DownloadFailedError, S3UploadFailedError)

        try:
            return operation(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in passing or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")) in passing:
                raise _RefusedError(str(code)) from exc
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise GalleryStoreError(f"s3://{self.bucket}/{self.prefix}: {exc}") from exc
        except BotoCoreError as exc:
            raise GalleryStoreError(f"cannot reach s3://{self.bucket}/{self.prefix}: {exc}") from exc
        except transfer_errors as exc:
            raise GalleryStoreError(f"s3://{self.bucket}/{self.prefix}: {type(exc).__name__}: {exc}") from exc


def _transfer_config() -> Any:
    """Parts of 64 MB, 8 at a time, for a base of hundreds of MB to GB: S3 serves each range at full speed either
    way; the local moto server copies the whole object for every range it answers, so boto3's default 8 MB parts
    took 30 s for a 700 MB base there against 4 s with these."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=8)


class _RefusedError(Exception):
    """A conditional write found its condition false (the object exists already)."""


def _chip_key(face_id: str) -> str:
    # Face ids are the gallery's own (12 hex digits); anything else must never become part of a path or key.
    if not FACE_ID_PATTERN.fullmatch(face_id):
        raise ValueError(f"not a face id: {face_id!r}")
    return f"{CHIPS_FOLDER}/{face_id}.jpg"


def _key_record(key_id: str) -> str:
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise ValueError(f"not a key id: {key_id!r}")
    return f"{KEYS_FOLDER}/{key_id}.json"


def _checked_model(model_id: str) -> str:
    if not MODEL_ID_PATTERN.fullmatch(model_id):
        raise ValueError(f"not a model id: {model_id!r}")
    return model_id


def open_gallery_store(uri: str, endpoint: str | None = None, model_id: str | None = None) -> GalleryStore:
    """``s3://bucket/prefix`` or a local directory (``file:///dir`` or a plain path), bound to ``model_id``'s
    snapshot when given.

    ``endpoint`` points S3 at an S3-compatible store (MinIO, a VPC endpoint URL); ``None`` leaves it to boto3.
    """
    parsed = urlparse(uri)
    store: GalleryStore
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"gallery URI {uri!r} names no bucket")
        from aws_stack.clients import QUICK_FAILURE_CONFIG, aws_client

        # No stack here, only a URI: boto3 finds the region and (for the local moto server) AWS_ENDPOINT_URL.
        client = aws_client("s3", endpoint=endpoint, config=QUICK_FAILURE_CONFIG)
        store = S3GalleryStore(client, parsed.netloc, parsed.path.lstrip("/"))
    elif parsed.scheme in ("", "file"):
        store = LocalGalleryStore(Path(parsed.path if parsed.scheme == "file" else uri).expanduser())
    else:
        raise ValueError(f"unsupported gallery URI {uri!r}: use s3://bucket/prefix or a directory")
    return store if model_id is None else store.for_model(model_id)
