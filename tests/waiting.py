"""Waiting on a condition, never on a fixed sleep: the test goes on as soon as it holds, on any machine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest


def wait_until(condition: Callable[[], object], timeout: float, message: str, interval: float = 0.2) -> None:
    """Poll ``condition()`` until it is truthy; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s: {message}")


async def wait_until_async(
    condition: Callable[[], object | Awaitable[object]], timeout: float, message: str, interval: float = 0.1
) -> None:
    """:func:`wait_until` inside an event loop (``condition`` may be a coroutine function); the loop keeps running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s: {message}")
