"""API keys with scopes, stored hashed beside the gallery, where every replica can read them.

A key is ``frk_<id>_<secret>``: the id (16 hex digits) names its record, the secret (32 random bytes, URL-safe
base64) is what proves it. The record (``access/keys/<id>.json`` in the gallery store, see
:mod:`serve_app.gallery_store`) holds the key's name, its scopes, when it was made and revoked, and the SHA-256 of
the whole key: never the key. A key has 256 bits of randomness, so a plain (unsalted) hash is safe to keep, as for
any random token; checking one compares hashes in constant time.

Scopes (``SCOPES``): ``recognize`` (recognition, verification, detection) and ``manage`` (everything that reads or
changes the gallery). ``facerec keys create`` prints a key once; ``list`` and ``revoke`` never show one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from serve_app.gallery_store import GalleryStore

SCOPES = ("recognize", "manage")
PREFIX = "frk"
KEY_PATTERN = re.compile(rf"{PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")


class ApiKeyError(ValueError):
    """A key operation that cannot be done (a bad name or scope, an unknown key)."""


@dataclass(frozen=True)
class KeyRecord:
    """What the store keeps about one key (never the key itself)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    sha256: str
    created: str
    revoked: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def public(self) -> dict[str, object]:
        """What may be shown: everything but the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created": self.created,
            "revoked": self.revoked,
        }

    def to_bytes(self) -> bytes:
        return json.dumps({**asdict(self), "scopes": list(self.scopes)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyRecord:
        raw = json.loads(data)
        return cls(
            id=str(raw["id"]),
            name=str(raw["name"]),
            scopes=tuple(str(s) for s in raw["scopes"]),
            sha256=str(raw["sha256"]),
            created=str(raw["created"]),
            revoked=None if raw.get("revoked") is None else str(raw["revoked"]),
        )


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")  # orders keys made within one second


class KeyRing:
    """The keys of one gallery store."""

    def __init__(self, store: GalleryStore) -> None:
        self.store = store

    def create(self, name: str, scopes: list[str]) -> tuple[str, KeyRecord]:
        """A new key and its record; the key is returned once and kept nowhere."""
        if not NAME_PATTERN.fullmatch(name):
            raise ApiKeyError(f"a key's name is 1-64 letters, digits, spaces, dots, dashes or underscores: {name!r}")
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ApiKeyError(f"scopes must be among {', '.join(SCOPES)} (got {', '.join(scopes) or 'none'})")
        if any(record.name == name and record.active for record in self.records()):
            raise ApiKeyError(f"an active key is already named {name!r}: revoke it first, or choose another name")
        key_id = secrets.token_hex(8)
        key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        record = KeyRecord(key_id, name, tuple(s for s in SCOPES if s in scopes), digest(key), now())
        self.store.write_key_record(key_id, record.to_bytes())
        return key, record

    def records(self) -> list[KeyRecord]:
        found = []
        for key_id in self.store.key_ids():
            data = self.store.read_key_record(key_id)
            if data is not None:
                found.append(KeyRecord.from_bytes(data))
        return sorted(found, key=lambda r: (r.created, r.id))

    def revoke(self, id_or_name: str) -> KeyRecord:
        """Revoke the active key with this id or name (its record stays, marked, for the audit)."""
        matches = [r for r in self.records() if r.active and id_or_name in (r.id, r.name)]
        if len(matches) != 1:
            raise ApiKeyError(
                f"no active key has the id or name {id_or_name!r}"
                if not matches
                else f"{len(matches)} active keys match {id_or_name!r}: give the id"
            )
        revoked = KeyRecord(**{**asdict(matches[0]), "revoked": now()})
        self.store.write_key_record(revoked.id, revoked.to_bytes())
        return revoked

    def authenticate(self, key: str) -> KeyRecord | None:
        """The record of an active key that ``key`` is, or ``None`` (malformed, unknown, wrong secret, revoked)."""
        match = KEY_PATTERN.fullmatch(key.strip())
        if match is None:
            return None
        data = self.store.read_key_record(match.group(1))
        if data is None:
            return None
        record = KeyRecord.from_bytes(data)
        if not hmac.compare_digest(record.sha256, digest(key.strip())) or not record.active:
            return None
        return record
