"""One request message, from receipt to acknowledgement: the queue contract, at least once, never twice.

Order of effects for a message whose body is an input key (``test_000.jpg``) and whose ``key`` attribute is a
correlation id:

1. read the input object (its bytes and ETag);
2. if the output object already holds a result for this correlation id and this input ETag, reuse it (a
   redelivery after a crash never produces a second, different result);
3. otherwise recognise the photo and write the output object ``test_000`` = ``Paul`` (metadata: correlation id,
   input ETag, status);
4. send the response ``('test_000', 'Paul')`` with attribute ``key`` = the correlation id, unless the output
   object records that it was already sent; then record it;
5. only then is the request deleted (by the caller).

One duplicate no queue client can rule out: a ``SendMessage`` that SQS carries out but whose reply is lost (the
connection reset mid-call) looks failed, so it is sent again (by botocore's retries or by the redelivery) and the
response arrives twice, identical. A standard queue cannot deduplicate; consumers match responses by correlation
id (the web tier's router hands only the first to its request). The processor counts such uncertain sends
(:attr:`RequestProcessor.uncertain_sends`, the ``facerec_bridge_uncertain_sends`` metric): every duplicate response
comes from one of them.

A poison message (missing object, not an image, ...) gets an error result (``Error`` in the output object, a
response with attribute ``status`` = ``error`` and the reason) and is deleted. Anything else is transient: the
caller leaves the message on the queue with a growing visibility timeout, and after ``maxReceiveCount``
deliveries SQS moves it to the dead-letter queue.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, ConnectionClosedError, ReadTimeoutError

from serve_app.queue_mode.contract import (
    KEY_ATTRIBUTE,
    REPLY_TO_ATTRIBUTE,
    VERSION_ATTRIBUTE,
    output_key,
    response_body,
)

log = logging.getLogger(f"ray.serve.{__name__}")

T = TypeVar("T")

ERROR_NAME = "Error"
UNKNOWN_NAME = "Unknown"
MAX_KEY_LENGTH = 512
#: Failures after which a request may have been carried out although no reply came back (a refused connection,
#: by contrast, never reached SQS).
UNCERTAIN_FAILURES = (ConnectionClosedError, ReadTimeoutError)


class TransientError(RuntimeError):
    """Worth retrying: a dependency (S3, SQS, the Recognizer) failed, not the input."""


class UnusableInputError(ValueError):
    """The input itself is unusable (not an image, truncated, ...): answering again would not help."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RequestMessage:
    message_id: str
    receipt_handle: str
    body: str
    correlation_id: str
    receive_count: int
    #: The upload this request is about, when the producer named one (two uploads may share a key).
    version_id: str | None = None
    #: Where the producer waits for the answer (copied onto the response; see the contract).
    reply_to: str | None = None

    @classmethod
    def from_sqs(cls, message: dict[str, Any]) -> RequestMessage:
        attributes = message.get("MessageAttributes") or {}
        return cls(
            message_id=message["MessageId"],
            receipt_handle=message["ReceiptHandle"],
            body=message.get("Body", ""),
            # A request without a correlation id still gets an answer; its message id stands in.
            correlation_id=_string_attribute(attributes, KEY_ATTRIBUTE) or message["MessageId"],
            receive_count=int((message.get("Attributes") or {}).get("ApproximateReceiveCount", "1")),
            version_id=_string_attribute(attributes, VERSION_ATTRIBUTE),
            reply_to=_string_attribute(attributes, REPLY_TO_ATTRIBUTE),
        )


@dataclass(frozen=True)
class Answer:
    """What the service says about one photo: a name (or ``Unknown``), or an error for a poison input."""

    name: str
    error_reason: str | None = None
    error_message: str | None = None

    @property
    def status(self) -> str:
        return "ok" if self.error_reason is None else "error"


class Outcome(Enum):
    ANSWERED = "answered"
    REUSED = "reused"  # a redelivery: the stored result was re-announced or already complete
    POISON = "poison"


#: Recognise one photo: returns its :class:`Answer`, or raises :class:`UnusableInputError` for an unusable image;
#: any other exception counts as transient.
Recognize = Callable[[bytes], Awaitable[Answer]]


