"""Gallery revisions pushed to the Recognizer replicas, so that a batch of recognitions asks nobody anything.

Read-your-writes across replicas: a photo sent after an enrolment was answered must be matched against a gallery
that has the new face, whichever replica matches it. Asking the GalleryWriter for its revision before every batch
gave that, at the cost of one call to the head per batch. Instead each Recognizer replica long-polls the writer
(:meth:`RevisionWatchers.watch`): the call returns as soon as the revision differs from the one the replica knows,
and the replica calls again at once with the new one, which is its acknowledgement. The writer answers a change
only once every watching replica has acknowledged the new revision (:meth:`RevisionWatchers.published`), so when
the answer leaves, every replica knows the revision to fetch before its next batch.

A replica counts its watch as current only after a call has returned (the writer then knows it); until then, or
after a failed call, it asks the writer before each batch as before. A replica that does not acknowledge within
``ack_timeout_s`` (it is stalled, or gone) is dropped from the writer's list: one change waits that long once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: A first call with this as the known revision returns at once: the registration that makes a watch current.
UNKNOWN_REVISION = -1


@dataclass
class RevisionWatchers:
    """The writer's side: who watches, what each has acknowledged, and the wake-up on a change."""

    current: Callable[[str | None], int]
    ack_timeout_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    #: subscriber -> (model id, the revision it last said it knows)
    _known: dict[str, tuple[str | None, int]] = field(default_factory=dict)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def watch(self, subscriber: str, known: int, model_id: str | None, timeout_s: float) -> int:
        """The revision once it differs from ``known`` (at once if it already does), or after ``timeout_s``."""
        async with self._changed:
            self._known[subscriber] = (model_id, known)
            self._changed.notify_all()  # an acknowledgement: a change may be waiting for it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.current(model_id) != known or subscriber not in self._known),
                    timeout_s,
                )
            return self.current(model_id) if subscriber in self._known else UNKNOWN_REVISION

    async def published(self, model_id: str | None) -> list[str]:
        """Wake every watcher, then wait until each watcher of ``model_id`` has acknowledged the new revision;
        returns the ones dropped for not doing so within ``ack_timeout_s``."""
        revision = self.current(model_id)

        def acknowledged() -> bool:
            return all(known >= revision for model, known in self._known.values() if model == model_id)

        async with self._changed:
            self._changed.notify_all()
            try:
                await asyncio.wait_for(self._changed.wait_for(acknowledged), self.ack_timeout_s)
                return []
            except TimeoutError:
                late = [s for s, (model, known) in self._known.items() if model == model_id and known < revision]
                for subscriber in late:
                    del self._known[subscriber]
                self._changed.notify_all()  # a late watcher's pending call returns "not registered"
                return late

    @property
    def watchers(self) -> int:
        return len(self._known)
