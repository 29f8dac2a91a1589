"""The legacy web tier's way through the queue: upload, enqueue, await the answer for this request only."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, queue_urls
from serve_app.queue_mode.response_router import parse_response


class QueueTimeoutError(TimeoutError):
    """No answer came back through the response queue in time."""


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
        """The main face's name for ``filename``, answered by the bridge through the queues."""
        correlation_id = str(uuid.uuid4())
        await asyncio.to_thread(self.s3.put_object, Bucket=self.in_bucket, Key=filename, Body=data)
        await self.router.expect.remote(correlation_id)
        await asyncio.to_thread(
            self.sqs.send_message,
            QueueUrl=self.request_queue_url,
            MessageBody=filename,
            MessageAttributes={"key": {"DataType": "String", "StringValue": correlation_id}},
        )
        body = await self.router.wait.remote(correlation_id, self.timeout_s)
        if body is None:
            raise QueueTimeoutError(f"no answer for {filename} within {self.timeout_s:.0f} s")
        return parse_response(body)[1]
