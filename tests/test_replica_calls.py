"""Retries of calls whose replica was lost: again while the request never ran, at most once when it died with it."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError

from serve_app.deployments import replica_calls
from serve_app.deployments.replica_calls import idempotent


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_calls, "BACKOFF_S", 0.0)


def calls_failing_with(*errors: Exception) -> tuple[list[int], object]:
    made: list[int] = []

    async def call() -> str:
        made.append(1)
        if len(made) <= len(errors):
            raise errors[len(made) - 1]
        return "answer"

    return made, call


def test_a_request_that_never_ran_is_sent_until_a_replica_takes_it() -> None:
    made, call = calls_failing_with(
        ActorUnavailableError("gone", None), BackPressureError(num_queued_requests=1, max_queued_requests=1)
    )
    assert asyncio.run(idempotent(call, "photo")) == "answer"  # type: ignore[arg-type]
    assert len(made) == 3


def test_a_replica_that_died_holding_the_request_is_tried_once_more_only() -> None:
    made, call = calls_failing_with(ActorDiedError(), ActorDiedError(), ActorDiedError())
    with pytest.raises(ActorDiedError):
        asyncio.run(idempotent(call, "photo"))  # type: ignore[arg-type]
    assert len(made) == 2
    made, call = calls_failing_with(ActorDiedError())
    assert asyncio.run(idempotent(call, "photo")) == "answer"  # type: ignore[arg-type]


def test_out_of_tries_the_error_is_raised() -> None:
    made, call = calls_failing_with(*[ActorUnavailableError("gone", None)] * 10)
    with pytest.raises(ActorUnavailableError):
        asyncio.run(idempotent(call, "photo", attempts=3))  # type: ignore[arg-type]
    assert len(made) == 3
