"""The queue path end to end next to the HTTP path, same photos, same run, same machine.

    .venv/bin/python bench/queue_throughput.py [--photos 1000] [--concurrency 100]

Starts a moto server (local S3 + SQS), a local Ray with the recognition app and the SQS bridge, then
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
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from http_load import cpu_seconds_by_process, cpu_share, drive, free_port, lfw_photos, model_floor, recognizer_layout

RESULTS = Path(__file__).resolve().parent / "results"


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    time.sleep(3)
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "moto-local",
            "AWS_SECRET_ACCESS_KEY": "moto-local",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    return process, endpoint


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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2, help="Recognizer replicas sharing --threads cores")
    args = parser.parse_args()
    photos = lfw_photos(args.photos, skip=0)
    # The model floor on the same photos, in this process, before Ray starts (bench/http_load.py's measure).
    floor = model_floor(photos[:256], batch=16, threads=args.threads)
    moto, endpoint = start_moto()
    try:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray
        from ray import serve

        from serve_app.app import build_app
        from sqs_bridge.deployment import build_bridge
        from sqs_bridge.stack import AwsClients, StackConfig, provision

        stack = StackConfig(prefix="bench", endpoint=endpoint)
        clients = AwsClients.for_stack(stack)
        urls = provision(stack, clients)
        port = free_port()
        ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False, _node_ip_address="127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as gallery:
            app = build_app(
                {"gallery_uri": gallery, **recognizer_layout(args.threads, args.replicas), "batch_wait_timeout_s": 0.02}
            )
            serve.run(app, name="facerec", route_prefix="/", logging_config={"enable_access_log": False})
            serve.run(
                build_bridge({"stack": stack.model_dump(), "max_in_flight": 64}), name="bridge", route_prefix=None
            )
            url = f"http://127.0.0.1:{port}/"
            asyncio.run(drive(url, photos, 4, 16))  # warm-up
            http = asyncio.run(drive(url, photos, args.concurrency, len(photos)))
            print(json.dumps({"http": http}), flush=True)
            before, started = cpu_seconds_by_process(), time.perf_counter()
            queue = queue_run(stack, clients, urls, photos)
            # Where the cores went: the moto server answers every S3/SQS call in Python on these same cores.
            queue["cores_used_by"] = cpu_share(before, cpu_seconds_by_process(), time.perf_counter() - started)
            print(json.dumps({"queue": queue}), flush=True)
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    result = {
        "benchmark": "queue_throughput",
        "http": http,
        "queue": queue,
        "model_floor_images_per_s": round(floor, 2),
        "queue_over_http": round(queue["images_per_s"] / http["images_per_s"], 3),
        "queue_over_floor": round(queue["images_per_s"] / floor, 3),
        "http_over_floor": round(http["images_per_s"] / floor, 3),
        "recognizer_replicas": args.replicas,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "queue_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
