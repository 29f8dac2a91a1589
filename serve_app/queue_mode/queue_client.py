"""The legacy web tier's way through the queue: upload, enqueue, await the answer for this request only.

Each ingress replica has its own answer inbox (:mod:`serve_app.queue_mode.answer_inbox`), a Ray actor on the
replica's node that it starts and that dies with it; requests name the inbox in their ``reply-to`` attribute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from ray.exceptions import RayError

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, queue_urls
from serve_app.queue_mode.answer_inbox import INBOX_NAMESPACE, AnswerInbox
from serve_app.queue_mode.contract import REPLY_TO_ATTRIBUTE, VERSION_ATTRIBUTE, output_key, parse_response

log = logging.getLogger(f"ray.serve.{__name__}")

#: Pause before asking a restarted inbox again.
INBOX_RETRY_S = 0.5
#: Calls an inbox can take at once: one per waiting request.
INBOX_CONCURRENCY = 100_000


class QueueTimeoutError(TimeoutError):
    """No answer came back through the response queue in time."""


class QueueUnavailableError(RuntimeError):
    """S3 or SQS refused the request: nothing was enqueued, the client may try again."""


def start_inbox(stack: StackConfig, name: str) -> Any:
    """This replica's inbox, on this node, owned by this process (it ends with it); one already there is reused."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(AnswerInbox).options(
        name=name,
        namespace=INBOX_NAMESPACE,
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=INBOX_CONCURRENCY,
        max_restarts=0,
        # A call or two per request: no task events (Serve turns them off for its own actors too), or the GCS on
        # the head would record every one.
        enable_task_events=False,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    )
    return actor.remote(stack, name)


@dataclass
class QueueClient:
    """Used by the ingress when ``queue_mode`` is on; its inbox receives the answers."""

    s3: Any
    sqs: Any
    in_bucket: str
    request_queue_url: str
    stack: StackConfig
    inbox_name: str
    timeout_s: float
    _inbox: Any = field(default=None, init=False)

    @classmethod
    def for_stack(cls, stack: StackConfig, inbox_name: str, timeout_s: float) -> QueueClient:
        clients = AwsClients.for_stack(stack)
        urls = queue_urls(stack, clients)
        return cls(clients.s3, clients.sqs, stack.in_bucket, urls.requests, stack, inbox_name, timeout_s)

    def inbox(self) -> Any:
        if self._inbox is None:
            self._inbox = start_inbox(self.stack, self.inbox_name)
        return self._inbox

    async def recognize(self, filename: str, data: bytes) -> str:
        """The main face's name for ``filename``, answered by the bridge through the queues.

        Raises :class:`QueueUnavailableError` when S3 or SQS refuse the request (nothing was enqueued) and
        :class:`QueueTimeoutError` when no answer came in time.
        """
        correlation_id = str(uuid.uuid4())
        try:
            put = await asyncio.to_thread(self.s3.put_object, Bucket=self.in_bucket, Key=filename, Body=data)
        except (BotoCoreError, ClientError) as error:
            raise QueueUnavailableError(f"could not upload {filename}: {error}") from error
        attributes = {
            "key": {"DataType": "String", "StringValue": correlation_id},
            REPLY_TO_ATTRIBUTE: {"DataType": "String", "StringValue": self.inbox_name},
        }
        # Another client may upload the same file name a moment later: the bridge reads the version written here.
        version = put.get("VersionId")
        if version and version != "null":
            attributes[VERSION_ATTRIBUTE] = {"DataType": "String", "StringValue": str(version)}
        deadline = time.monotonic() + self.timeout_s
        try:
            await asyncio.to_thread(
                self.sqs.send_message,
                QueueUrl=self.request_queue_url,
                MessageBody=filename,
                MessageAttributes=attributes,
            )
        except (BotoCoreError, ClientError) as error:
            raise QueueUnavailableError(f"could not enqueue {filename}: {error}") from error
        try:
            body = await self._wait(correlation_id, filename, deadline)
        except asyncio.CancelledError:
            # The client went away: its answer, when it comes, is nobody's (and the inbox stops waiting for it).
            with contextlib.suppress(RayError):
                self.inbox().forget.remote(correlation_id)
            raise
        if body is None:
            raise QueueTimeoutError(f"no answer for {filename} within {self.timeout_s:.0f} s")
        return parse_response(body)[1]

    async def _wait(self, correlation_id: str, filename: str, deadline: float) -> str | None:
        """The answer's body; an inbox that dies meanwhile is started again, and the wait goes on there.

        An answer is only deleted from the response queue once it is handed over, so the new inbox finds it again
        (after the dead one's receive times out); answers read by other inboxes meanwhile are kept for it.
        """
        stem = output_key(filename)
        while (remaining := deadline - time.monotonic()) > 0:
            inbox = self.inbox()
            try:
                body: str | None = await inbox.wait.remote(correlation_id, remaining, stem)
                return body
            except RayError as error:
                # Died, unreachable, or could not be placed (its node is going away): start it again and go on
                # waiting; if this replica's node is the one going, the client's connection goes with it and the
                # client sends again.
                log.warning("answer inbox lost while waiting for %s (%s): starting it again", filename, error)
                if self._inbox is inbox:
                    # Only the handle that failed: the waits that fail with it learn of it one by one, and one that
                    # dropped the inbox already started again would drop its only owning handle, and Ray would end
                    # the new inbox as out of scope under every request waiting on it.
                    self._inbox = None
                await asyncio.sleep(INBOX_RETRY_S)
        return None
