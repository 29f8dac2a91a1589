"""`make run QUEUE_MODE=1`: the whole local stack, with POST / answered through the local S3 + SQS and the bridge."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import requests

from aws_stack.stack import StackConfig
from tests.local_stack import running_local_stack
from tests.queue_helpers import ENROLLED, person_photos
from tests.waiting import wait_until

pytestmark = [pytest.mark.serve, pytest.mark.aws]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def queue_mode_service(tmp_path: Path) -> Iterator[tuple[str, StackConfig, Path]]:
    # Its own moto server, and no API key (enrolment here is open, as in a plain `make run`).
    with running_local_stack(tmp_path, "--queue-mode") as (ports, log_path):
        stack = StackConfig.model_validate_json((tmp_path / "run" / "aws.json").read_text())
        yield f"http://127.0.0.1:{ports['http']}", stack, log_path


def test_queue_mode_answers_post_through_the_local_queues(
    queue_mode_service: tuple[str, StackConfig, Path],
) -> None:
    url, stack, log_path = queue_mode_service
    assert "legacy POST / through S3 + SQS" in log_path.read_text()
    person = ENROLLED[0]
    enrolled = person_photos(person)[0]
    answer = requests.post(
        f"{url}/v1/people/{person}/faces", files={"images": (enrolled.name, enrolled.read_bytes())}, timeout=300
    )
    assert answer.status_code == 201, answer.text
    # The bridge's requests carry no revision to wait for: let the replicas' next gallery poll pick it up.
    revision = answer.json()["revision"]
    wait_until(
        lambda: requests.get(f"{url}/healthz", timeout=30).json()["gallery_revision"] >= revision,
        60,
        "the Recognizer never saw the enrolment",
    )
    probe = person_photos(person)[1]
    answer = requests.post(f"{url}/", files={"inputFile": ("probe_001.jpg", probe.read_bytes())}, timeout=300)
    assert (answer.status_code, answer.text) == (200, f"probe_001:{person}")
    # It went the legacy way: the upload in the input bucket, the answer in the output bucket.
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.endpoint,
        region_name=stack.region,
        aws_access_key_id="moto-local",
        aws_secret_access_key="moto-local",
    )
    assert s3.get_object(Bucket=stack.in_bucket, Key="probe_001.jpg")["Body"].read() == probe.read_bytes()
    assert s3.get_object(Bucket=stack.out_bucket, Key="probe_001")["Body"].read().decode() == person
    # The console's Status screen reads the bridge's queues through the public API.
    queue = requests.get(f"{url}/v1/status", timeout=60).json()["queue"]
    assert queue is not None and set(queue) == {"waiting", "in_flight", "dead_letters"}
    assert all(isinstance(count, int) and count >= 0 for count in queue.values())
