"""Gallery revisions pushed to Recognizer replicas, without Ray: a change is answered only once every watcher
knows it; a watcher that does not acknowledge is dropped and told so."""

from __future__ import annotations

import asyncio

from serve_app.deployments.revision_watch import UNKNOWN_REVISION, RevisionWatchers


class Writer:
    """The writer's revision, by model (another model's replicas see 0)."""

    def __init__(self) -> None:
        self.revision = 5

    def current(self, model_id: str | None) -> int:
        return self.revision if model_id in (None, "m") else 0


async def _follow(watchers: RevisionWatchers, name: str, seen: list[int], stop: asyncio.Event) -> None:
    """A Recognizer replica's loop: each call acknowledges what the previous one returned."""
    known = UNKNOWN_REVISION
    while not stop.is_set():
        known = await watchers.watch(name, known, "m", timeout_s=30)
        seen.append(known)


def test_a_change_is_answered_once_every_watcher_knows_it() -> None:
    async def scenario() -> None:
        writer = Writer()
        watchers = RevisionWatchers(writer.current, ack_timeout_s=10)
        stop = asyncio.Event()
        seen: dict[str, list[int]] = {"a": [], "b": []}
        followers = [asyncio.create_task(_follow(watchers, n, seen[n], stop)) for n in seen]
        while not all(seen.values()):  # each has registered (its first call returned at once)
            await asyncio.sleep(0.01)
        assert seen == {"a": [5], "b": [5]}
        writer.revision = 6
        assert await watchers.published("m") == []
        # When published() returns, every watcher has been told 6 (and called again to say so).
        assert seen["a"][-1] == seen["b"][-1] == 6
        stop.set()
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_watcher_that_never_acknowledges_is_dropped_and_told_so() -> None:
    async def scenario() -> None:
        writer = Writer()
        watchers = RevisionWatchers(writer.current, ack_timeout_s=0.3)
        assert await watchers.watch("stalled", UNKNOWN_REVISION, "m", timeout_s=1) == 5  # registered
        # It never calls again (stalled, or gone): the next change waits for it once, then drops it.
        writer.revision = 6
        assert await watchers.published("m") == ["stalled"]
        assert watchers.watchers == 0
        writer.revision = 7
        assert await asyncio.wait_for(watchers.published("m"), 0.2) == []  # no more waiting for it

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_stalled_watcher_is_told_the_change_dropped_then_registered_by_its_next_call() -> None:
    async def scenario() -> None:
        writer = Writer()
        watchers = RevisionWatchers(writer.current, ack_timeout_s=0.3)
        pending = asyncio.create_task(watchers.watch("stalled", 5, "m", timeout_s=30))  # knows 5, long-polling
        await asyncio.sleep(0.05)
        writer.revision = 6
        publishing = asyncio.create_task(watchers.published("m"))
        assert await asyncio.wait_for(pending, 1) == 6  # told at once (its call lives in the writer)
        assert await publishing == ["stalled"]  # but it did not call again in time: dropped
        # Its next call registers it again, knowing 6: the following change waits for it as for any watcher.
        again = asyncio.create_task(watchers.watch("stalled", 6, "m", timeout_s=30))
        await asyncio.sleep(0.05)
        writer.revision = 7
        publishing = asyncio.create_task(watchers.published("m"))
        assert await asyncio.wait_for(again, 1) == 7
        acknowledging = asyncio.create_task(watchers.watch("stalled", 7, "m", timeout_s=0.5))
        assert await publishing == []
        assert await acknowledging == 7

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_another_models_watchers_are_not_waited_for() -> None:
    async def scenario() -> None:
        writer = Writer()
        watchers = RevisionWatchers(writer.current, ack_timeout_s=5)
        other = asyncio.create_task(watchers.watch("other-model", 0, "x", timeout_s=0.5))
        await asyncio.sleep(0.05)
        writer.revision = 6
        assert await asyncio.wait_for(watchers.published("m"), 1) == []
        assert await other == 0  # its revision (0 for another model) did not change: it timed out quietly

    asyncio.run(asyncio.wait_for(scenario(), 30))
