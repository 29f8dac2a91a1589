"""API keys kept hashed beside the gallery: made once, checked by hash, revoked, never shown again."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from facerec.cli.main import main
from serve_app.access.keys import ApiKeyError, KeyRing
from serve_app.gallery_store import GalleryStore, open_gallery_store
from tests.store_fixtures import store

pytestmark = pytest.mark.aws
__all__ = ["store"]  # the fixture, used by name


def test_a_key_works_for_its_scopes_until_revoked_and_its_record_never_holds_it(store: GalleryStore) -> None:
    ring = KeyRing(store)
    key, record = ring.create("photo booth", ["recognize"])
    other, _ = ring.create("ops", ["manage", "recognize"])
    assert ring.authenticate(key) == record and record.scopes == ("recognize",)
    assert ring.authenticate(other) is not None and ring.authenticate(other).scopes == ("recognize", "manage")  # type: ignore[union-attr]
    stored = b"".join(store.read_key_record(i) or b"" for i in store.key_ids())
    assert key.encode() not in stored and other.encode() not in stored  # hashes only
    # A wrong secret, another key's secret under this id, garbage: nobody.
    prefix, key_id, secret = key.split("_", 2)
    assert ring.authenticate(f"{prefix}_{key_id}_{'A' * len(secret)}") is None
    assert ring.authenticate(f"{prefix}_{key_id}_{other.split('_', 2)[2]}") is None
    assert ring.authenticate("") is None and ring.authenticate("frk_zz_") is None
    revoked = ring.revoke("photo booth")
    assert revoked.revoked is not None and ring.authenticate(key) is None
    assert ring.authenticate(other) is not None  # the other key is untouched
    assert [(r.name, r.active) for r in ring.records()] == [("photo booth", False), ("ops", True)]


def test_bad_names_scopes_and_revocations_are_refused(store: GalleryStore) -> None:
    ring = KeyRing(store)
    with pytest.raises(ApiKeyError, match="scopes"):
        ring.create("x", ["admin"])
    with pytest.raises(ApiKeyError, match="scopes"):
        ring.create("x", [])
    with pytest.raises(ApiKeyError, match="name"):
        ring.create("../etc", ["manage"])
    ring.create("x", ["manage"])
    with pytest.raises(ApiKeyError, match="already named"):
        ring.create("x", ["recognize"])
    with pytest.raises(ApiKeyError, match="no active key"):
        ring.revoke("nobody")


def test_the_command_line_prints_a_key_once_and_lists_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gallery = str(tmp_path / "store")
    assert main(["keys", "create", "--gallery", gallery, "--name", "booth", "--scope", "recognize"]) == 0
    created = json.loads(capsys.readouterr().out)
    key = created.pop("key")
    assert KeyRing(open_gallery_store(gallery)).authenticate(key) is not None
    assert main(["keys", "list", "--gallery", gallery]) == 0
    listed = capsys.readouterr().out
    assert key not in listed and "sha256" not in listed
    assert json.loads(listed) == created
    assert main(["keys", "revoke", "--gallery", gallery, created["id"]]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] is not None
    assert KeyRing(open_gallery_store(gallery)).authenticate(key) is None
    assert main(["keys", "revoke", "--gallery", gallery, created["id"]]) == 2  # already revoked: said, not done twice


def test_a_cluster_is_not_deployed_to_serve_the_gallery_without_a_key(
    moto_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cluster.deploy
    from aws_stack.stack import StackConfig

    deployed: list[object] = []
    monkeypatch.setattr("facerec.cli.cluster_commands.deploy", lambda config, address: deployed.append(config))
    prefix = f"keyless-{uuid.uuid4().hex[:6]}"
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text(f"cluster_name: {prefix}\nprovider:\n  region: us-east-1\n")
    gallery = StackConfig(prefix=prefix, region="us-east-1").gallery_uri
    assert main(["cluster", "deploy", "--bootstrap", str(bootstrap)]) == 2
    assert deployed == [] and f"facerec keys create --gallery {gallery}" in caplog.text
    # A revoked key is no key.
    ring = KeyRing(open_gallery_store(gallery))
    _, record = ring.create("operators", ["manage"])
    ring.revoke(record.id)
    assert main(["cluster", "deploy", "--bootstrap", str(bootstrap)]) == 2 and deployed == []
    ring.create("clients", ["recognize"])
    assert main(["cluster", "deploy", "--bootstrap", str(bootstrap)]) == 0
    assert len(deployed) == 1 and cluster.deploy.stack_from_bootstrap(bootstrap).prefix == prefix
