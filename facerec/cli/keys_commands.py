"""``facerec keys create | list | revoke``: the API keys kept beside a gallery (see serve_app/access/keys.py)."""

from __future__ import annotations

import json
import logging

from aws_stack.config import StackConfig
from serve_app.access.keys import ApiKeyError, KeyRing
from serve_app.gallery_store import GalleryStore, GalleryStoreError, open_gallery_store

log = logging.getLogger("facerec")

EXIT_BAD_INPUT = 2


def gallery_store_for(gallery: str) -> GalleryStore:
    """The gallery store; the one `make run` serves is on its local S3 (run/aws.json says where)."""
    local = StackConfig.load_local()
    endpoint = local.endpoint if local is not None and gallery == local.gallery_uri else None
    return open_gallery_store(gallery, endpoint)


def create(gallery: str, name: str, scopes: list[str]) -> int:
    """Make a key and print it once, with its record (the key is kept nowhere: copy it now)."""
    try:
        key, record = KeyRing(gallery_store_for(gallery)).create(name, scopes)
    except (ApiKeyError, GalleryStoreError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    print(json.dumps({**record.public(), "key": key}))
    log.warning("the key above is shown only this once: the store keeps its hash, not the key")
    return 0


def list_keys(gallery: str) -> int:
    """Every key's record (active and revoked), one JSON line each; never a key or its hash."""
    try:
        records = KeyRing(gallery_store_for(gallery)).records()
    except (GalleryStoreError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    for record in records:
        print(json.dumps(record.public()))
    return 0


def revoke(gallery: str, id_or_name: str) -> int:
    try:
        record = KeyRing(gallery_store_for(gallery)).revoke(id_or_name)
    except (ApiKeyError, GalleryStoreError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    print(json.dumps(record.public()))
    return 0
