"""Calls from the ingress to other deployments that survive a replica dying under them.

Recognition is idempotent (the same photo gives the same answer, and nothing is written), so a call whose
Recognizer replica died is sent again; Serve's router has by then marked that replica dead and picks another
(or waits for its replacement). Gallery changes are not retried here: the GalleryWriter decides what a repeated
enrolment means. What still fails after the retries is a 503 with ``Retry-After``, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

log = logging.getLogger(f"ray.serve.{__name__}")

T = TypeVar("T")

#: The replica went away mid-call, or none could take it: worth another try, and a 503 when out of tries.
REPLICA_LOST: tuple[type[Exception], ...] = (
    RayActorError,
    ActorUnavailableError,
    DeploymentUnavailableError,
    BackPressureError,
)
ATTEMPTS = 5
BACKOFF_S = 0.25


async def idempotent(call: Callable[[], Awaitable[T]], what: str, attempts: int = ATTEMPTS) -> T:
    """``await call()``, again (up to ``attempts`` times in all) while the replica it reached is lost."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except REPLICA_LOST as error:
            if attempt == attempts:
                raise
            log.warning("%s: replica lost (%s), attempt %d of %d", what, type(error).__name__, attempt + 1, attempts)
            await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
