"""The request processor's own guarantees, without AWS: copies of one request never run at the same time."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from sqs_bridge.processor import Answer, Outcome, RequestMessage, RequestProcessor, _read_at_most


def _events_only() -> Any:
    """An SQS client stand-in: the processor only registers a retry hook on it when built."""
    return SimpleNamespace(meta=SimpleNamespace(events=SimpleNamespace(register=lambda *_: None)))


def _copy(number: int) -> RequestMessage:
    return RequestMessage(f"m{number}", f"r{number}", "test_000.jpg", "c0ffee00-0000-4000-8000-000000000001", 1)


async def _never(_: bytes) -> Answer:
    raise AssertionError("not used")


def test_three_copies_of_one_request_run_one_at_a_time() -> None:
    """Copy 1 runs, copy 2 waits; when copy 1 ends, a copy 3 arriving while copy 2 runs must wait too."""
    processor = RequestProcessor(_events_only(), _events_only(), "in", "out", "url", _never)
    inside: set[str] = set()
    most_at_once = 0
    gates = {f"m{n}": asyncio.Event() for n in (1, 2, 3)}
    entered = {f"m{n}": asyncio.Event() for n in (1, 2, 3)}

    async def instrumented(message: RequestMessage) -> Outcome:
        nonlocal most_at_once
        inside.add(message.message_id)
        most_at_once = max(most_at_once, len(inside))
        entered[message.message_id].set()
        await gates[message.message_id].wait()
        inside.discard(message.message_id)
        return Outcome.REUSED

    processor._process = instrumented  # type: ignore[method-assign]

    async def scenario() -> None:
        first = asyncio.create_task(processor.process(_copy(1)))
        await entered["m1"].wait()
        second = asyncio.create_task(processor.process(_copy(2)))
        for _ in range(5):  # let copy 2 reach the lock and wait on it
            await asyncio.sleep(0)
        gates["m1"].set()
        await first
        await asyncio.wait_for(entered["m2"].wait(), 5)
        third = asyncio.create_task(processor.process(_copy(3)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not entered["m3"].is_set(), "copy 3 ran beside copy 2"
        gates["m2"].set()
        await second
        await asyncio.wait_for(entered["m3"].wait(), 5)
        gates["m3"].set()
        await third

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert most_at_once == 1
    assert processor._active == {}  # nothing left behind once every copy is done


class _Body:
    """A streaming body that records how much was asked of it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.asked: list[int | None] = []
        self.closed = False

    def read(self, amount: int | None = None) -> bytes:
        self.asked.append(amount)
        return b"x" * (self.size if amount is None else min(amount, self.size))

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("size", "declared", "read", "asked"),
    [
        (100, 100, True, [101]),
        (101, 101, False, []),  # over the limit by its length: never read
        (5000, None, False, [101]),  # no length given: read no further than one byte past the limit
        (5000, 10, False, [101]),  # a wrong length does not make the read unbounded
    ],
)
def test_an_input_is_read_no_further_than_the_limit(
    size: int, declared: int | None, read: bool, asked: list[int]
) -> None:
    body = _Body(size)
    obj = {"Body": body, **({"ContentLength": declared} if declared is not None else {})}
    data = _read_at_most(obj, 100)
    assert (data is not None) is read and body.asked == asked and body.closed
