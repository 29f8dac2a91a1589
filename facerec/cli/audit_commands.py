"""``facerec audit``: read the audit trail kept beside a gallery (see serve_app/access/audit.py)."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta

from facerec.cli.keys_commands import gallery_store_for
from serve_app.access.audit import read_events
from serve_app.gallery_store import GalleryStoreError

log = logging.getLogger("facerec")

EXIT_BAD_INPUT = 2
RELATIVE = re.compile(r"(\d+)([smhd])")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (UTC if it names no zone), or a time ago: ``90s``, ``15m``, ``2h``, ``7d``."""
    relative = RELATIVE.fullmatch(text.strip())
    if relative:
        return datetime.now(UTC) - timedelta(**{UNITS[relative.group(2)]: int(relative.group(1))})
    moment = datetime.fromisoformat(text.strip())
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def audit(
    gallery: str,
    person: str | None,
    key: str | None,
    since: str | None,
    until: str | None,
    action: str | None,
) -> int:
    """Print the matching events, one JSON object a line, oldest first."""
    try:
        start = parse_time(since) if since else None
        end = parse_time(until) if until else None
    except ValueError as exc:
        log.error("not a time: %s (give ISO 8601, e.g. 2026-12-01T09:00, or a time ago: 15m, 2h, 7d)", exc)
        return EXIT_BAD_INPUT
    try:
        for event in read_events(
            gallery_store_for(gallery), since=start, until=end, person=person, key=key, action=action
        ):
            print(event.to_json())
    except (GalleryStoreError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    return 0
