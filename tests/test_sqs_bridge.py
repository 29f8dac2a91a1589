"""The queue contract end to end: moto server (S3 + SQS), real Ray Serve, real models.

Producers put photos in the input bucket and keys on the request queue, exactly as the legacy web tier did;
the bridge answers through the output bucket and the response queue.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from sqs_bridge.stack import AwsClients, QueueUrls, StackConfig, provision, status
from tests.serve_fixtures import API_KEY, ServeCluster, healthy, wait_until

from .conftest import LFW

ENROLLED = ["Ricardo_Lagos", "Paul_Wolfowitz", "Jennifer_Lopez", "Zhu_Rongji"]
STRANGERS = ["Aaron_Sorkin/Aaron_Sorkin_0001.jpg", "AJ_Cook/AJ_Cook_0001.jpg", "Aaron_Guiel/Aaron_Guiel_0001.jpg"]


def person_photos(person: str) -> list[Path]:
    return sorted((LFW / "images" / person).glob("*.jpg"))


def pool() -> list[tuple[bytes, str]]:
    """Photos with known answers: other photos of enrolled people, and people nobody enrolled."""
    photos = [(photo.read_bytes(), p) for p in ENROLLED for photo in person_photos(p)[1:4]]
    photos += [((LFW / "images" / s).read_bytes(), "Unknown") for s in STRANGERS]
    return photos


@dataclass
class Stack:
    config: StackConfig
    clients: AwsClients
    urls: QueueUrls


@pytest.fixture(scope="module")
def recognition(serve_cluster: ServeCluster, moto_endpoint: str) -> Iterator[str]:
    """The recognition app (gallery in the moto S3) with the four people enrolled, through HTTP."""
    from ray import serve

    from serve_app.app import build_app
    from serve_app.settings import RecognitionSettings

    gallery = StackConfig(prefix="bridge-gallery", endpoint=moto_endpoint)
    clients = AwsClients.for_stack(gallery)
    provision(gallery, clients)
    app = build_app(
        {
            "gallery_uri": gallery.gallery_uri,
            "recognition": RecognitionSettings().model_dump(),
            "recognizer": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 2.0},
            "max_batch_size": 16,
        }
    )
    serve.run(app, name="facerec", route_prefix="/", blocking=False)
    url = serve_cluster.url
    wait_until(lambda: healthy(url), 240, "recognition app did not start")
    for person in ENROLLED:
        photo = person_photos(person)[0]
        response = requests.post(
            f"{url}/v1/people/{person}/faces",
            files={"images": (photo.name, photo.read_bytes())},
            headers={"X-API-Key": API_KEY},
            timeout=120,
        )
        assert response.status_code == 201, response.text
    # The pool's answers, through HTTP: the queue path must give the same ones.
    for data, expected in pool():
        answer = requests.post(f"{url}/", files={"inputFile": ("p.jpg", data)}, timeout=120).text
        assert answer == f"p:{expected}"
    yield url
    serve.delete("facerec")


@pytest.fixture
def stack(recognition: str, moto_endpoint: str) -> Iterator[Stack]:
    """A fresh, empty stack per test (its own prefix) with the bridge consuming it."""
    from ray import serve

    from sqs_bridge.deployment import build_bridge

    config = StackConfig(
        prefix=f"t{uuid.uuid4().hex[:8]}", endpoint=moto_endpoint, visibility_timeout_s=10, max_receive_count=10
    )
    clients = AwsClients.for_stack(config)
    urls = provision(config, clients)
    serve.run(
        build_bridge({"stack": config.model_dump(), "max_in_flight": 32, "wait_time_s": 1}),
        name="bridge",
        route_prefix=None,
    )
    yield Stack(config, clients, urls)
    serve.delete("bridge")


def enqueue(stack: Stack, items: list[tuple[str, bytes]]) -> dict[str, str]:
    """Upload each photo and send its request like the legacy web tier; returns correlation id -> key."""
    ids: dict[str, str] = {}

    def one(item: tuple[str, bytes]) -> None:
        key, data = item
        stack.clients.s3.put_object(Bucket=stack.config.in_bucket, Key=key, Body=data)
        correlation = str(uuid.uuid4())
        stack.clients.sqs.send_message(
            QueueUrl=stack.urls.requests,
            MessageBody=key,
            MessageAttributes={"key": {"DataType": "String", "StringValue": correlation}},
        )
        ids[correlation] = key

    with ThreadPoolExecutor(max_workers=16) as workers:
        list(workers.map(one, items))
    return ids


def collect_responses(stack: Stack, expected: int, timeout: float) -> list[dict[str, Any]]:
    """Read (and delete) response messages until ``expected`` distinct correlation ids, or fail at ``timeout``."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len({m["key"] for m in seen}) < expected:
        if time.monotonic() > deadline:
            pytest.fail(f"only {len({m['key'] for m in seen})} of {expected} responses after {timeout:.0f}s")
        batch = stack.clients.sqs.receive_message(
            QueueUrl=stack.urls.responses, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        ).get("Messages", [])
        for message in batch:
            attributes = message["MessageAttributes"]
            seen.append(
                {
                    "body": message["Body"],
                    "key": attributes["key"]["StringValue"],
                    "status": attributes["status"]["StringValue"],
                    "error": attributes.get("error", {}).get("StringValue"),
                }
            )
        if batch:
            stack.clients.sqs.delete_message_batch(
                QueueUrl=stack.urls.responses,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)],
            )
    return seen


