"""Queue-mode web tier: POST / through S3 + SQS + the bridge, with two ingress replicas and 200 clients at once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, provision, status
from tests.queue_helpers import enrol, pool
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
