"""Queue-mode web tier: POST / through S3 + SQS + the bridge, with two ingress replicas and 200 clients at once."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, provision, queue_counts, queue_urls, status
from tests.queue_helpers import ENROLLED, enrol, person_photos, pool
from tests.serve_fixtures import ServeCluster, healthy
from tests.waiting import wait_until

pytestmark = [pytest.mark.serve, pytest.mark.aws]


def _app(stack: StackConfig, timeout_s: float) -> Any:
    from serve_app.app import AppArgs, build_app
    from serve_app.settings import RecognitionSettings

    return build_app(
        AppArgs.model_validate(
            {
                "gallery_uri": stack.gallery_uri,
                "recognition": RecognitionSettings().model_dump(),
                "recognizer": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 2.0},
                "ingress_replicas": 2,
                "queue_mode": True,
                "queue_timeout_s": timeout_s,
                "stack": stack.model_dump(),
            }
        )
    )


@pytest.fixture(scope="module")
def queued(serve_cluster: ServeCluster, moto_endpoint: str) -> Iterator[tuple[str, StackConfig, AwsClients]]:
    from ray import serve

    from sqs_bridge.deployment import build_bridge

    stack = StackConfig(prefix=f"q{uuid.uuid4().hex[:8]}", endpoint=moto_endpoint, visibility_timeout_s=20)
    clients = AwsClients.for_stack(stack)
    provision(stack, clients)
    serve.run(_app(stack, 240), name="facerec", route_prefix="/", blocking=False)
    url = serve_cluster.url
    wait_until(lambda: healthy(url), 240, "queue-mode app did not start")
    serve.run(build_bridge({"stack": stack.model_dump(), "wait_time_s": 1}), name="bridge", route_prefix=None)
    enrol(url)
    yield url, stack, clients
    serve.delete("bridge")
    serve.delete("facerec")


def test_two_hundred_concurrent_requests_each_get_their_own_answer(
    queued: tuple[str, StackConfig, AwsClients],
) -> None:
    url, stack, clients = queued
    photos = pool()
    jobs = [(f"test_{i:03d}.jpg", *photos[i % len(photos)]) for i in range(200)]

    def post(job: tuple[str, bytes, str]) -> tuple[int, str, str]:
        name, data, expected = job
        response = requests.post(f"{url}/", files={"inputFile": (name, data)}, timeout=600)
        return response.status_code, response.text, f"{name[:-4]}:{expected}"

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=200) as clients_pool:
        results = list(clients_pool.map(post, jobs))
    elapsed = time.monotonic() - started
    print(f"\nqueue mode: 200 concurrent requests answered in {elapsed:.1f} s")
    assert [status_code for status_code, _, _ in results] == [200] * 200
    wrong = [(body, expected) for _, body, expected in results if body != expected]
    assert wrong == []
    report = status(stack, clients)
    assert report["in_bucket_objects"] == 200 and report["out_bucket_objects"] == 200

    def drained() -> bool:
        # The bridge deletes a request just after its answer is out, so allow it a moment.
        report = status(stack, clients)
        return all(report[q] == {"visible": 0, "in_flight": 0} for q in ("request_queue", "response_queue"))

    wait_until(drained, 30, "queues did not drain to 0")


#: Ten people for the same-name test: the module's four enrolled people and six more.
MORE_PEOPLE = ["Colin_Powell", "Donald_Rumsfeld", "Jean_Chretien", "Angelina_Jolie", "Hans_Blix", "Amelie_Mauresmo"]


def _post_all(url: str, jobs: list[tuple[str, bytes, str]], workers: int) -> list[tuple[int, str, str]]:
    """POST / each (file name, photo, expected answer) from ``workers`` clients at once."""

    def post(job: tuple[str, bytes, str]) -> tuple[int, str, str]:
        name, data, expected = job
        response = requests.post(f"{url}/", files={"inputFile": (name, data)}, timeout=600)
        return response.status_code, response.text, expected

    with ThreadPoolExecutor(max_workers=workers) as clients_pool:
        return list(clients_pool.map(post, jobs))


def test_same_name_uploads_at_once_each_get_the_answer_for_their_own_photo(
    queued: tuple[str, StackConfig, AwsClients],
) -> None:
    """100 clients, 10 people, every upload called photo.jpg: each reads back exactly the bytes it uploaded."""
    url, stack, clients = queued
    enrol(url, MORE_PEOPLE)
    people = [*ENROLLED, *MORE_PEOPLE]
    photos = [(person_photos(person)[1].read_bytes(), person) for person in people]
    jobs = [("photo.jpg", data, f"photo:{person}") for data, person in (photos[i % 10] for i in range(100))]
    results = _post_all(url, jobs, workers=100)
    assert [code for code, _, _ in results] == [200] * 100
    wrong = [(body, expected) for _, body, expected in results if body != expected]
    print(f"\nsame-name uploads: 100 sent, {100 - len(wrong)} right, {len(wrong)} wrong")
    assert wrong == []
    versions = clients.s3.list_object_versions(Bucket=stack.in_bucket, Prefix="photo.jpg").get("Versions", [])
    assert len(versions) == 100  # one version per upload, each read by its own request


def test_malformed_messages_on_the_response_queue_do_not_stop_the_inboxes(
    queued: tuple[str, StackConfig, AwsClients],
) -> None:
    url, stack, clients = queued
    responses_url = queue_urls(stack, clients).responses
    junk: list[dict[str, Any]] = [
        {"MessageBody": "not a tuple"},  # no correlation id at all
        {"MessageBody": "('x', 'y')", "MessageAttributes": {"key": {"DataType": "Binary", "BinaryValue": b"\x00"}}},
        {"MessageBody": "x" * 200_000, "MessageAttributes": {"key": {"DataType": "String", "StringValue": ""}}},
        {"MessageBody": "\ufffd(((", "MessageAttributes": {"key": {"DataType": "Number", "StringValue": "7"}}},
        {
            "MessageBody": "('a', 'b', 'c')",
            "MessageAttributes": {"status": {"DataType": "String", "StringValue": "ok"}},
        },
    ]
    stop = threading.Event()

    def inject() -> int:
        sent = 0
        while not stop.is_set():
            clients.sqs.send_message(QueueUrl=responses_url, **junk[sent % len(junk)])
            sent += 1
            stop.wait(0.05)
        return sent

    photos = pool()
    jobs = [(f"junk_{i:03d}.jpg", *photos[i % len(photos)]) for i in range(200)]
    with ThreadPoolExecutor(max_workers=1) as injector:
        injected = injector.submit(inject)
        results = _post_all(url, [(name, data, f"{name[:-4]}:{expected}") for name, data, expected in jobs], 200)
        stop.set()
        count = injected.result()
    right = sum(1 for code, body, expected in results if code == 200 and body == expected)
    print(f"\nmalformed responses: {count} injected during 200 requests, {right} right answers")
    assert count > len(junk)
    assert right == 200
    # Nobody can ever claim them: an inbox drops them as it reads (it reads while a request waits).
    data, expected = photos[0]
    assert _post_all(url, [("last.jpg", data, f"last:{expected}")], 1)[0][:2] == (200, f"last:{expected}")
    wait_until(lambda: queue_counts(clients.sqs, responses_url) == {"visible": 0, "in_flight": 0}, 120, "junk left")


def _waiting(inbox: Any) -> int:
    import ray

    stats: dict[str, int] = ray.get(inbox.stats.remote(), timeout=30)
    return stats["waiting"]


def test_an_answer_inbox_killed_mid_run_loses_no_answer(
    serve_cluster: ServeCluster, queued: tuple[str, StackConfig, AwsClients]
) -> None:
    """One ingress replica's inbox dies while its requests wait: its replica starts it again, and every answer
    (read by the dead inbox, read by the other replica's, or still on the queue) reaches its request."""
    import ray

    from serve_app.queue_mode.answer_inbox import INBOX_NAMESPACE

    url, _, _ = queued
    photos = pool()
    jobs = [(f"kill_{i:03d}.jpg", *photos[i % len(photos)]) for i in range(200)]

    def inboxes() -> list[str]:
        return sorted(
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == INBOX_NAMESPACE
        )

    victim = inboxes()[0]
    actor = ray.get_actor(victim, namespace=INBOX_NAMESPACE)
    victim_id = actor._actor_id
    with ThreadPoolExecutor(max_workers=1) as killer:

        def kill_the_inbox() -> None:
            # Killed while requests wait on it: their answers are on the queue, in the dying inbox, or being
            # handed over to it by the other replica's inbox.
            wait_until(lambda: _waiting(actor) >= 5, 120, "nothing waits")
            ray.kill(actor, no_restart=True)

        killed = killer.submit(kill_the_inbox)
        results = _post_all(url, [(name, data, f"{name[:-4]}:{expected}") for name, data, expected in jobs], 200)
        killed.result()
    # The replica started its inbox again under the same name: a new actor.
    assert victim in inboxes()
    assert ray.get_actor(victim, namespace=INBOX_NAMESPACE)._actor_id != victim_id
    failed = [(code, body) for code, body, _ in results if code != 200]
    wrong = [(body, expected) for code, body, expected in results if code == 200 and body != expected]
    print(f"\ninbox killed: 200 sent, {200 - len(failed)} answered, {len(failed)} failed, {len(wrong)} wrong")
    assert failed == [] and wrong == []


def test_two_ingress_replicas_each_have_an_inbox_and_answers_cross_between_them(
    queued: tuple[str, StackConfig, AwsClients],
) -> None:
    """Every answer names its request's inbox; whichever inbox reads it hands it over there in one call."""
    import ray

    from serve_app.queue_mode.answer_inbox import INBOX_NAMESPACE

    url, _, _ = queued
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == INBOX_NAMESPACE]
    assert len(names) == 2  # one per ingress replica (the module deploys two)
    inboxes = [ray.get_actor(name, namespace=INBOX_NAMESPACE) for name in names]
    before: list[dict[str, int]] = ray.get([inbox.stats.remote() for inbox in inboxes], timeout=30)
    photos = pool()
    jobs = [(f"cross_{i:03d}.jpg", *photos[i % len(photos)]) for i in range(100)]
    results = _post_all(url, [(name, data, f"{name[:-4]}:{expected}") for name, data, expected in jobs], 100)
    assert all(code == 200 and body == expected for code, body, expected in results)
    after: list[dict[str, int]] = ray.get([inbox.stats.remote() for inbox in inboxes], timeout=30)
    forwarded = sum(a["forwarded"] - b["forwarded"] for a, b in zip(after, before, strict=True))
    delivered = sum(a["delivered_by_others"] - b["delivered_by_others"] for a, b in zip(after, before, strict=True))
    print(f"\ninboxes: {forwarded} of 100 answers read by the other replica's inbox and handed over")
    assert forwarded == delivered > 0


def test_no_answer_in_time_is_a_504_not_a_hang(
    serve_cluster: ServeCluster, queued: tuple[str, StackConfig, AwsClients]
) -> None:
    from ray import serve

    url, stack, _ = queued
    serve.delete("bridge")  # nobody consumes the request queue now
    serve.run(_app(stack, 3.0), name="facerec", route_prefix="/")
    data, _ = pool()[0]
    started = time.monotonic()
    response = requests.post(f"{url}/", files={"inputFile": ("late_000.jpg", data)}, timeout=120)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "queue_timeout"
    assert time.monotonic() - started < 60
