"""The audit trail: events written append-only beside the gallery, read back with filters, never a key in it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from facerec.cli.main import main
from serve_app.access.audit import AuditEvent, AuditTrail, read_events
from serve_app.gallery_store import GalleryStore, GalleryStoreError, open_gallery_store
from tests.store_fixtures import store

pytestmark = pytest.mark.aws
__all__ = ["store"]  # the fixture, used by name


class Clock:
    def __init__(self) -> None:
        self.at = datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC)

    def __call__(self) -> str:
        self.at += timedelta(milliseconds=250)
        return self.at.isoformat(timespec="microseconds")


def test_events_are_written_once_per_flush_and_read_back_with_filters(store: GalleryStore) -> None:
    clock = Clock()
    trail = AuditTrail(store, "replica-1", clock=clock)
    trail.event("faces.enrol", 201, "127.0.0.1", key="ops", key_id="k1", person="Ada", face_ids=("f1",))
    trail.event("chip.read", 200, "127.0.0.1", key="ops", key_id="k1", person="Ada", face_ids=("f1",))
    assert trail.flush() == 2 and trail.buffered == 0 and trail.flush() == 0  # nothing left: nothing written
    trail.event("people.list", 200, "127.0.0.2", key="booth", key_id="k2")
    trail.event("key.refused", 401, "127.0.0.9")
    trail.event("person.forget", 200, "127.0.0.1", key="ops", key_id="k1", person="Ada", face_ids=())
    assert trail.flush() == 3
    everything = list(read_events(store))
    assert [e.action for e in everything] == [
        "faces.enrol",
        "chip.read",
        "people.list",
        "key.refused",
        "person.forget",
    ]
    # The second flush crossed midnight: one object for each day, in that day's folder.
    assert store.audit_days() == ["2026-12-01", "2026-12-02"]
    assert [e.action for e in read_events(store, person="Ada")] == ["faces.enrol", "chip.read", "person.forget"]
    assert [e.action for e in read_events(store, key="booth")] == ["people.list"]
    assert [e.action for e in read_events(store, key="k1", action="chip")] == ["chip.read"]
    since = datetime(2026, 12, 2, tzinfo=UTC)
    assert [e.action for e in read_events(store, since=since)] == ["key.refused", "person.forget"]
    before = since - timedelta(milliseconds=1)
    assert [e.action for e in read_events(store, until=before)] == ["faces.enrol", "chip.read", "people.list"]


def test_nothing_in_the_trail_is_ever_replaced(store: GalleryStore) -> None:
    assert store.write_audit("2026-12-01", "000000.000000-a-000000001.jsonl", b"{}\n")
    assert not store.write_audit("2026-12-01", "000000.000000-a-000000001.jsonl", b"replaced\n")
    assert store.read_audit(store.audit_objects("2026-12-01")[0]) == b"{}\n"
    with pytest.raises(ValueError, match="not an audit object"):
        store.write_audit("../keys", "x.jsonl", b"")


def test_a_failed_write_keeps_the_events_for_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_gallery_store(str(tmp_path / "store"))
    trail = AuditTrail(store, "r")
    trail.event("chip.read", 200, "127.0.0.1", person="Ada")
    real = store.write_audit

    def unreachable(day: str, name: str, data: bytes) -> bool:
        raise GalleryStoreError("the store cannot be reached")

    monkeypatch.setattr(store, "write_audit", unreachable)
    with pytest.raises(GalleryStoreError):
        trail.flush()
    trail.event("chip.read", 200, "127.0.0.1", person="Bob")
    monkeypatch.setattr(store, "write_audit", real)
    assert trail.flush() == 2
    assert [e.person for e in read_events(store)] == ["Ada", "Bob"]


def test_the_command_line_filters_the_trail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gallery = str(tmp_path / "store")
    trail = AuditTrail(open_gallery_store(gallery), "r")
    trail.event("chip.read", 200, "127.0.0.1", key="ops", key_id="k1", person="Ada", face_ids=("f1",))
    trail.event("people.list", 200, "127.0.0.2", key="booth", key_id="k2")
    trail.flush()
    assert main(["audit", "--gallery", gallery, "--person", "Ada", "--since", "1h"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [AuditEvent.from_json(line).action for line in lines] == ["chip.read"]
    assert json.loads(lines[0])["face_ids"] == ["f1"] and json.loads(lines[0])["key"] == "ops"
    assert main(["audit", "--gallery", gallery, "--key", "booth"]) == 0
    assert [json.loads(line)["action"] for line in capsys.readouterr().out.splitlines()] == ["people.list"]
    assert main(["audit", "--gallery", gallery, "--since", "2026-13-45"]) == 2
    assert main(["audit", "--gallery", gallery, "--until", "1d"]) == 0 and capsys.readouterr().out == ""


def test_events_of_several_replicas_are_read_in_the_order_they_happened(store: GalleryStore) -> None:
    clock = Clock()  # one clock: the replicas' events interleave in time
    first, second = AuditTrail(store, "replica-a", clock=clock), AuditTrail(store, "replica-b", clock=clock)
    first.event("faces.enrol", 201, "127.0.0.1", person="Ada")
    second.event("chip.read", 200, "127.0.0.2", person="Ada")
    first.event("person.forget", 200, "127.0.0.1", person="Ada")
    first.flush()  # one object, named after its first event, holding the first and the last
    second.flush()
    assert [e.action for e in read_events(store, person="Ada")] == ["faces.enrol", "chip.read", "person.forget"]
