"""Queue mechanics against the moto server, without Ray: dead-lettering, backoff, graceful drain.

The recognition step is replaced by small stand-ins (an unavailable service, a slow fixed answer): these
tests are about what the consumer does with messages, not about faces (tests/test_sqs_bridge.py covers the
real path end to end).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import uuid
from typing import Any

import pytest
from botocore.config import Config

from aws_stack.clients import AwsClients, aws_client
from aws_stack.stack import QueueUrls, StackConfig, provision, status
from serve_app.queue_mode.contract import output_key, parse_response, response_body, well_formed_response
from sqs_bridge.consumer import ConsumerConfig, RequestConsumer, backoff_seconds
from sqs_bridge.processor import Answer, Outcome, RequestMessage, RequestProcessor, TransientError
from tests.waiting import wait_until_async

pytestmark = pytest.mark.aws


def make_stack(endpoint: str, max_receive_count: int) -> tuple[StackConfig, AwsClients, QueueUrls]:
    config = StackConfig(
        prefix=f"c{uuid.uuid4().hex[:8]}",
        endpoint=endpoint,
        max_receive_count=max_receive_count,
        visibility_timeout_s=5,
    )
    clients = AwsClients.for_stack(config)
    return config, clients, provision(config, clients)


def send(clients: AwsClients, config: StackConfig, urls: QueueUrls, key: str, data: bytes) -> None:
    clients.s3.put_object(Bucket=config.in_bucket, Key=key, Body=data)
    clients.sqs.send_message(
        QueueUrl=urls.requests,
        MessageBody=key,
        MessageAttributes={"key": {"DataType": "String", "StringValue": str(uuid.uuid4())}},
    )


def consumer(clients: AwsClients, config: StackConfig, urls: QueueUrls, recognize: object) -> RequestConsumer:
    return RequestConsumer(
        clients.sqs,
        urls.requests,
        _processor(clients, config, urls, recognize),
        ConsumerConfig(max_in_flight=8, wait_time_s=1, visibility_timeout_s=5, backoff_base_s=1),
    )


@pytest.mark.parametrize(("count", "expected"), [(1, 2), (2, 4), (3, 8), (20, 300)])
def test_backoff_grows_and_is_capped(count: int, expected: int) -> None:
    assert backoff_seconds(count, base=2, cap=300) == expected


def test_contract_formats() -> None:
    assert output_key("test_000.jpg") == "test_000"
    assert output_key("photos/a.b.png") == "photos/a.b"
    assert response_body("test_000", "Paul") == "('test_000', 'Paul')"
    assert response_body("test_000", "Paul").strip("()").split(", ") == ["'test_000'", "'Paul'"]
    assert parse_response(response_body("Smith, John", "O'Brien")) == ("Smith, John", "O'Brien")
    assert parse_response("(test_000, Paul)") == ("test_000", "Paul")


def test_transient_failures_end_in_the_dead_letter_queue(moto_endpoint: str) -> None:
    config, clients, urls = make_stack(moto_endpoint, max_receive_count=2)
    send(clients, config, urls, "test_000.jpg", b"any bytes")
    attempts = 0

    async def unavailable_recognizer(_: bytes) -> Answer:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("recognizer unavailable")

    async def scenario() -> None:
        stop = asyncio.Event()
        loop = asyncio.create_task(consumer(clients, config, urls, unavailable_recognizer).run(stop))
        await wait_until_async(
            lambda: status(config, clients)["dead_letter_queue"]["visible"] == 1, 60, "nothing reached the DLQ"
        )
        stop.set()
        await asyncio.wait_for(loop, 30)

    asyncio.run(scenario())
    report = status(config, clients)
    assert report["dead_letter_queue"]["visible"] == 1
    assert report["request_queue"] == {"visible": 0, "in_flight": 0}
    assert report["out_bucket_objects"] == 0 and report["response_queue"]["visible"] == 0
    assert attempts == 2  # maxReceiveCount deliveries, each retried through visibility, then redriven


def test_stop_drains_messages_already_received(moto_endpoint: str) -> None:
    config, clients, urls = make_stack(moto_endpoint, max_receive_count=5)
    for i in range(5):
        send(clients, config, urls, f"test_{i:03d}.jpg", b"bytes")

    async def slow_fixed_answer(_: bytes) -> Answer:
        await asyncio.sleep(2.0)
        return Answer("Paul")

    async def scenario() -> RequestConsumer:
        stop = asyncio.Event()
        worker = consumer(clients, config, urls, slow_fixed_answer)
        loop = asyncio.create_task(worker.run(stop))
        await wait_until_async(lambda: worker.in_flight == 5, 10, "the consumer did not take all five")
        stop.set()  # all five are held and mid-work: they must still be answered and acknowledged
        await asyncio.wait_for(loop, 60)
        return worker

    worker = asyncio.run(scenario())
    assert worker.counts["answered"] == 5
    report = status(config, clients)
    assert report["request_queue"] == {"visible": 0, "in_flight": 0}
    assert report["out_bucket_objects"] == 5 and report["response_queue"]["visible"] == 5


def test_only_answers_of_the_contract_are_well_formed() -> None:
    assert well_formed_response("('test_000', 'Paul')")
    assert well_formed_response(response_body("a b", "O'Brien"), stem="a b")
    assert not well_formed_response("('test_000', 'Paul')", stem="test_001")
    for junk in ("", "not a tuple", "('a', 'b', 'c')", "('a', 1)", "__import__('os')", "(" * 500, "x" * 10_000):
        assert not well_formed_response(junk), junk


def test_same_name_uploads_are_each_read_at_the_version_their_request_names(moto_endpoint: str) -> None:
    """Ten uploads all called photo.jpg, each request naming its version: every answer is about its own bytes."""
    config, clients, urls = make_stack(moto_endpoint, max_receive_count=5)
    expected: dict[str, str] = {}
    for i in range(10):
        put = clients.s3.put_object(Bucket=config.in_bucket, Key="photo.jpg", Body=f"person-{i}".encode())
        correlation = str(uuid.uuid4())
        clients.sqs.send_message(
            QueueUrl=urls.requests,
            MessageBody="photo.jpg",
            MessageAttributes={
                "key": {"DataType": "String", "StringValue": correlation},
                "version-id": {"DataType": "String", "StringValue": put["VersionId"]},
            },
        )
        expected[correlation] = repr(("photo", f"person-{i}"))
    # A legacy producer sends no version: it gets the newest upload, as before.
    clients.sqs.send_message(
        QueueUrl=urls.requests,
        MessageBody="photo.jpg",
        MessageAttributes={"key": {"DataType": "String", "StringValue": "legacy"}},
    )
    expected["legacy"] = repr(("photo", "person-9"))

    async def names_the_bytes(data: bytes) -> Answer:
        return Answer(data.decode())

    async def scenario() -> None:
        stop = asyncio.Event()
        worker = consumer(clients, config, urls, names_the_bytes)
        loop = asyncio.create_task(worker.run(stop))
        await wait_until_async(lambda: worker.counts["answered"] == 11, 60, "not every request was answered")
        stop.set()
        await asyncio.wait_for(loop, 30)

    asyncio.run(scenario())
    answers: dict[str, str] = {}
    while len(answers) < 11:
        batch = clients.sqs.receive_message(
            QueueUrl=urls.responses, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        ).get("Messages", [])
        assert batch, f"only {len(answers)} responses"
        for message in batch:
            answers[message["MessageAttributes"]["key"]["StringValue"]] = message["Body"]
            clients.sqs.delete_message(QueueUrl=urls.responses, ReceiptHandle=message["ReceiptHandle"])
    assert answers == expected
    # The legacy contract: one output object per name, holding one of the answers; nothing dead-lettered.
    stored = clients.s3.get_object(Bucket=config.out_bucket, Key="photo")["Body"].read().decode()
    assert stored.startswith("person-")
    assert status(config, clients)["dead_letter_queue"]["visible"] == 0


def test_provisioning_versions_the_input_bucket_and_keeps_an_operators_lifecycle_rules(moto_endpoint: str) -> None:
    config, clients, _ = make_stack(moto_endpoint, max_receive_count=5)
    assert clients.s3.get_bucket_versioning(Bucket=config.in_bucket)["Status"] == "Enabled"
    theirs = {"ID": "operator-rule", "Status": "Enabled", "Filter": {"Prefix": "tmp/"}, "Expiration": {"Days": 3}}
    rules = clients.s3.get_bucket_lifecycle_configuration(Bucket=config.in_bucket)["Rules"]
    clients.s3.put_bucket_lifecycle_configuration(
        Bucket=config.in_bucket, LifecycleConfiguration={"Rules": [*rules, theirs]}
    )
    provision(config, clients)  # again: ours replaced in place, theirs kept
    rules = {r["ID"]: r for r in clients.s3.get_bucket_lifecycle_configuration(Bucket=config.in_bucket)["Rules"]}
    assert set(rules) == {"operator-rule", "facerec-expire-overwritten-uploads"}
    # Overwritten uploads outlive a request redriven from the dead-letter queue (14 days).
    assert rules["facerec-expire-overwritten-uploads"]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 15


def _endpoint_that_swallows_requests() -> tuple[socket.socket, threading.Thread]:
    """A server that reads each request and resets the connection: the call may have been carried out, no reply."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)

    def swallow() -> None:
        while server.fileno() != -1:
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(5)
            with contextlib.suppress(OSError):
                connection.recv(65536)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            connection.close()

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    return server, thread


