"""HTTP end to end vs the model floor, in one run on one machine.

    .venv/bin/python bench/http_load.py [--concurrency 1 16 100] [--requests 64 192 300]

1. Model floor: detect + embed + match of the same LFW photos in this process, batched (no Ray, no HTTP).
2. The Serve application on 127.0.0.1 (local Ray, local gallery with 20 enrolled people), driven through the
   legacy ``POST /`` at each concurrency level with a bounded number of requests.

Writes ``bench/results/http_load.json`` and ``bench/results/http_load.png`` and prints the JSON. The load
generator shares the machine's cores with the service, so the ratio is a lower bound for a remote client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import requests
import torch

LFW = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lfw-view1" / "images"
RESULTS = Path(__file__).resolve().parent / "results"


def lfw_photos(count: int, skip: int = 0) -> list[tuple[str, bytes]]:
    paths = sorted(LFW.glob("*/*.jpg"))[skip : skip + count]
    return [(p.name, p.read_bytes()) for p in paths]


def model_floor(photos: list[tuple[str, bytes]], batch: int, threads: int) -> float:
    from serve_app.model.gallery import Gallery
    from serve_app.model.pipeline import load_models
    from serve_app.model.recognizer import Recognizer

    torch.set_num_threads(threads)
    models = load_models("facenet-keras-128")
    recognizer = Recognizer(models.detector, models.embedder, Gallery(models.embedder.model_id, models.embedder.dim))
    recognizer.recognize_bytes([data for _, data in photos[:8]])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(photos), batch):
        recognizer.recognize_bytes([data for _, data in photos[start : start + batch]])
    return len(photos) / (time.perf_counter() - started)


async def drive(url: str, photos: list[tuple[str, bytes]], concurrency: int, total: int) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(photos[i % len(photos)])

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while not queue.empty():
            name, data = queue.get_nowait()
            form = aiohttp.FormData()
            form.add_field("inputFile", data, filename=name, content_type="image/jpeg")
            started = time.perf_counter()
            async with session.post(url, data=form) as response:
                body = await response.text()
                if response.status != 200 or ":" not in body:
                    failures += 1
            latencies.append(time.perf_counter() - started)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {
        "concurrency": concurrency,
        "requests": total,
        "failures": failures,
        "seconds": round(elapsed, 2),
        "images_per_s": round(total / elapsed, 2),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": round(1000 * statistics.fmean(latencies), 1),
    }


def cpu_seconds_by_process() -> dict[str, float]:
    """CPU seconds (user + system) used so far by every process on the machine, by a short label."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks
        label = _label(command, int(entry.name))
        used[label] = used.get(label, 0.0) + seconds
    return used


def _label(command: str, pid: int) -> str:
    if pid == os.getpid():
        return "load generator + model floor (this process)"
    if command.startswith("ray::"):
        return command.split()[0].removeprefix("ray::")
    for name in ("raylet", "gcs_server", "dashboard", "moto_server", "log_monitor", "monitor.py"):
        if name in command:
            return name
    return "other"


def cpu_share(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores used by each process group between two snapshots, largest first."""
    cores = {k: (after.get(k, 0.0) - before.get(k, 0.0)) / seconds for k in after}
    return {k: round(v, 3) for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v >= 0.005}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def recognizer_layout(threads: int, replicas: int) -> dict[str, Any]:
    """The app's Recognizer settings for ``replicas`` replicas sharing ``threads`` cores (threads each: the rest)."""
    each = max(1, threads // replicas)
    return {
        "recognition": {"torch_threads": each},
        "recognizer": {
            "min_replicas": replicas,
            "max_replicas": replicas,
            "num_cpus": float(each),
            "max_ongoing_requests": 256,
        },
    }


def start_service(threads: int, gallery_dir: str, enrol: list[tuple[str, bytes]], replicas: int = 1) -> str:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from serve_app.app import build_app

    port = free_port()
    ray.init(address="local", num_cpus=threads + 1, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {
            "gallery_uri": gallery_dir,
            **recognizer_layout(threads, replicas),
            "max_batch_size": 16,
            "batch_wait_timeout_s": 0.02,
        }
    )
    serve.run(app, name="bench", route_prefix="/", logging_config={"enable_access_log": False})
    url = f"http://127.0.0.1:{port}"
    for name, data in enrol:
        person = name.rsplit("_", 1)[0]
        requests.post(f"{url}/v1/people/{person}/faces", files={"images": (name, data)}, timeout=300)
    return url


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["http"]
    xs = [r["concurrency"] for r in levels]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    left.bar([str(x) for x in xs], [r["images_per_s"] for r in levels], color="tab:blue", label="HTTP POST /")
    left.axhline(result["model_floor_images_per_s"], color="black", linestyle="--", label="model floor (batched)")
    left.set_xlabel("concurrent clients")
    left.set_ylabel("images / s")
    left.legend(fontsize=8)
    for key, style in (("p50_ms", "-o"), ("p95_ms", "-s"), ("p99_ms", "-^")):
        right.plot(xs, [r[key] for r in levels], style, label=key.split("_")[0])
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("latency (ms)")
    right.legend(fontsize=8)
    figure.suptitle(f"HTTP vs model floor ({result['machine']})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 100])
    parser.add_argument("--requests", type=int, nargs="+", default=[48, 160, 300])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2, help="Recognizer replicas sharing --threads cores")
    args = parser.parse_args()
    photos = lfw_photos(200, skip=100)
    floor = model_floor(photos, batch=16, threads=args.threads)
    with tempfile.TemporaryDirectory() as gallery_dir:
        url = start_service(args.threads, gallery_dir, lfw_photos(20, skip=0), args.replicas)
        levels = []
        asyncio.run(drive(f"{url}/", photos, 4, 16))  # warm-up
        for concurrency, total in zip(args.concurrency, args.requests, strict=True):
            # Where the two cores go during each level: which process used how many cores.
            before, started = cpu_seconds_by_process(), time.perf_counter()
            levels.append(asyncio.run(drive(f"{url}/", photos, concurrency, total)))
            levels[-1]["cores_used_by"] = cpu_share(before, cpu_seconds_by_process(), time.perf_counter() - started)
            print(json.dumps(levels[-1]), flush=True)
    result = {
        "benchmark": "http_load",
        "model_floor_images_per_s": round(floor, 2),
        "http": levels,
        "http_over_floor": {str(r["concurrency"]): round(r["images_per_s"] / floor, 3) for r in levels},
        "recognizer_replicas": args.replicas,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "http_load.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "http_load.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
