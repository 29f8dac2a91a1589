"""Background tasks a replica depends on, reported to Serve's health check so a dead one gets the replica replaced.

A replica's loop (gallery refresh, response routing, queue consumption, in-flight reporting, the scaling
controller) runs as an asyncio task beside the requests. Each loop catches the errors it expects and carries on,
but anything else ends the task, and the replica would go on answering health checks as a silent zombie: a stale
gallery, answers never routed, a queue nobody reads. Serve calls a deployment's ``check_health`` every
``health_check_period_s`` (10 s by default); a deployment that owns :class:`BackgroundTasks` raises there once a
task has ended, and Serve starts a new replica in its place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(f"ray.serve.{__name__}")


class BackgroundTaskError(RuntimeError):
    """A background task that should run for the replica's whole life has ended."""


class BackgroundTasks:
    """Named long-running tasks of one replica."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._stopping = False

    def start(self, name: str, loop: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``loop`` on the replica's event loop for as long as the replica lives."""
        if name in self._tasks:
            loop.close()  # never started: close it so that it is not reported as never awaited
            raise ValueError(f"a background task named {name!r} is already running")
        task = asyncio.get_event_loop().create_task(loop, name=name)
        task.add_done_callback(self._report_end)
        self._tasks[name] = task
        return task

    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    def check(self) -> None:
        """Raise :class:`BackgroundTaskError` if a task has ended (what ``check_health`` calls)."""
        if self._stopping:
            return
        for name, task in self._tasks.items():
            if task.done():
                cause = "cancelled" if task.cancelled() else repr(task.exception()) if task.exception() else "returned"
                raise BackgroundTaskError(
                    f"background task {name!r} has ended ({cause}): this replica must be replaced"
                )

    def kill(self, name: str) -> None:
        """Cancel one task as a crash would end it (a fault drill: the next health check fails)."""
        if name not in self._tasks:
            raise KeyError(f"no background task {name!r}; running: {', '.join(self._tasks) or 'none'}")
        self._tasks[name].cancel()

    def shutting_down(self) -> None:
        """The replica is stopping: tasks may end now without counting as deaths."""
        self._stopping = True

    def stop_all(self) -> None:
        """Cancel every task at shutdown (the health check no longer complains)."""
        self.shutting_down()
        for task in self._tasks.values():
            task.cancel()

    def _report_end(self, task: asyncio.Task[Any]) -> None:
        if self._stopping:
            return
        if task.cancelled():
            log.error("background task %r was cancelled; the replica reports unhealthy", task.get_name())
        elif task.exception() is not None:
            log.error(
                "background task %r died; the replica reports unhealthy",
                task.get_name(),
                exc_info=task.exception(),
            )
        else:
            log.error("background task %r returned; the replica reports unhealthy", task.get_name())


class Supervised:
    """Mixin for a deployment class with :class:`BackgroundTasks` in ``self._background``."""

    _background: BackgroundTasks

    def check_health(self) -> None:
        """Serve's health check: unhealthy once a background task has ended."""
        self._background.check()

    def replica(self) -> str:
        """This replica's id (a replaced replica has a new one)."""
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)

    def background_tasks(self) -> list[str]:
        """The names of this replica's background tasks."""
        return self._background.names

    def kill_background_task(self, name: str) -> None:
        """Fault drill: end one background task as a crash would. Serve replaces the replica at its next health
        check; used by the tests, and by operators who want to see that happen."""
        self._background.kill(name)
