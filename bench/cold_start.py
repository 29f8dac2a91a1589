"""Cold start: seconds from a Recognizer replica's start to its first answer.

    .venv/bin/python bench/cold_start.py [--threads 2]

1. In a fresh Python process, what a replica does when it starts: import torch and the model code, load the
   detector and the embedder (weights from the local cache), then the first recognition of an LFW photo, and a
   second one for comparison (the first pays for kernel selection and allocation).
2. Through Serve on 127.0.0.1: ``ray.init``, then the application deployed and its first ``POST /`` answered;
   then, with Ray already up, the application deleted and deployed again (a new replica: the cost a scale-out
   pays once its node is there) until its first answer.
Writes ``bench/results/cold_start.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from http_load import free_port, lfw_photos
from machine import describe, results_dir

RESULTS = results_dir()

#: Runs in a fresh interpreter: every figure is that process's own clock.
REPLICA_STEPS = """
import json, sys, time
started = time.perf_counter()
import torch
from serve_app.model.gallery import Gallery
from serve_app.settings import load_models
from serve_app.model.recognizer import Recognizer
from serve_app.settings import RecognitionConfig
imported = time.perf_counter()
torch.set_num_threads(int(sys.argv[2]))
models = load_models(RecognitionConfig())  # what `make run` ships
loaded = time.perf_counter()
gallery = Gallery(models.embedder.model_id, models.embedder.dim)
recognizer = Recognizer(models.detector, models.embedder, gallery, threshold=models.threshold_rule)
data = open(sys.argv[1], "rb").read()
recognizer.recognize_bytes([data])
first = time.perf_counter()
recognizer.recognize_bytes([data])
second = time.perf_counter()
print(json.dumps({
    "import_s": round(imported - started, 2),
    "load_models_s": round(loaded - imported, 2),
    "first_recognition_s": round(first - loaded, 3),
    "second_recognition_s": round(second - first, 3),
    "start_to_first_answer_s": round(first - started, 2),
}))
"""


def in_process(photo: Path, threads: int) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, "-c", REPLICA_STEPS, str(photo), str(threads)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def first_answer(url: str, data: bytes, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = requests.post(url, files={"inputFile": ("probe.jpg", data)}, timeout=60)
            if response.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no answer from {url} within {timeout:.0f}s")


def through_serve(data: bytes, threads: int) -> dict[str, Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from serve_app.app import AppArgs, build_app

    port = free_port()
    started = time.perf_counter()
    ray.init(address="local", num_cpus=threads + 1, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ray_up = time.perf_counter()
    url = f"http://127.0.0.1:{port}/"
    timings: dict[str, Any] = {"ray_init_and_serve_start_s": round(ray_up - started, 2)}
    try:
        with tempfile.TemporaryDirectory() as gallery:
            args: dict[str, object] = {
                "gallery_uri": gallery,
                "recognition": {"torch_threads": threads},
                "recognizer": {"min_replicas": 1, "max_replicas": 1, "num_cpus": float(threads)},
            }
            for attempt in ("first_deploy", "new_replica_with_ray_up"):
                deployed = time.perf_counter()
                serve.run(build_app(AppArgs.model_validate(args)), name="cold", route_prefix="/", blocking=False)
                first_answer(url, data)
                answered = time.perf_counter()
                requests.post(url, files={"inputFile": ("probe.jpg", data)}, timeout=60)
                timings[f"{attempt}_to_first_answer_s"] = round(answered - deployed, 2)
                timings[f"{attempt}_second_request_s"] = round(time.perf_counter() - answered, 3)
                serve.delete("cold")
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    name, data = lfw_photos(1, skip=0)[0]
    with tempfile.NamedTemporaryFile(suffix=".jpg") as photo:
        photo.write(data)
        photo.flush()
        replica_process = in_process(Path(photo.name), args.threads)
    print(json.dumps({"replica_process": replica_process}), flush=True)
    serve_timings = through_serve(data, args.threads)
    result = {
        "benchmark": "cold_start",
        "photo": name,
        "replica_process": replica_process,
        "serve": serve_timings,
        "machine": describe(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cold_start.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
