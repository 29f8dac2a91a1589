"""Helpers for tests that speak the queue contract: known photos, a stack, enqueue, collect, check, enrol."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from aws_stack.clients import AwsClients
from aws_stack.stack import QueueUrls, StackConfig, status
from tests.serve_fixtures import API_KEY

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
        seen += receive_responses(stack)
    return seen


def receive_responses(stack: Stack) -> list[dict[str, Any]]:
    """One receive (up to 10 response messages, 1 s long poll); what it gets is deleted."""
    batch = stack.clients.sqs.receive_message(
        QueueUrl=stack.urls.responses, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
    ).get("Messages", [])
    if batch:
        stack.clients.sqs.delete_message_batch(
            QueueUrl=stack.urls.responses,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)],
        )
    return [
        {
            "body": message["Body"],
            "key": message["MessageAttributes"]["key"]["StringValue"],
            "status": message["MessageAttributes"]["status"]["StringValue"],
            "error": message["MessageAttributes"].get("error", {}).get("StringValue"),
        }
        for message in batch
    ]


def output(stack: Stack, stem: str) -> str:
    return str(stack.clients.s3.get_object(Bucket=stack.config.out_bucket, Key=stem)["Body"].read().decode())


def request_queue_empty(stack: Stack) -> bool:
    requests = status(stack.config, stack.clients)["request_queue"]
    return bool(requests["visible"] == 0 and requests["in_flight"] == 0)


def sweep_responses(stack: Stack) -> list[dict[str, Any]]:
    """Whatever responses are left on the queue (read and deleted): late copies after every request is done."""
    left: list[dict[str, Any]] = []
    while batch := receive_responses(stack):
        left += batch
    return left


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


def enrol(url: str, people: list[str] = ENROLLED, timeout: float = 120) -> None:
    """Enrol each person's first photo through the HTTP API."""
    for person in people:
        photo = person_photos(person)[0]
        response = requests.post(
            f"{url}/v1/people/{person}/faces",
            files={"images": (photo.name, photo.read_bytes())},
            headers={"X-API-Key": API_KEY},
            timeout=timeout,
        )
        assert response.status_code == 201, response.text


def moto_target_group(moto_endpoint: str) -> tuple[Any, str]:
    """An ELBv2 target group of type `ip` in moto, and its ELBv2 client. Its VPC and the addresses the tests
    register are loopback ones: moto only records them, and nothing ever connects to a target."""
    from aws_stack.clients import aws_client

    ec2 = aws_client("ec2", region="us-east-1", endpoint=moto_endpoint)
    vpc = ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
    elbv2 = aws_client("elbv2", region="us-east-1", endpoint=moto_endpoint)
    created = elbv2.create_target_group(
        Name=f"tg-{uuid.uuid4().hex[:8]}", Protocol="HTTP", Port=8001, VpcId=vpc, TargetType="ip"
    )
    return elbv2, str(created["TargetGroups"][0]["TargetGroupArn"])
