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

from serve_app.deployments.batching import BatcherClosedError

log = logging.getLogger(f"ray.serve.{__name__}")

T = TypeVar("T")

#: The replica went away mid-call, or none could take it: worth another try, and a 503 when out of tries.
REPLICA_LOST: tuple[type[Exception], ...] = (
    RayActorError,
    ActorUnavailableError,
    DeploymentUnavailableError,
    BackPressureError,
    BatcherClosedError,  # a Recognizer whose batching loop stopped: Serve is about to replace it
)
ATTEMPTS = 5
BACKOFF_S = 0.25
#: A replica that died while holding the request may have died *of* it (a photo that crashes the decoder, an
#: out-of-memory kill): sent again once, not five times, so one such photo cannot take out every replica.
DIED_WITH_IT_ATTEMPTS = 2


async def idempotent(call: Callable[[], Awaitable[T]], what: str, attempts: int = ATTEMPTS) -> T:
    """``await call()``, again (up to ``attempts`` times in all) while the replica it reached is lost."""
    died_with_it = 0
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except REPLICA_LOST as error:
            # ActorUnavailableError and the Serve errors mean the request never ran; RayActorError that it did.
            ran = isinstance(error, RayActorError) and not isinstance(error, ActorUnavailableError)
            died_with_it += ran
            if attempt == attempts or died_with_it >= DIED_WITH_IT_ATTEMPTS:
                raise
            log.warning("%s: replica lost (%s), attempt %d of %d", what, type(error).__name__, attempt + 1, attempts)
            await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
