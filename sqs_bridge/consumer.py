"""The request-queue consumer: long-poll, process a bounded number of messages at once, acknowledge in batches.

One cycle: receive up to 10 messages (long polling) -> process each concurrently while a heartbeat keeps it
invisible -> delete the finished ones in batches of up to 10. A transient failure leaves the message on the
queue with an exponentially growing visibility timeout (from its receive count); SQS's redrive policy moves it
to the dead-letter queue after ``maxReceiveCount`` deliveries. ``run`` repeats the cycle until its stop event is
set, then drains: it stops receiving and waits for the messages it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from sqs_bridge.processor import RequestMessage, RequestProcessor, TransientError

log = logging.getLogger(f"ray.serve.{__name__}")


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

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then finish (and acknowledge) every message already received."""
        deleter = asyncio.create_task(self._delete_batches())
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
            deleter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deleter

    async def _receive(self, count: int, stop: asyncio.Event) -> list[dict[str, Any]]:
        response = await asyncio.to_thread(
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
        heartbeat = asyncio.create_task(self._keep_invisible(message))
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
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._slots.release()

    async def _keep_invisible(self, message: RequestMessage) -> None:
        # Extend well before the timeout runs out, so a slow batch never lets SQS hand the message to another.
        period = max(1.0, self.config.visibility_timeout_s / 3)
        while True:
            await asyncio.sleep(period)
            await self._set_visibility(message, self.config.visibility_timeout_s)

    async def _set_visibility(self, message: RequestMessage, seconds: int) -> None:
        try:
            await asyncio.to_thread(
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
            result = await asyncio.to_thread(self.sqs.delete_message_batch, QueueUrl=self.queue_url, Entries=entries)
        except (BotoCoreError, ClientError) as exc:
            # Not deleted means redelivered later: the processor recognises it and does not answer twice.
            log.warning("batch delete of %d failed: %s", len(batch), exc)
            return
        for failure in result.get("Failed", []):
            log.warning("delete failed for %s: %s", batch[int(failure["Id"])].message_id, failure.get("Message"))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