@dataclass
class RequestProcessor:
    s3: Any
    sqs: Any
    in_bucket: str
    out_bucket: str
    response_queue_url: str
    recognize: Recognize
    #: How long to keep trying to record a response already sent (an S3 outage) before leaving it to redelivery;
    #: under the bridge's graceful-shutdown timeout (90 s), so a replica that is stopping finishes the attempt.
    record_budget_s: float = 60.0
    #: The largest input object read, as for HTTP uploads: a larger one gets an ``Error`` answer (``file_too_large``)
    #: and no more than this many bytes of it are ever read.
    max_input_bytes: int = 10 * 1024 * 1024
    #: Threads for the blocking S3 and SQS calls: one per message that may be in progress.
    io_threads: int = 32
    #: One lock per correlation id being handled, with how many copies hold or wait for it.
    _active: dict[str, tuple[asyncio.Lock, int]] = field(default_factory=dict)
    _uncertain_sends: int = 0
    _uncertain_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        # Not the event loop's default pool (a few threads per core): that one capped the messages in progress far
        # below ``max_in_flight``, each S3 call waiting for a thread.
        self._threads = ThreadPoolExecutor(self.io_threads, thread_name_prefix="bridge-io")
        # botocore retries a failed call inside send_message; its retry event is the only place that sees each
        # attempt's failure (the calls run on worker threads, hence the lock).
        self.sqs.meta.events.register("needs-retry.sqs.SendMessage", self._note_send_attempt)

    @property
    def uncertain_sends(self) -> int:
        """Responses sent whose outcome was unknown (see the module docstring): the bound on duplicate responses."""
        return self._uncertain_sends

    def _note_send_attempt(self, caught_exception: Exception | None = None, **_: Any) -> None:
        if isinstance(caught_exception, UNCERTAIN_FAILURES):
            with self._uncertain_lock:
                self._uncertain_sends += 1

    async def process(self, message: RequestMessage) -> Outcome:
        """Handle one message up to (not including) its deletion. Raises :class:`TransientError` to retry."""
        # Two copies of one request held at once (SQS may deliver twice) run one after the other, so the second
        # finds the first one's stored result instead of answering again.
        # The entry lives while any copy holds or waits for it: dropped at the first release, a waiting copy
        # would run under a lock that a third copy no longer finds.
        cid = message.correlation_id
        lock, users = self._active.get(cid, (asyncio.Lock(), 0))
        self._active[cid] = (lock, users + 1)
        try:
            async with lock:
                return await self._process(message)
        finally:
            lock, users = self._active[cid]
            if users == 1:
                del self._active[cid]
            else:
                self._active[cid] = (lock, users - 1)

    async def _process(self, message: RequestMessage) -> Outcome:
        key = message.body.strip()
        if not key or len(key) > MAX_KEY_LENGTH or key.endswith("/"):
            return await self._finish(message, key or "(empty)", _poison("bad_request", "the body is not an input key"))
        where = {"VersionId": message.version_id} if message.version_id else {}
        try:
            obj = await self._blocking(self.s3.get_object, Bucket=self.in_bucket, Key=key, **where)
            data = await self._blocking(_read_at_most, obj, self.max_input_bytes)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "NoSuchVersion", "404", "NotFound", "InvalidArgument"):
                version = f" (version {message.version_id})" if message.version_id else ""
                return await self._finish(
                    message, key, _poison("missing_input", f"no object {key}{version} in the input bucket")
                )
            raise TransientError(f"reading {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise TransientError(f"reading {key}: {exc}") from exc
        etag = str(obj.get("ETag", ""))
        if data is None:
            limit = self.max_input_bytes
            return await self._finish(
                message, key, _poison("file_too_large", f"{key} is over the {limit}-byte input limit"), etag
            )

        stored = await self._stored_result(output_key(key), message.correlation_id, etag)
        if stored is not None:
            if stored.get("response-sent") != "true":
                await self._respond(message, output_key(key), stored["answer"])
                await self._mark_sent(output_key(key), stored, stored["etag"])
            return Outcome.REUSED

        try:
            answer = await self.recognize(data)
        except UnusableInputError as exc:
            answer = _poison(exc.reason, str(exc))
        except Exception as exc:
            raise TransientError(f"recognising {key}: {exc}") from exc
        return await self._finish(message, key, answer, etag)

    async def _finish(self, message: RequestMessage, key: str, answer: Answer, etag: str = "") -> Outcome:
        stem = output_key(key)
        metadata = {
            "correlation-id": message.correlation_id,
            "input-etag": etag,
            "status": answer.status,
            "response-sent": "false",
        }
        if answer.error_reason:
            metadata["error-reason"] = answer.error_reason
        written = await self._call(
            self.s3.put_object,
            Bucket=self.out_bucket,
            Key=stem,
            Body=answer.name.encode(),
            ContentType="text/plain; charset=utf-8",
            Metadata=metadata,
        )
        await self._respond(message, stem, answer)
        await self._mark_sent(stem, {**metadata, "answer": answer}, str(written.get("ETag", "")))
        if answer.error_reason:
            log.warning(
                "request %s (%s): %s: %s", message.correlation_id, key, answer.error_reason, answer.error_message
            )
            return Outcome.POISON
        return Outcome.ANSWERED

    async def _respond(self, message: RequestMessage, stem: str, answer: Answer) -> None:
        attributes: dict[str, Any] = {
            KEY_ATTRIBUTE: {"DataType": "String", "StringValue": message.correlation_id},
            "status": {"DataType": "String", "StringValue": answer.status},
        }
        if message.reply_to:
            attributes[REPLY_TO_ATTRIBUTE] = {"DataType": "String", "StringValue": message.reply_to}
        if answer.error_reason:
            attributes["error"] = {
                "DataType": "String",
                "StringValue": f"{answer.error_reason}: {answer.error_message}",
            }
        await self._call(
            self.sqs.send_message,
            QueueUrl=self.response_queue_url,
            MessageBody=response_body(stem, answer.name),
            MessageAttributes=attributes,
        )

    async def _stored_result(self, stem: str, correlation_id: str, input_etag: str) -> dict[str, Any] | None:
        """This request's stored result for this upload (a redelivery), or ``None``.

        A HEAD decides: the answer itself is read only when it must be announced again (recorded as not yet
        sent). An output object of another request for the same file name costs no read.
        """
        try:
            head = await self._blocking(self.s3.head_object, Bucket=self.out_bucket, Key=stem)
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise TransientError(f"checking {stem}: {exc}") from exc
        except BotoCoreError as exc:
            raise TransientError(f"checking {stem}: {exc}") from exc
        metadata = dict(head.get("Metadata", {}))
        if metadata.get("correlation-id") != correlation_id or metadata.get("input-etag") != input_etag:
            return None
        metadata["etag"] = str(head.get("ETag", ""))
        if metadata.get("response-sent") == "true":
            return metadata
        body = await self._call(self.s3.get_object, Bucket=self.out_bucket, Key=stem)
        name = (await self._blocking(body["Body"].read)).decode()
        reason = metadata.get("error-reason")
        metadata["answer"] = Answer(name, reason, reason)
        return metadata

    async def _mark_sent(self, stem: str, metadata: dict[str, Any], etag: str) -> None:
        """Record that the response went out (in the output object's metadata), trying until it is recorded.

        The response is out already: giving up here would leave the message to be redelivered and answered a
        second time. So an outage is waited out (up to ``record_budget_s``); a redelivered copy of the message
        meanwhile waits for this one (the per-request lock, within this consumer) and then finds the record.
        """
        # Rewrite the object's metadata in place: the output bucket keeps exactly one object per request. Only
        # if it is still the object this request wrote: another request for the same file name may have written
        # its own answer there since (the legacy contract has one output object per name), and it keeps it.
        fields = {k: str(v) for k, v in metadata.items() if k not in ("answer", "etag")}
        fields["response-sent"] = "true"
        deadline = time.monotonic() + self.record_budget_s
        for attempt in itertools.count():
            try:
                await self._blocking(
                    self.s3.copy_object,
                    Bucket=self.out_bucket,
                    Key=stem,
                    CopySource={"Bucket": self.out_bucket, "Key": stem},
                    CopySourceIfMatch=etag,
                    Metadata=fields,
                    MetadataDirective="REPLACE",
                    ContentType="text/plain; charset=utf-8",
                )
                return
            except ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "412"):
                    log.info("output %s was rewritten by another request for the same name; left as it is", stem)
                    return
                error: Exception = exc
            except BotoCoreError as exc:
                error = exc
            pause = min(5.0, 0.5 * 2**attempt)
            if time.monotonic() + pause > deadline:
                raise TransientError(f"recording that {stem}'s response was sent: {error}") from error
            log.warning("recording %s's response failed (%s); trying again in %.1f s", stem, error, pause)
            await asyncio.sleep(pause)

    async def _blocking(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking boto3 call on the processor's own threads (as many as messages may be held at once)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(function, *args, **kwargs))

    async def _call(self, function: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return await self._blocking(function, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise TransientError(f"{getattr(function, '__name__', 'AWS call')}: {exc}") from exc


def _read_at_most(obj: dict[str, Any], limit: int) -> bytes | None:
    """The object's bytes, or ``None`` (and the connection closed) when it is over ``limit``."""
    body = obj["Body"]
    try:
        if int(obj.get("ContentLength") or 0) > limit:
            return None
        data: bytes = body.read(limit + 1)  # a missing or wrong length must not make a read unbounded
        return None if len(data) > limit else data
    finally:
        body.close()


def _poison(reason: str, message: str) -> Answer:
    return Answer(ERROR_NAME, reason, message)


def _string_attribute(attributes: dict[str, Any], name: str) -> str | None:
    value = (attributes.get(name) or {}).get("StringValue")
    return str(value) if value else None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
