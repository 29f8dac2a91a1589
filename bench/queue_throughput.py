"""The queue path end to end next to the HTTP path, same photos, same run, same machine.

    .venv/bin/python bench/queue_throughput.py [--photos 1000] [--concurrency 100]

Starts the service as ``make run`` ships it (``bench/shipped_service.py``: its moto server as the local S3 + SQS,
Ray, the recognition app and the SQS bridge), then
1. HTTP: the photos through ``POST /`` with ``--concurrency`` clients;
2. queue: the photos uploaded to the input bucket and announced on the request queue (like the legacy web
   tier), timed from the first enqueue to the last response read from the response queue.
Writes ``bench/results/queue_throughput.json`` and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from http_load import cpu_seconds_by_process, cpu_share, drive, lfw_photos, model_floor
from machine import describe, results_dir
from shipped_service import shipped_service

RESULTS = results_dir()


def queue_run(stack: Any, clients: Any, urls: Any, photos: list[tuple[str, bytes]]) -> dict[str, Any]:
    started = time.perf_counter()

    def enqueue(item: tuple[int, tuple[str, bytes]]) -> None:
        index, (_, data) = item
        key = f"test_{index:04d}.jpg"
        clients.s3.put_object(Bucket=stack.in_bucket, Key=key, Body=data)
        clients.sqs.send_message(
            QueueUrl=urls.requests,
            MessageBody=key,
            MessageAttributes={"key": {"DataType": "String", "StringValue": str(uuid.uuid4())}},
        )

    with ThreadPoolExecutor(max_workers=16) as workers:
        list(workers.map(enqueue, enumerate(photos)))
    enqueued = time.perf_counter() - started
    answered: set[str] = set()
    while len(answered) < len(photos):
        batch = clients.sqs.receive_message(
            QueueUrl=urls.responses, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        ).get("Messages", [])
        for message in batch:
            answered.add(message["MessageAttributes"]["key"]["StringValue"])
        if batch:
            clients.sqs.delete_message_batch(
                QueueUrl=urls.responses,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)],
            )
        if time.perf_counter() - started > 3600:
            raise TimeoutError(f"only {len(answered)} answers after an hour")
    elapsed = time.perf_counter() - started
    return {
        "photos": len(photos),
        "seconds": round(elapsed, 2),
        "enqueue_seconds": round(enqueued, 2),
        "images_per_s": round(len(photos) / elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    photos = lfw_photos(args.photos, skip=0)
    # The model floor on the same photos, in this process, before the service starts (bench/http_load.py's).
    floor = model_floor(photos[:256], batch=16, threads=cores)
    from aws_stack.clients import AwsClients
    from aws_stack.stack import StackConfig, queue_urls

    with shipped_service() as service:
        stack = StackConfig.model_validate(service.stack)
        clients = AwsClients.for_stack(stack)
        urls = queue_urls(stack, clients)
        asyncio.run(drive(f"{service.url}/", photos, 8, 32))  # warm-up
        http = asyncio.run(drive(f"{service.url}/", photos, args.concurrency, len(photos)))
        print(json.dumps({"http": http}), flush=True)
        before, started = cpu_seconds_by_process(), time.perf_counter()
        queue = queue_run(stack, clients, urls, photos)
        # Where the cores went: the moto server answers every S3/SQS call in Python on these same cores.
        queue["cores_used_by"] = cpu_share(before, cpu_seconds_by_process(), time.perf_counter() - started)
        print(json.dumps({"queue": queue}), flush=True)
    result = {
        "benchmark": "queue_throughput",
        "configuration": "make run (serve_app/config.yaml, auto-sized Recognizer, SQS bridge as shipped)",
        "http": http,
        "queue": queue,
        "model_floor_images_per_s": round(floor, 2),
        "queue_over_http": round(queue["images_per_s"] / http["images_per_s"], 3),
        "queue_over_floor": round(queue["images_per_s"] / floor, 3),
        "http_over_floor": round(http["images_per_s"] / floor, 3),
        "machine": describe(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "queue_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