def test_a_response_send_that_may_have_reached_sqs_is_counted_a_refused_one_is_not(moto_endpoint: str) -> None:
    """Every duplicate response comes from a send whose outcome is unknown: the processor counts exactly those."""
    config, clients, _ = make_stack(moto_endpoint, max_receive_count=5)
    server, thread = _endpoint_that_swallows_requests()
    refused = socket.create_server(("127.0.0.1", 0))
    refused_port = int(refused.getsockname()[1])
    refused.close()  # nothing listens there now
    quick = Config(retries={"total_max_attempts": 3, "mode": "standard"}, connect_timeout=2, read_timeout=5)

    async def answer(_: bytes) -> Answer:
        return Answer("Paul")

    def attempt(sqs_endpoint: str) -> RequestProcessor:
        sqs = aws_client("sqs", region=config.region, endpoint=sqs_endpoint, config=quick)
        processor = RequestProcessor(
            s3=clients.s3,
            sqs=sqs,
            in_bucket=config.in_bucket,
            out_bucket=config.out_bucket,
            response_queue_url=f"{sqs_endpoint}/123456789012/responses",
            recognize=answer,
        )
        key = f"{uuid.uuid4().hex}.jpg"
        clients.s3.put_object(Bucket=config.in_bucket, Key=key, Body=b"photo")
        message = RequestMessage("m-1", "receipt", key, str(uuid.uuid4()), 1)
        with pytest.raises(TransientError):  # not answered: the message stays for redelivery
            asyncio.run(processor.process(message))
        return processor

    try:
        swallowed = attempt(f"http://127.0.0.1:{server.getsockname()[1]}")
        assert swallowed.uncertain_sends == 3  # every attempt reached the endpoint and lost its reply
        assert attempt(f"http://127.0.0.1:{refused_port}").uncertain_sends == 0
    finally:
        server.close()
        thread.join(5)


