"""Queue-mode web tier: one reader of the response queue that hands each answer to the request waiting for it.

With several ingress replicas each reading the response queue, a replica would receive answers meant for
another's waiters. Instead, one ``ResponseRouter`` replica reads the queue; ingress replicas register a
correlation id (``expect``) before they send the request, then ``wait`` for it through a handle. An answer is
deleted from the queue only once it is handed to its waiter; one nobody here expects (another client's, or one
that arrived after its waiter gave up) is left on the queue for whoever does.

The reader survives anything the queue holds: a message without a correlation id, or whose body is not an
answer of the contract (``('stem', 'Name')``), can never be claimed by anyone and is logged and deleted; a
malformed body carrying a waiting request's id is dropped and the request keeps waiting for its real answer.
If the router replica dies, Serve starts another; the ingress registers its waiters there again, and the
answers the dead replica had received reappear after ``RECEIVE_VISIBILITY_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, queue_urls
from serve_app.deployments.supervision import BackgroundTasks, Supervised
from serve_app.queue_mode.contract import KEY_ATTRIBUTE, well_formed_response

log = logging.getLogger(f"ray.serve.{__name__}")

#: How long an answer nobody here is waiting for stays hidden before SQS offers it again.
UNCLAIMED_VISIBILITY_S = 30
#: How long a received answer stays hidden while it is handed over: if this replica dies holding it, the
#: replacement sees it again after this long.
RECEIVE_VISIBILITY_S = 5
#: How long a given-up request's late answer is still recognised (and deleted) as such.
ABANDONED_MEMORY_S = 3600.0


class ResponseRouterDeployment(Supervised):
    def __init__(self, stack: StackConfig) -> None:
        clients = AwsClients.for_stack(stack)
        self._sqs = clients.sqs
        self._queue_url = queue_urls(stack, clients).responses
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self._stems: dict[str, str] = {}
        self._abandoned: dict[str, float] = {}  # correlation id -> when its waiter gave up, oldest first
        self._background = BackgroundTasks()
        self._background.start("response reader", self._read_forever())

    async def expect(self, correlation_id: str, stem: str | None = None) -> None:
        """Register interest before the request is sent, so its answer can never arrive unclaimed."""
        self._register(correlation_id, stem)

    async def wait(self, correlation_id: str, timeout_s: float, stem: str | None = None) -> str | None:
        """The response body for ``correlation_id``, or ``None`` after ``timeout_s`` seconds."""
        future = self._register(correlation_id, stem)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout_s)
        except TimeoutError:
            return None
        finally:
            if not future.done():  # timed out, or the caller went away: its answer, when it comes, is nobody's
                self._abandon(correlation_id)
            self._waiters.pop(correlation_id, None)
            self._stems.pop(correlation_id, None)

    async def forget(self, correlation_id: str) -> None:
        """The request was never sent (or its client gave up): drop its registration."""
        self._waiters.pop(correlation_id, None)
        self._stems.pop(correlation_id, None)
        self._abandon(correlation_id)

    def _abandon(self, correlation_id: str) -> None:
        # Remembered for a while, so that a late answer is deleted instead of circling on the queue for days.
        now = time.monotonic()
        self._abandoned[correlation_id] = now
        while self._abandoned and next(iter(self._abandoned.values())) < now - ABANDONED_MEMORY_S:
            self._abandoned.pop(next(iter(self._abandoned)))

    def _register(self, correlation_id: str, stem: str | None) -> asyncio.Future[str]:
        if stem is not None:
            self._stems[correlation_id] = stem
        return self._waiters.setdefault(correlation_id, asyncio.get_running_loop().create_future())

    async def _read_forever(self) -> None:
        while True:
            if not self._waiters:
                await asyncio.sleep(0.05)
                continue
            try:
                messages = await asyncio.to_thread(
                    self._sqs.receive_message,
                    QueueUrl=self._queue_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=1,
                    VisibilityTimeout=RECEIVE_VISIBILITY_S,
                    MessageAttributeNames=["All"],
                )
                await self._route(messages.get("Messages", []))
            except (BotoCoreError, ClientError) as exc:
                log.warning("response queue read failed, retrying: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:  # a bug must not stop the answers of every waiting request
                log.exception("routing responses failed; going on")
                await asyncio.sleep(1.0)

    async def _route(self, messages: list[dict[str, Any]]) -> None:
        finished: list[dict[str, Any]] = []  # handed over, duplicates, and junk nobody can ever claim
        unclaimed: list[dict[str, Any]] = []
        for message in messages:
            try:
                (finished if self._route_one(message) else unclaimed).append(message)
            except (AttributeError, KeyError, TypeError, ValueError):  # a message of an unexpected structure
                log.exception("response %s could not be routed; dropping it", message.get("MessageId"))
                finished.append(message)
        # Deletes first: they must happen within RECEIVE_VISIBILITY_S, or a handed-over answer shows up again.
        if finished:
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(finished)]
            try:
                await asyncio.to_thread(self._sqs.delete_message_batch, QueueUrl=self._queue_url, Entries=entries)
            except (BotoCoreError, ClientError) as exc:
                log.warning("could not delete %d routed answers: %s", len(finished), exc)
        if unclaimed:
            hide = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": UNCLAIMED_VISIBILITY_S}
                for i, m in enumerate(unclaimed)
            ]
            with contextlib.suppress(BotoCoreError, ClientError):
                await asyncio.to_thread(
                    self._sqs.change_message_visibility_batch, QueueUrl=self._queue_url, Entries=hide
                )

    def _route_one(self, message: dict[str, Any]) -> bool:
        """Hand ``message`` to its waiter. True: delete it; False: leave it for someone else."""
        attribute = (message.get("MessageAttributes") or {}).get(KEY_ATTRIBUTE) or {}
        correlation_id = attribute.get("StringValue") if attribute.get("DataType") == "String" else None
        body = message.get("Body")
        if not correlation_id or not isinstance(body, str) or not well_formed_response(body):
            log.warning(
                "dropping a malformed response %s (correlation id %r, body %r)",
                message.get("MessageId"),
                correlation_id,
                body[:80] if isinstance(body, str) else body,
            )
            return True
        future = self._waiters.get(correlation_id)
        if future is None:
            if correlation_id in self._abandoned:
                log.info("dropping a late answer for %s: its request gave up", correlation_id)
                return True
            return False  # another web tier's answer (or one from before this replica started): not ours
        stem = self._stems.get(correlation_id)
        if stem is not None and not well_formed_response(body, stem):
            log.warning("dropping a response for %s that names %r, not %r", correlation_id, body[:80], stem)
            return True
        if not future.done():
            future.set_result(body)
        return True  # handed over now, or a duplicate of an answer already handed over
