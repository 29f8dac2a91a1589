"""Queue-mode web tier: one reader of the response queue that hands each answer to the request waiting for it.

With several ingress replicas each reading the response queue, a replica would receive answers meant for
another's waiters. Instead, one ``ResponseRouter`` replica reads the queue; ingress replicas register a
correlation id (``expect``) before they send the request, then ``wait`` for it through a handle. An answer is
deleted from the queue only once it is handed to its waiter; one nobody here expects (another client's, or one
that arrived after its waiter gave up) is left on the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, queue_urls
from serve_app.deployments.supervision import BackgroundTasks, Supervised

log = logging.getLogger(f"ray.serve.{__name__}")

#: How long an answer nobody here is waiting for stays hidden before SQS offers it again.
UNCLAIMED_VISIBILITY_S = 30


class ResponseRouterDeployment(Supervised):
    def __init__(self, stack: StackConfig) -> None:
        clients = AwsClients.for_stack(stack)
        self._sqs = clients.sqs
        self._queue_url = queue_urls(stack, clients).responses
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self._background = BackgroundTasks()
        self._background.start("response reader", self._read_forever())

    async def expect(self, correlation_id: str) -> None:
        """Register interest before the request is sent, so its answer can never arrive unclaimed."""
        self._waiters.setdefault(correlation_id, asyncio.get_running_loop().create_future())

    async def wait(self, correlation_id: str, timeout_s: float) -> str | None:
        """The response body for ``correlation_id``, or ``None`` after ``timeout_s`` seconds."""
        future = self._waiters.setdefault(correlation_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout_s)
        except TimeoutError:
            return None
        finally:
            self._waiters.pop(correlation_id, None)

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
                    MessageAttributeNames=["All"],
                )
            except (BotoCoreError, ClientError) as exc:
                log.warning("response queue read failed, retrying: %s", exc)
                await asyncio.sleep(1.0)
                continue
            await self._route(messages.get("Messages", []))

    async def _route(self, messages: list[dict[str, Any]]) -> None:
        claimed: list[dict[str, Any]] = []
        for message in messages:
            correlation_id = ((message.get("MessageAttributes") or {}).get("key") or {}).get("StringValue")
            future = self._waiters.get(correlation_id or "")
            if future is not None and not future.done():
                future.set_result(message["Body"])
                claimed.append(message)
            elif future is not None:
                claimed.append(message)  # a duplicate answer for a request already answered
            else:
                with contextlib.suppress(BotoCoreError, ClientError):
                    await asyncio.to_thread(
                        self._sqs.change_message_visibility,
                        QueueUrl=self._queue_url,
                        ReceiptHandle=message["ReceiptHandle"],
                        VisibilityTimeout=UNCLAIMED_VISIBILITY_S,
                    )
        if claimed:
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(claimed)]
            try:
                await asyncio.to_thread(self._sqs.delete_message_batch, QueueUrl=self._queue_url, Entries=entries)
            except (BotoCoreError, ClientError) as exc:
                log.warning("could not delete %d routed answers: %s", len(claimed), exc)


def parse_response(body: str) -> tuple[str, str]:
    """``('test_000', 'Paul')`` -> ``("test_000", "Paul")``, the way old web tiers split it."""
    stem, _, name = body.strip().strip("()").partition(", ")
    return stem.strip("'\""), name.strip("'\"")
