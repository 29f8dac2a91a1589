"""The audit trail: every read or change of the gallery and every refused key, stored append-only beside it.

Each event says who (the key's name and id, never the key), what (the action, the person and face ids it
concerned, the answer's status), when (UTC, to the microsecond) and from where (the client's address). An ingress
replica buffers its events and writes them every :data:`FLUSH_S` seconds as one object
``access/audit/<day>/<time>-<replica>-<n>.jsonl`` in the gallery store, written once and never replaced (S3's
``If-None-Match: *``; locally a hard link), so no object of the trail is ever overwritten by the service. A
failed write keeps the events for the next one (up to :data:`MAX_BUFFERED`; past that the oldest are dropped,
and the drop is logged). Events not yet written when a replica dies are lost: at most the last second's.

What is recorded (:data:`ACTIONS`): listings of people, reads of a person and of a chip, enrolments, removals,
re-embeddings, and keys refused (401 with a key, 403, and an address blocked for refused keys). Recognition is not
recorded: it reads no one's data from the gallery but the names it answers, and a trail of every photo would be
a record of its own. ``facerec audit`` reads the trail with filters (:func:`read_events`).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime

from serve_app.access.keys import now
from serve_app.gallery_store import GalleryStore

log = logging.getLogger(f"ray.serve.{__name__}")

#: How often an ingress replica writes what it recorded.
FLUSH_S = 1.0
#: Events kept while the store cannot be written (the oldest dropped past this).
MAX_BUFFERED = 100_000

#: (method, operation) -> action, for the operations that read or change the gallery.
ACTIONS = {
    ("GET", "/v1/people"): "people.list",
    ("GET", "/v1/people/{name}"): "person.read",
    ("GET", "/v1/people/{name}/faces/{face_id}/image"): "chip.read",
    ("POST", "/v1/people/{name}/faces"): "faces.enrol",
    ("DELETE", "/v1/people/{name}"): "person.forget",
    ("DELETE", "/v1/people/{name}/faces/{face_id}"): "face.forget",
    ("GET", "/v1/gallery"): "gallery.read",
    ("POST", "/v1/gallery/reembed"): "gallery.reembed",
}
#: Refusals recorded, by their error code.
REFUSALS_RECORDED = {"unauthorized": "key.refused", "forbidden": "key.forbidden", "too_many_failures": "key.blocked"}


@dataclass(frozen=True)
class AuditEvent:
    at: str
    action: str
    status: int
    client: str
    key: str | None = None
    key_id: str | None = None
    operation: str = ""
    person: str | None = None
    face_ids: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "face_ids": list(self.face_ids)}, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> AuditEvent:
        raw = json.loads(line)
        return cls(**{**raw, "face_ids": tuple(raw.get("face_ids", ()))})

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.at)


class AuditTrail:
    """One writer's buffer of events and its writes to the store."""

    def __init__(self, store: GalleryStore, writer: str | None = None, clock: Callable[[], str] = now) -> None:
        self.store = store
        self.writer = "".join(c for c in (writer or secrets.token_hex(6)) if c.isalnum())[:32] or secrets.token_hex(6)
        self._clock = clock
        self._events: deque[AuditEvent] = deque()
        self._lock = threading.Lock()
        self._objects = 0
        self.dropped = 0

    def record(self, event: AuditEvent) -> None:
        with self._lock:
            self._events.append(event)
            while len(self._events) > MAX_BUFFERED:
                self._events.popleft()
                self.dropped += 1

    def event(
        self,
        action: str,
        status: int,
        client: str,
        *,
        key: str | None = None,
        key_id: str | None = None,
        operation: str = "",
        person: str | None = None,
        face_ids: tuple[str, ...] = (),
    ) -> None:
        """Record an event that happens now."""
        self.record(AuditEvent(self._clock(), action, status, client, key, key_id, operation, person, face_ids))

    def flush(self) -> int:
        """Write what was recorded, one object per day its events fall on (blocking: call it off the event loop);
        returns how many events. On a failure the events not yet written stay for the next flush, and the error
        is raised."""
        with self._lock:
            batch = list(self._events)
        written = 0
        while written < len(batch):
            day = batch[written].time.strftime("%Y-%m-%d")
            end = written
            while end < len(batch) and batch[end].time.strftime("%Y-%m-%d") == day:
                end += 1
            part = batch[written:end]
            self._objects += 1
            name = f"{part[0].time.strftime('%H%M%S.%f')}-{self.writer}-{self._objects:09d}.jsonl"
            data = "".join(event.to_json() + "\n" for event in part).encode()
            if not self.store.write_audit(day, name, data):
                raise RuntimeError(f"an audit object named {name} exists already")  # never replaced
            with self._lock:
                for _ in range(min(len(part), len(self._events))):
                    self._events.popleft()
            written = end
        return written

    @property
    def buffered(self) -> int:
        return len(self._events)


def read_events(
    store: GalleryStore,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    person: str | None = None,
    key: str | None = None,
    action: str | None = None,
) -> Iterator[AuditEvent]:
    """The trail's events in the order they happened, filtered (``key``: a key's name or id). Each ingress replica
    writes its own objects, so a day's objects are read whole and their events merged by time."""
    for day in store.audit_days():
        if since is not None and day < since.strftime("%Y-%m-%d"):
            continue
        if until is not None and day > until.strftime("%Y-%m-%d"):
            continue
        events = []
        for name in store.audit_objects(day):
            data = store.read_audit(name)
            for line in (data or b"").decode().splitlines():
                event = AuditEvent.from_json(line)
                if since is not None and event.time < since:
                    continue
                if until is not None and event.time > until:
                    continue
                if person is not None and event.person != person:
                    continue
                if key is not None and key not in (event.key, event.key_id):
                    continue
                if action is not None and not event.action.startswith(action):
                    continue
                events.append(event)
        yield from sorted(events, key=lambda event: event.time)