def output(stack: Stack, stem: str) -> str:
    return str(stack.clients.s3.get_object(Bucket=stack.config.out_bucket, Key=stem)["Body"].read().decode())


def drained(stack: Stack) -> bool:
    report = status(stack.config, stack.clients)
    queues = (report["request_queue"], report["response_queue"])
    return all(q["visible"] == 0 and q["in_flight"] == 0 for q in queues)


def check_all_answered(
    stack: Stack, ids: dict[str, str], answers: dict[str, str], responses: list[dict[str, Any]]
) -> None:
    by_id = {r["key"]: r for r in responses}
    assert set(by_id) == set(ids)
    for correlation, key in ids.items():
        stem = key.rsplit(".", 1)[0]
        assert by_id[correlation]["body"] == repr((stem, answers[key]))
        assert by_id[correlation]["status"] == "ok"
    report = status(stack.config, stack.clients)
    assert report["out_bucket_objects"] == len(ids) == report["in_bucket_objects"]
    assert report["dead_letter_queue"] == {"visible": 0, "in_flight": 0}


def numbered(count: int) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    photos = pool()
    items, answers = [], {}
    for i in range(count):
        data, expected = photos[i % len(photos)]
        key = f"test_{i:03d}.jpg" if count <= 1000 else f"test_{i:05d}.jpg"
        items.append((key, data))
        answers[key] = expected
    return items, answers


def test_a_thousand_requests_drain_with_correct_answers(stack: Stack) -> None:
    items, answers = numbered(1000)
    ids = enqueue(stack, items)
    responses = collect_responses(stack, 1000, timeout=900)
    assert len(responses) == 1000  # no duplicates without failures
    check_all_answered(stack, ids, answers, responses)
    for key in ("test_000.jpg", "test_014.jpg", "test_999.jpg"):
        assert output(stack, key[:-4]) == answers[key]
    wait_until(lambda: drained(stack), 60, "queues did not drain to 0")


def test_a_message_delivered_twice_gives_one_result(stack: Stack) -> None:
    data, expected = pool()[0]
    stack.clients.s3.put_object(Bucket=stack.config.in_bucket, Key="test_000.jpg", Body=data)
    attributes = {"key": {"DataType": "String", "StringValue": "c0ffee00-0000-4000-8000-000000000001"}}
    for _ in range(2):
        stack.clients.sqs.send_message(
            QueueUrl=stack.urls.requests, MessageBody="test_000.jpg", MessageAttributes=attributes
        )
    (response,) = collect_responses(stack, 1, timeout=120)
    assert response["body"] == repr(("test_000", expected))
    wait_until(lambda: drained(stack), 60, "the duplicate was not consumed")
    extra = stack.clients.sqs.receive_message(QueueUrl=stack.urls.responses, WaitTimeSeconds=2).get("Messages", [])
    assert extra == []  # the second delivery produced no second response
    assert status(stack.config, stack.clients)["out_bucket_objects"] == 1