def _processor(
    clients: AwsClients, config: StackConfig, urls: QueueUrls, recognize: object, max_input_bytes: int = 1 << 20
) -> Any:
    return RequestProcessor(
        s3=clients.s3,
        sqs=clients.sqs,
        in_bucket=config.in_bucket,
        out_bucket=config.out_bucket,
        response_queue_url=urls.responses,
        recognize=recognize,  # type: ignore[arg-type]
        max_input_bytes=max_input_bytes,
    )


def test_an_input_over_the_size_limit_is_answered_error_and_never_recognised(moto_endpoint: str) -> None:
    config, clients, urls = make_stack(moto_endpoint, max_receive_count=5)
    calls = 0

    async def recognise(_: bytes) -> Answer:
        nonlocal calls
        calls += 1
        return Answer("Paul")

    processor = _processor(clients, config, urls, recognise, max_input_bytes=1000)
    clients.s3.put_object(Bucket=config.in_bucket, Key="huge.jpg", Body=b"x" * 5000)
    clients.s3.put_object(Bucket=config.in_bucket, Key="small.jpg", Body=b"x" * 1000)
    big, small = (RequestMessage(f"m-{k}", "r", f"{k}.jpg", str(uuid.uuid4()), 1) for k in ("huge", "small"))
    assert asyncio.run(processor.process(big)) is Outcome.POISON
    assert asyncio.run(processor.process(small)) is Outcome.ANSWERED  # exactly the limit is allowed
    assert calls == 1
    stored = clients.s3.get_object(Bucket=config.out_bucket, Key="huge")
    assert stored["Body"].read() == b"Error" and stored["Metadata"]["error-reason"] == "file_too_large"
    responses = clients.sqs.receive_message(
        QueueUrl=urls.responses, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
    )["Messages"]
    by_body = {m["Body"]: m["MessageAttributes"] for m in responses}
    assert by_body["('huge', 'Error')"]["status"]["StringValue"] == "error"
    assert by_body["('huge', 'Error')"]["error"]["StringValue"].startswith("file_too_large: ")
    assert by_body["('small', 'Paul')"]["status"]["StringValue"] == "ok"


def test_a_name_answered_before_costs_no_read_of_the_stored_answer(moto_endpoint: str) -> None:
    """The output object is read only to announce again an answer recorded as not sent; a HEAD decides."""
    config, clients, urls = make_stack(moto_endpoint, max_receive_count=5)
    output_reads: list[str] = []

    def count_reads(params: dict[str, Any], **_: Any) -> None:
        if params.get("Bucket") == config.out_bucket:
            output_reads.append(params["Key"])

    clients.s3.meta.events.register("before-parameter-build.s3.GetObject", count_reads)

    async def recognise(_: bytes) -> Answer:
        return Answer("Paul")

    processor = _processor(clients, config, urls, recognise)
    clients.s3.put_object(Bucket=config.in_bucket, Key="test_000.jpg", Body=b"photo")
    first, second = (RequestMessage(f"m-{i}", "r", "test_000.jpg", str(uuid.uuid4()), 1) for i in (1, 2))
    assert asyncio.run(processor.process(first)) is Outcome.ANSWERED
    assert asyncio.run(processor.process(second)) is Outcome.ANSWERED  # another request, same file name
    assert asyncio.run(processor.process(second)) is Outcome.REUSED  # its redelivery: answered and recorded
    assert output_reads == []
    # A redelivery whose answer was stored but not announced (a crash between the two) reads it once, to send it.
    head = clients.s3.head_object(Bucket=config.out_bucket, Key="test_000")
    clients.s3.copy_object(
        Bucket=config.out_bucket,
        Key="test_000",
        CopySource={"Bucket": config.out_bucket, "Key": "test_000"},
        Metadata={**head["Metadata"], "response-sent": "false"},
        MetadataDirective="REPLACE",
    )
    assert asyncio.run(processor.process(second)) is Outcome.REUSED
    assert output_reads == ["test_000"]
