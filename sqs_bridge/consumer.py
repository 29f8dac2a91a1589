"""The request-queue consumer: long-poll, process a bounded number of messages at once, acknowledge in batches.

One cycle: receive up to 10 messages (long polling) -> process each concurrently while one heartbeat keeps every
held message invisible (a ``ChangeMessageVisibilityBatch`` per 10 held, a third of the way into the visibility
timeout) -> delete the finished ones in batches of up to 10. A transient failure leaves the message on the
queue with an exponentially growing visibility timeout (from its receive count); SQS's redrive policy moves it
to the dead-letter queue after ``maxReceiveCount`` deliveries. ``run`` repeats the cycle until its stop event is
set, then drains: it stops receiving and waits for the messages it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from sqs_bridge.processor import RequestMessage, RequestProcessor, TransientError

log = logging.getLogger(f"ray.serve.{__name__}")

T = TypeVar("T")


@dataclass(frozen=True)
class ConsumerConfig:
    max_in_flight: int = 32
    wait_time_s: int = 5
    visibility_timeout_s: int = 60
    #: Retry backoff: base * 2^(receive_count - 1) seconds, capped (SQS allows at most 12 hours).
    backoff_base_s: int = 2
    backoff_max_s: int = 300


def backoff_seconds(receive_count: int, base: int, cap: int) -> int:
    """Visibility timeout for a message that failed on its ``receive_count``-th delivery."""
    return int(min(cap, base * 2 ** max(0, receive_count - 1)))


@dataclass
class RequestConsumer:
    sqs: Any
    queue_url: str
    processor: RequestProcessor
    config: ConsumerConfig = field(default_factory=ConsumerConfig)
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.config.max_in_flight)
        self._deletes: asyncio.Queue[RequestMessage] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Messages being processed -> when their invisibility was last extended (monotonic seconds).
        self._held: dict[str, tuple[RequestMessage, float]] = {}
        # The queue's own calls (receive, heartbeat, deletes) get threads of their own: behind the processing's S3
        # calls in a shared pool, a heartbeat could come too late and SQS hand a held message to another node.
        self._queue_threads = ThreadPoolExecutor(4, thread_name_prefix="sqs-queue")

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def _queue_call(self, function: Callable[..., T], **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._queue_threads, functools.partial(function, **kwargs))

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then finish (and acknowledge) every message already received."""
        deleter = asyncio.create_task(self._delete_batches())
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while not stop.is_set():
                # Reserve one slot per message asked for: at least one (waiting for it), at most 10 (SQS's cap).
                await self._slots.acquire()
                free = 1
                while free < 10 and not self._slots.locked():
                    await self._slots.acquire()
                    free += 1
                try:
                    messages = await self._receive(free, stop)
                except (BotoCoreError, ClientError) as exc:
                    log.warning("receive failed, retrying in 2 s: %s", exc)
                    messages = []
                    await _sleep_or_stop(stop, 2.0)
                for _ in range(free - len(messages)):
                    self._slots.release()
                for message in messages:
                    task = asyncio.create_task(self._handle(RequestMessage.from_sqs(message)))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            if self._tasks:
                log.info("draining %d in-flight request(s)", len(self._tasks))
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            await self._deletes.join()
            for task in (deleter, heartbeat):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._queue_threads.shutdown(wait=False)

    async def _receive(self, count: int, stop: asyncio.Event) -> list[dict[str, Any]]:
        response = await self._queue_call(
            self.sqs.receive_message,
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=0 if stop.is_set() else self.config.wait_time_s,
            VisibilityTimeout=self.config.visibility_timeout_s,
            AttributeNames=["ApproximateReceiveCount"],
            MessageAttributeNames=["All"],
        )
        return list(response.get("Messages", []))

    async def _handle(self, message: RequestMessage) -> None:
        self._held[message.receipt_handle] = (message, time.monotonic())
        try:
            outcome = await self.processor.process(message)
        except TransientError as exc:
            delay = backoff_seconds(message.receive_count, self.config.backoff_base_s, self.config.backoff_max_s)
            log.warning(
                "request %s failed (delivery %d), retry in %d s: %s",
                message.message_id,
                message.receive_count,
                delay,
                exc,
            )
            self.counts["retried"] += 1
            await self._set_visibility(message, delay)
        except Exception:
            # A bug, not the input: keep the message (it will be retried, then dead-lettered) and keep consuming.
            log.exception("request %s: unexpected failure", message.message_id)
            self.counts["failed"] += 1
            await self._set_visibility(message, self.config.backoff_max_s)
        else:
            self.counts[outcome.value] += 1
            await self._deletes.put(message)
        finally:
            self._held.pop(message.receipt_handle, None)
            self._slots.release()

    async def _heartbeat(self) -> None:
        """Every held message's invisibility extended, well before it runs out, so that a slow batch never lets
        SQS hand a message this consumer is working on to another one; a lapse (a stall past the timeout) is
        counted, since then another consumer may have answered it too."""
        timeout = self.config.visibility_timeout_s
        period = max(1.0, timeout / 3)
        while True:
            await asyncio.sleep(period / 2)
            now = time.monotonic()
            due = [(handle, held) for handle, held in list(self._held.items()) if now - held[1] >= period]
            for start in range(0, len(due), 10):
                batch = due[start : start + 10]
                lapsed = sum(1 for _, (_, extended) in batch if now - extended > timeout)
                if lapsed:
                    self.counts["visibility_lapsed"] += lapsed
                    log.warning("%d held message(s) went past their visibility timeout before the heartbeat", lapsed)
                entries = [
                    {"Id": str(i), "ReceiptHandle": handle, "VisibilityTimeout": timeout}
                    for i, (handle, _) in enumerate(batch)
                ]
                try:
                    result = await self._queue_call(
                        self.sqs.change_message_visibility_batch, QueueUrl=self.queue_url, Entries=entries
                    )
                except (BotoCoreError, ClientError) as exc:
                    log.warning("could not extend the visibility of %d held message(s): %s", len(batch), exc)
                    continue
                failed = {int(f["Id"]) for f in result.get("Failed", [])}
                for i, (handle, (message, _)) in enumerate(batch):
                    if i not in failed and handle in self._held:
                        self._held[handle] = (message, now)

    async def _set_visibility(self, message: RequestMessage, seconds: int) -> None:
        try:
            await self._queue_call(
                self.sqs.change_message_visibility,
                QueueUrl=self.queue_url,
                ReceiptHandle=message.receipt_handle,
                VisibilityTimeout=seconds,
            )
        except (BotoCoreError, ClientError) as exc:
            log.warning("could not change visibility of %s: %s", message.message_id, exc)

    async def _delete_batches(self) -> None:
        while True:
            batch = [await self._deletes.get()]
            deadline = time.monotonic() + 0.05
            while len(batch) < 10 and time.monotonic() < deadline:
                try:
                    batch.append(self._deletes.get_nowait())
                except asyncio.QueueEmpty:
                    await asyncio.sleep(0.01)
            try:
                await self._delete(batch)
            finally:
                for _ in batch:
                    self._deletes.task_done()

    async def _delete(self, batch: list[RequestMessage]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": m.receipt_handle} for i, m in enumerate(batch)]
        try:
            result = await self._queue_call(self.sqs.delete_message_batch, QueueUrl=self.queue_url, Entries=entries)
        except (BotoCoreError, ClientError) as exc:
            # Not deleted means redelivered later: the processor recognises it and does not answer twice.
            log.warning("batch delete of %d failed: %s", len(batch), exc)
            return
        for failure in result.get("Failed", []):
            log.warning("delete failed for %s: %s", batch[int(failure["Id"])].message_id, failure.get("Message"))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
