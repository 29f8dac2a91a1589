"""Queue-mode web tier: each ingress replica's answer inbox, and the routing of every answer an inbox reads.

With several ingress replicas, each reading the response queue would receive answers meant for another's requests.
So every ingress replica owns an inbox: a plain Ray actor on its own node, named after the replica, that lives and
dies with the replica's process. A request names its inbox in the ``reply-to`` message attribute and the bridge
copies that attribute onto the answer. An inbox reads the response queue while requests wait on it, and hands each
answer it reads over at once: to its own waiter, or straight to the inbox the answer names (one actor call, then
the message is deleted). Reading thus grows with the ingress replicas (one per worker node on the cluster) and no
single process, on the head or anywhere, reads every answer.

An answer is deleted only once it is handed over. One that names no inbox and that nobody here waits for (another
web tier's, an older bridge's) is left on the queue for whoever does. The reader survives anything the queue holds:
a message without a correlation id, or whose body is not an answer of the contract (``('stem', 'Name')``), can
never be claimed and is logged and deleted; a malformed body carrying a waiting request's id is dropped and the
request keeps waiting for its real answer. An inbox that dies is started again by its replica under the same
name; the answers it had received reappear after ``RECEIVE_VISIBILITY_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from serve_app.queue_mode.contract import KEY_ATTRIBUTE, REPLY_TO_ATTRIBUTE, well_formed_response

log = logging.getLogger(f"ray.serve.{__name__}")

#: The Ray namespace of the inboxes (their names are the replicas' ids, unique in the cluster).
INBOX_NAMESPACE = "facerec-inboxes"
#: How long an answer nobody here is waiting for stays hidden before SQS offers it again.
UNCLAIMED_VISIBILITY_S = 30
#: How long an answer for an inbox that cannot be reached (restarting) stays hidden before it is tried again.
UNREACHABLE_VISIBILITY_S = 5
#: After this many receives an answer whose inbox is still gone is dropped: its replica, and the client's
#: connection with it, are gone (about a minute of tries).
UNREACHABLE_MAX_RECEIVES = 12
#: How long a received answer stays hidden while it is handed over: if the inbox dies holding it, it shows again.
RECEIVE_VISIBILITY_S = 5
#: How long an ended wait's later answers (late, duplicated, or back after a failed delete) are recognised as such.
ENDED_MEMORY_S = 3600.0
#: An answer may arrive before its request's wait is registered (it is sent first): kept this long.
EARLY_ANSWER_S = 120.0
EARLY_ANSWERS_MAX = 100_000


def inbox_name(replica_id: str) -> str:
    return f"inbox-{replica_id}"


class Route(Enum):
    """What to do with one answer read from the response queue."""

    DONE = "done"  # handed to a waiter here, a duplicate, or junk nobody can ever claim: delete it
    FORWARD = "forward"  # another inbox's: hand it over there, then delete it
    LEAVE = "leave"  # nobody here wants it and it names nobody: leave it for whoever does


@dataclass
class Waiting:
    """The requests one inbox holds, and the answers it can tell apart (pure logic: no Ray, no AWS)."""

    name: str
    clock: Any = time.monotonic
    _waiters: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    _stems: dict[str, str] = field(default_factory=dict)
    _ended: OrderedDict[str, float] = field(default_factory=OrderedDict)
    _early: OrderedDict[str, tuple[float, str]] = field(default_factory=OrderedDict)

    @property
    def has_waiters(self) -> bool:
        return bool(self._waiters)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def register(self, correlation_id: str, stem: str | None) -> asyncio.Future[str]:
        if stem is not None:
            self._stems[correlation_id] = stem
        future = self._waiters.setdefault(correlation_id, asyncio.get_running_loop().create_future())
        early = self._early.pop(correlation_id, None)
        if early is not None and not future.done():
            self.accept(correlation_id, early[1])
        return future

    def release(self, correlation_id: str, answered: bool) -> None:
        """The wait ended, answered or not: any copy of its answer that comes later is nobody's (a duplicate, an
        answer whose delete failed and that came back, the late answer of a request that gave up)."""
        self._waiters.pop(correlation_id, None)
        self._stems.pop(correlation_id, None)
        now = self.clock()
        self._ended[correlation_id] = now
        while self._ended and next(iter(self._ended.values())) < now - ENDED_MEMORY_S:
            self._ended.popitem(last=False)

    def accept(self, correlation_id: str, body: str) -> bool:
        """An answer for a request of this inbox (read here or handed over by another inbox): True once it is
        taken care of (handed over, kept for a wait about to start, or known to be nobody's)."""
        future = self._waiters.get(correlation_id)
        if future is None:
            if correlation_id not in self._ended:
                self._keep_early(correlation_id, body)
            return True
        stem = self._stems.get(correlation_id)
        if stem is not None and not well_formed_response(body, stem):
            log.warning("dropping a response for %s that names %r, not %r", correlation_id, body[:80], stem)
            return True
        if not future.done():
            future.set_result(body)
        return True  # handed over now, or a duplicate of an answer already handed over

    def _keep_early(self, correlation_id: str, body: str) -> None:
        now = self.clock()
        self._early[correlation_id] = (now, body)
        while self._early and (
            len(self._early) > EARLY_ANSWERS_MAX or next(iter(self._early.values()))[0] < now - EARLY_ANSWER_S
        ):
            self._early.popitem(last=False)

    def route(self, message: dict[str, Any]) -> tuple[Route, str | None]:
        """Where ``message`` goes: (DONE | LEAVE, None) or (FORWARD, the inbox it names)."""
        attributes = message.get("MessageAttributes") or {}
        key = attributes.get(KEY_ATTRIBUTE) or {}
        correlation_id = key.get("StringValue") if key.get("DataType") == "String" else None
        body = message.get("Body")
        if not correlation_id or not isinstance(body, str) or not well_formed_response(body):
            log.warning(
                "dropping a malformed response %s (correlation id %r, body %r)",
                message.get("MessageId"),
                correlation_id,
                body[:80] if isinstance(body, str) else body,
            )
            return Route.DONE, None
        reply = attributes.get(REPLY_TO_ATTRIBUTE) or {}
        reply_to = reply.get("StringValue") if reply.get("DataType") == "String" else None
        if reply_to and reply_to != self.name:
            return Route.FORWARD, reply_to
        if reply_to == self.name or correlation_id in self._waiters or correlation_id in self._ended:
            self.accept(correlation_id, body)
            return Route.DONE, None
        return Route.LEAVE, None  # another web tier's answer (or one from before this inbox started)


class AnswerInbox:
    """The Ray actor (async): ``wait`` for an answer; ``deliver`` is how other inboxes hand one over."""

    def __init__(self, stack: Any, name: str) -> None:
        from aws_stack.clients import AwsClients
        from aws_stack.stack import queue_urls

        clients = AwsClients.for_stack(stack)
        self._sqs = clients.sqs
        self._queue_url = queue_urls(stack, clients).responses
        self._waiting = Waiting(name)
        self._inboxes: dict[str, Any] = {}
        self._reader: asyncio.Task[None] | None = None
        #: Answers read here, and of those: handed to another inbox; answers handed over by other inboxes.
        self.counts = {"read": 0, "forwarded": 0, "delivered_by_others": 0, "delete_failed": 0}

    async def wait(self, correlation_id: str, timeout_s: float, stem: str | None = None) -> str | None:
        """The response body for ``correlation_id``, or ``None`` after ``timeout_s`` seconds."""
        future = self._waiting.register(correlation_id, stem)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_while_waited_on())
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout_s)
        except TimeoutError:
            return None
        finally:
            # Timed out, or the caller went away (the call was cancelled): its answer, when it comes, is nobody's.
            self._waiting.release(correlation_id, answered=future.done())

    async def forget(self, correlation_id: str) -> None:
        """The request was never sent (or its client gave up): its answer, if any comes, is nobody's."""
        self._waiting.release(correlation_id, answered=False)

    async def deliver(self, correlation_id: str, body: str) -> bool:
        """An answer for one of this inbox's requests, read by another inbox."""
        self.counts["delivered_by_others"] += 1
        return self._waiting.accept(correlation_id, body)

    async def stats(self) -> dict[str, int]:
        """Answers read, forwarded and handed over by others so far, and the requests waiting now."""
        return {**self.counts, "waiting": self._waiting.waiting}

    async def _read_while_waited_on(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while self._waiting.has_waiters:
            try:
                response = await asyncio.to_thread(
                    self._sqs.receive_message,
                    QueueUrl=self._queue_url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=1,
                    VisibilityTimeout=RECEIVE_VISIBILITY_S,
                    MessageAttributeNames=["All"],
                    AttributeNames=["ApproximateReceiveCount"],
                )
                await self._handle(response.get("Messages", []))
            except (BotoCoreError, ClientError) as exc:
                log.warning("response queue read failed, retrying: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:  # a bug must not stop the answers of every waiting request
                log.exception("routing responses failed; going on")
                await asyncio.sleep(1.0)

    async def _handle(self, messages: list[dict[str, Any]]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        done: list[dict[str, Any]] = []
        hide: list[tuple[dict[str, Any], int]] = []
        forwards: list[tuple[dict[str, Any], str]] = []
        self.counts["read"] += len(messages)
        for message in messages:
            try:
                route, target = self._waiting.route(message)
            except (AttributeError, KeyError, TypeError, ValueError):  # a message of an unexpected structure
                log.exception("response %s could not be routed; dropping it", message.get("MessageId"))
                route, target = Route.DONE, None
            if route is Route.FORWARD and target is not None:
                forwards.append((message, target))
            elif route is Route.DONE:
                done.append(message)
            else:
                hide.append((message, UNCLAIMED_VISIBILITY_S))
        handed = await asyncio.gather(*(self._forward(message, target) for message, target in forwards))
        for (message, _), taken in zip(forwards, handed, strict=True):
            if taken:
                self.counts["forwarded"] += 1
                done.append(message)
            else:
                hide.append((message, UNREACHABLE_VISIBILITY_S))
        # Deletes first: they must happen within RECEIVE_VISIBILITY_S, or a handed-over answer shows up again.
        # One that fails is noticed: counted and logged, and the answer, when it shows up again, is known as
        # that of an ended wait and deleted then.
        if done:
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)]
            try:
                result = await asyncio.to_thread(
                    self._sqs.delete_message_batch, QueueUrl=self._queue_url, Entries=entries
                )
                failed = len(result.get("Failed", []))
            except (BotoCoreError, ClientError) as exc:
                failed = len(done)
                log.warning("could not delete %d routed answers: %s", len(done), exc)
            if failed:
                self.counts["delete_failed"] += failed
                log.warning("%d routed answers were not deleted: they come back and are deleted then", failed)
        if hide:
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": seconds}
                for i, (m, seconds) in enumerate(hide)
            ]
            with contextlib.suppress(BotoCoreError, ClientError):
                await asyncio.to_thread(
                    self._sqs.change_message_visibility_batch, QueueUrl=self._queue_url, Entries=entries
                )

    async def _forward(self, message: dict[str, Any], target: str) -> bool:
        """Hand ``message`` to the inbox ``target``; False: try again later (the inbox is restarting)."""
        import ray
        from ray.exceptions import RayError

        correlation_id = message["MessageAttributes"][KEY_ATTRIBUTE]["StringValue"]
        try:
            inbox = self._inboxes.get(target)
            if inbox is None:
                inbox = self._inboxes[target] = await asyncio.to_thread(
                    ray.get_actor, target, namespace=INBOX_NAMESPACE
                )
            return bool(await inbox.deliver.remote(correlation_id, message["Body"]))
        except (ValueError, RayError) as exc:
            self._inboxes.pop(target, None)
            receives = int((message.get("Attributes") or {}).get("ApproximateReceiveCount", "1"))
            if receives >= UNREACHABLE_MAX_RECEIVES:
                log.warning("dropping the answer for %s: its inbox %s is gone (%s)", correlation_id, target, exc)
                return True
            return False
