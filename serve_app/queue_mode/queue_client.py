"""The legacy web tier's way through the queue: upload, enqueue, await the answer for this request only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, queue_urls
from serve_app.queue_mode.contract import VERSION_ATTRIBUTE, output_key, parse_response

log = logging.getLogger(f"ray.serve.{__name__}")

#: Pause before asking a replaced response router again.
ROUTER_RETRY_S = 0.5


class QueueTimeoutError(TimeoutError):
    """No answer came back through the response queue in time."""


class QueueUnavailableError(RuntimeError):
    """S3 or SQS refused the request: nothing was enqueued, the client may try again."""


@dataclass
class QueueClient:
    """Used by the ingress when ``queue_mode`` is on; the ResponseRouter delivers the answers."""

    s3: Any
    sqs: Any
    in_bucket: str
    request_queue_url: str
    router: DeploymentHandle[Any]
    timeout_s: float

    @classmethod
    def for_stack(cls, stack: StackConfig, router: DeploymentHandle[Any], timeout_s: float) -> QueueClient:
        clients = AwsClients.for_stack(stack)
        return cls(clients.s3, clients.sqs, stack.in_bucket, queue_urls(stack, clients).requests, router, timeout_s)

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
        attributes = {"key": {"DataType": "String", "StringValue": correlation_id}}
        # Another client may upload the same file name a moment later: the bridge reads the version written here.
        version = put.get("VersionId")
        if version and version != "null":
            attributes[VERSION_ATTRIBUTE] = {"DataType": "String", "StringValue": str(version)}
        deadline = time.monotonic() + self.timeout_s
        await self._call_router(lambda: self.router.expect.remote(correlation_id, output_key(filename)), deadline)
        try:
            await asyncio.to_thread(
                self.sqs.send_message,
                QueueUrl=self.request_queue_url,
                MessageBody=filename,
                MessageAttributes=attributes,
            )
        except (BotoCoreError, ClientError) as error:
            await self._forget(correlation_id)
            raise QueueUnavailableError(f"could not enqueue {filename}: {error}") from error
        body = await self._wait(correlation_id, filename, deadline)
        if body is None:
            raise QueueTimeoutError(f"no answer for {filename} within {self.timeout_s:.0f} s")
        return parse_response(body)[1]

    async def _wait(self, correlation_id: str, filename: str, deadline: float) -> str | None:
        """The answer's body; a router that dies meanwhile is replaced by Serve, and the wait goes on there.

        The answer is only deleted from the response queue once it is handed over, so the new router replica
        finds it again (after the dead one's receive times out) for the waiter that registers anew.
        """
        stem = output_key(filename)
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                body: str | None = await self.router.wait.remote(correlation_id, remaining, stem)
                return body
            except (RayActorError, ActorUnavailableError, RayServeException) as error:
                log.warning(
                    "response router lost while waiting for %s (%s): waiting on its replacement", filename, error
                )
                await asyncio.sleep(ROUTER_RETRY_S)
        return None

    async def _forget(self, correlation_id: str) -> None:
        with contextlib.suppress(RayActorError, ActorUnavailableError, RayServeException):
            await self.router.forget.remote(correlation_id)

    async def _call_router(self, call: Callable[[], Awaitable[object]], deadline: float) -> None:
        while True:
            try:
                await call()
                return
            except (RayActorError, ActorUnavailableError, RayServeException):
                if time.monotonic() + ROUTER_RETRY_S > deadline:
                    raise
                await asyncio.sleep(ROUTER_RETRY_S)