def test_poison_messages_get_error_results_and_the_loop_goes_on(stack: Stack) -> None:
    s3, sqs = stack.clients.s3, stack.clients.sqs
    s3.put_object(Bucket=stack.config.in_bucket, Key="text_001.jpg", Body=b"this is not a photo")
    s3.put_object(Bucket=stack.config.in_bucket, Key="cut_002.jpg", Body=pool()[0][0][:700])
    good, expected = pool()[3]
    s3.put_object(Bucket=stack.config.in_bucket, Key="good_003.jpg", Body=good)
    keys = {"missing_000.jpg": "missing_input", "text_001.jpg": "not_an_image", "cut_002.jpg": "truncated"}
    for number, key in enumerate([*keys, "good_003.jpg"]):
        sqs.send_message(
            QueueUrl=stack.urls.requests,
            MessageBody=key,
            MessageAttributes={"key": {"DataType": "String", "StringValue": f"id-{number}"}},
        )
    responses = {r["key"]: r for r in collect_responses(stack, 4, timeout=180)}
    for number, (key, reason) in enumerate(keys.items()):
        response = responses[f"id-{number}"]
        assert response["status"] == "error" and response["error"].startswith(reason)
        assert response["body"] == repr((key[:-4], "Error"))
        assert output(stack, key[:-4]) == "Error"
    assert responses["id-3"]["status"] == "ok" and responses["id-3"]["body"] == repr(("good_003", expected))
    wait_until(lambda: drained(stack), 60, "poison messages were not deleted")
    assert status(stack.config, stack.clients)["dead_letter_queue"]["visible"] == 0


def _kill_mid_run(stack: Stack, actor_marker: str) -> None:
    import ray

    items, answers = numbered(1000)
    ids = enqueue(stack, items)
    wait_until(
        lambda: status(stack.config, stack.clients)["out_bucket_objects"] >= 250, 600, "no progress before the kill"
    )
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if actor_marker in a["name"]]
    assert victims, actor_marker
    ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
    responses = collect_responses(stack, 1000, timeout=900)
    duplicates = len(responses) - len({r["key"] for r in responses})
    print(f"\n{actor_marker}: 1000 requests, {len(responses)} responses, {duplicates} duplicate(s)")
    # A duplicate is only possible for a message that was between "response sent" and "recorded" at the kill.
    assert duplicates <= 32
    unique = list({r["key"]: r for r in responses}.values())
    check_all_answered(stack, ids, answers, unique)
    wait_until(lambda: drained(stack), 120, "queues did not drain to 0")


def test_bridge_killed_mid_run_loses_nothing(stack: Stack) -> None:
    _kill_mid_run(stack, "bridge#SqsBridge#")


def test_recognizer_killed_mid_run_loses_nothing(stack: Stack) -> None:
    _kill_mid_run(stack, "facerec#Recognizer#")


def test_status_reports_the_stack(stack: Stack) -> None:
    report = status(stack.config, stack.clients)
    assert report["endpoint"] == stack.config.endpoint
    assert report["request_queue_url"] == stack.urls.requests
    attributes = stack.clients.sqs.get_queue_attributes(QueueUrl=stack.urls.requests, AttributeNames=["All"])[
        "Attributes"
    ]
    assert attributes["MaximumMessageSize"] == "1024"
    redrive = json.loads(attributes["RedrivePolicy"])
    assert int(redrive["maxReceiveCount"]) == 10 and redrive["deadLetterTargetArn"].endswith("-requests-dlq")
    # Provisioning again changes nothing and fails on nothing.
    assert provision(stack.config, stack.clients) == stack.urls
    assert report["in_bucket"] == f"{stack.config.prefix}-input"
