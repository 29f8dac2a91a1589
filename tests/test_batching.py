"""The Recognizer's batcher: full batches under load, a lone request still answered, failures contained."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from serve_app.deployments.batching import Batcher, BatcherClosedError


class Model:
    """Doubles its inputs; the first batch waits until ``release`` is set, so arrivals pile up meanwhile."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            await self.release.wait()
        if -1 in items:
            raise ValueError("bad item")
        return [2 * item for item in items]


@contextlib.asynccontextmanager
async def running(batcher: Batcher[int, int]) -> AsyncIterator[None]:
    task = asyncio.create_task(batcher.serve_forever())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


def test_a_busy_model_gets_full_batches_of_what_waited_meanwhile() -> None:
    async def scenario() -> None:
        model = Model()
        batcher = Batcher(model.run, max_batch_size=16, wait_s=0.0)
        async with running(batcher):
            first = asyncio.create_task(batcher.submit(0))
            await until(lambda: len(model.batches) == 1)
            rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 51)]
            await until(lambda: batcher.waiting == 50)
            model.release.set()
            answers = await asyncio.gather(first, *rest)
        assert answers == [2 * i for i in range(51)]
        assert [len(b) for b in model.batches] == [1, 16, 16, 16, 2]
        assert [i for b in model.batches for i in b] == list(range(51))  # first come, first served

    asyncio.run(scenario())


def test_a_lone_request_is_answered_after_the_wait() -> None:
    async def scenario() -> None:
        model = Model()
        model.release.set()
        batcher = Batcher(model.run, max_batch_size=16, wait_s=0.01)
        async with running(batcher):
            assert await asyncio.wait_for(batcher.submit(21), timeout=10) == 42
            # Arrivals within the wait share a batch.
            assert list(await asyncio.gather(batcher.submit(1), batcher.submit(2))) == [2, 4]
        assert model.batches == [[21], [1, 2]]

    asyncio.run(scenario())


def test_a_failing_batch_fails_its_callers_only_and_the_loop_goes_on() -> None:
    async def scenario() -> None:
        model = Model()
        model.release.set()
        batcher = Batcher(model.run, max_batch_size=4, wait_s=0.05)
        async with running(batcher):
            outcomes = await asyncio.gather(batcher.submit(-1), batcher.submit(3), return_exceptions=True)
            assert all(isinstance(o, ValueError) for o in outcomes)
            assert await batcher.submit(5) == 10

    asyncio.run(scenario())


def test_a_cancelled_caller_is_left_out_of_the_batch() -> None:
    async def scenario() -> None:
        model = Model()
        batcher = Batcher(model.run, max_batch_size=16, wait_s=0.0)
        async with running(batcher):
            first = asyncio.create_task(batcher.submit(0))
            await until(lambda: len(model.batches) == 1)
            gone = asyncio.create_task(batcher.submit(1))
            kept = asyncio.create_task(batcher.submit(2))
            await until(lambda: batcher.waiting == 2)
            gone.cancel()
            model.release.set()
            assert list(await asyncio.gather(first, kept)) == [0, 4]
        assert model.batches == [[0], [2]]

    asyncio.run(scenario())


def test_a_batch_function_that_loses_results_is_an_error() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def scenario() -> None:
        batcher = Batcher(short, max_batch_size=4, wait_s=0.05)
        async with running(batcher):
            outcomes = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        assert all(isinstance(o, RuntimeError) for o in outcomes)

    asyncio.run(scenario())


def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(Model().run, max_batch_size=0, wait_s=0.0)


def test_callers_get_an_error_at_once_when_the_loop_has_stopped() -> None:
    async def scenario() -> None:
        model = Model()
        batcher = Batcher(model.run, max_batch_size=4, wait_s=0.0)
        async with running(batcher):
            first = asyncio.create_task(batcher.submit(0))
            await until(lambda: len(model.batches) == 1)
            waiting = asyncio.create_task(batcher.submit(1))
            await until(lambda: batcher.waiting == 1)
        # The loop was cancelled with one batch running and one caller waiting: neither is left hanging.
        for stranded in (first, waiting):
            with pytest.raises(BatcherClosedError):
                await stranded
        with pytest.raises(BatcherClosedError):
            await batcher.submit(2)

    asyncio.run(scenario())
