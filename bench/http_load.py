"""HTTP end to end vs the model floor, in one run on one machine, with the service ``make run`` ships.

    .venv/bin/python bench/http_load.py [--concurrency 1 16 100] [--requests 48 160 1000] [--small-requests 1000]

Two workloads, each against its own in-process floor:

* ``lfw``: LFW View 1 photos (250x250); 20 people enrolled; the legacy ``POST /`` at each concurrency level.
* ``small``: the legacy system's traffic: LFW View 1 photos downscaled to 64x64 JPEGs, the 8 people with the
  most photos enrolled from two each, 1,000 requests of their other photos at concurrency 100; every answer is
  checked.

1. Model floor: decode + detect + embed + match of the same photos in this process, batched by 16 on every core
   (no Ray, no HTTP), measured before the service starts.
2. The service as ``make run`` starts it (``bench/shipped_service.py``: moto, Ray, ``serve_app/config.yaml`` with
   its ``auto`` sizing and access logs, the SQS bridge), driven through ``POST /``.

Writes ``bench/results/http_load.json`` and ``bench/results/http_load.png`` and prints the JSON. The load
generator shares the machine's cores with the service, so the ratio is a lower bound for a remote client.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import requests
import torch
from machine import describe, label, results_dir
from PIL import Image
from shipped_service import free_port, shipped_service

LFW = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lfw-view1" / "images"
RESULTS = results_dir()
#: The legacy answer for a face matched to nobody (`../shared/notes/contract.md`).
UNKNOWN = "Unknown"

__all__ = ["cpu_seconds_by_process", "cpu_share", "drive", "free_port", "lfw_photos", "model_floor"]


@dataclass(frozen=True)
class Photo:
    """One request: the upload's file name and bytes, and the name the answer must carry (if known)."""

    filename: str
    data: bytes
    expected: str | None = None


def lfw_photos(count: int, skip: int = 0) -> list[tuple[str, bytes]]:
    paths = sorted(LFW.glob("*/*.jpg"))[skip : skip + count]
    return [(p.name, p.read_bytes()) for p in paths]


def thumbnail(data: bytes, side: int = 64) -> bytes:
    """A ``side`` x ``side`` JPEG of the photo, as a legacy client's crops are."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def small_workload(people: int = 8, requests_total: int = 1000, enrolled: int = 2) -> tuple[list[Photo], list[Photo]]:
    """The ``people`` LFW View 1 people with the most photos, at 64x64: ``enrolled`` photos each to enrol, their
    other photos as probes (repeated up to ``requests_total``): a recognition test, not a lookup of enrolled bytes.
    """
    folders = sorted(LFW.iterdir(), key=lambda d: (-len(list(d.glob("*.jpg"))), d.name))[:people]
    enrol: list[Photo] = []
    probes: list[Photo] = []
    for person in folders:
        paths = sorted(person.glob("*.jpg"))
        enrol.extend(Photo(p.name, thumbnail(p.read_bytes()), person.name) for p in paths[:enrolled])
        probes.extend(Photo(p.name, thumbnail(p.read_bytes()), person.name) for p in paths[enrolled:])
    return enrol, [probes[i % len(probes)] for i in range(requests_total)]


def model_floor(photos: Sequence[tuple[str, bytes]] | Sequence[Photo], batch: int, threads: int) -> float:
    """Images per second of decode + detect + embed + match in this process, ``batch`` photos at a time."""
    from serve_app.model.gallery import Gallery
    from serve_app.model.recognizer import Recognizer
    from serve_app.settings import RecognitionConfig, load_models

    payloads = [p.data if isinstance(p, Photo) else p[1] for p in photos]
    torch.set_num_threads(threads)
    shipped = RecognitionConfig()
    models = load_models(shipped)
    gallery = Gallery(models.embedder.model_id, models.embedder.dim)
    recognizer = Recognizer(models.detector, models.embedder, gallery, threshold=models.threshold_rule)
    recognizer.recognize_bytes(payloads[:8])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(payloads), batch):
        recognizer.recognize_bytes(payloads[start : start + batch])
    return len(payloads) / (time.perf_counter() - started)


async def drive(
    url: str, photos: Sequence[tuple[str, bytes]] | Sequence[Photo], concurrency: int, total: int
) -> dict[str, Any]:
    """``total`` legacy ``POST /`` requests, ``concurrency`` at a time; latencies, failures, wrong answers."""
    latencies: list[float] = []
    # An enrolled person answered `Unknown` is a miss; named as somebody else is the error that matters.
    failures = wrong = unknown = 0
    queue: asyncio.Queue[Photo] = asyncio.Queue()
    for i in range(total):
        item = photos[i % len(photos)]
        queue.put_nowait(item if isinstance(item, Photo) else Photo(item[0], item[1]))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures, wrong, unknown
        while not queue.empty():
            photo = queue.get_nowait()
            form = aiohttp.FormData()
            form.add_field("inputFile", photo.data, filename=photo.filename, content_type="image/jpeg")
            started = time.perf_counter()
            async with session.post(url, data=form) as response:
                body = await response.text()
                if response.status != 200 or ":" not in body:
                    failures += 1
                elif photo.expected is not None and body.split(":", 1)[1] != photo.expected:
                    if body.split(":", 1)[1] == UNKNOWN:
                        unknown += 1
                    else:
                        wrong += 1
            latencies.append(time.perf_counter() - started)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    checked = sum(1 for i in range(total) if isinstance(photos[i % len(photos)], Photo))
    return {
        "concurrency": concurrency,
        "requests": total,
        "failures": failures,
        "wrong_answers": wrong if checked else None,
        "unknown_answers": unknown if checked else None,
        "seconds": round(elapsed, 2),
        "images_per_s": round(total / elapsed, 2),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": round(1000 * statistics.fmean(latencies), 1),
    }


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """Every process on the machine: its short label and the CPU seconds (user + system) it has used so far.

    Keyed by pid, not by label: a Ray worker retitles itself with the method it runs (``ray::ServeController``
    becomes ``ray::ServeController.listen_for_change``), so a label can name a different set of processes in two
    snapshots, and a difference taken by label would count a process's whole life as one interval.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        used[int(entry.name)] = (_label(command, int(entry.name)), (int(fields[11]) + int(fields[12])) / ticks)
    return used


def _label(command: str, pid: int) -> str:
    if pid == os.getpid():
        return "load generator + model floor (this process)"
    if command.startswith("ray::"):
        # ray::ServeReplica:facerec:Recognizer.handle_request_with_rejection -> ServeReplica:facerec:Recognizer
        return command.split()[0].removeprefix("ray::").split(".")[0]
    for name in ("raylet", "gcs_server", "dashboard", "moto_server", "log_monitor", "monitor.py"):
        if name in command:
            return name
    return "other"


def cpu_share(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float
) -> dict[str, float]:
    """Cores used by each process group between two snapshots, largest first (a process started in between
    counts from zero)."""
    cores: dict[str, float] = {}
    for pid, (group, used) in after.items():
        earlier = before.get(pid, (group, 0.0))[1]
        cores[group] = cores.get(group, 0.0) + (used - earlier) / seconds
    return {k: round(v, 3) for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v >= 0.005}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lfw, small = result["workloads"]["lfw"], result["workloads"]["small"]
    levels = lfw["http"]
    xs = [r["concurrency"] for r in levels]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    bars = [f"LFW c={x}" for x in xs] + [f"64x64 c={r['concurrency']}" for r in small["http"]]
    values = [r["images_per_s"] for r in levels] + [r["images_per_s"] for r in small["http"]]
    colors = ["tab:blue"] * len(levels) + ["tab:orange"] * len(small["http"])
    left.bar(bars, values, color=colors)
    left.axhline(lfw["model_floor_images_per_s"], color="tab:blue", linestyle="--", label="LFW floor (batched)")
    left.axhline(small["model_floor_images_per_s"], color="tab:orange", linestyle="--", label="64x64 floor")
    left.set_ylabel("images / s")
    left.tick_params(axis="x", labelsize=7)
    left.legend(fontsize=8)
    for key, style in (("p50_ms", "-o"), ("p95_ms", "-s"), ("p99_ms", "-^")):
        right.plot(xs, [r[key] for r in levels], style, label=f"LFW {key.split('_')[0]}")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("concurrent clients")
    right.set_ylabel("latency (ms)")
    right.legend(fontsize=8)
    figure.suptitle(f"HTTP POST / vs model floor, as make run ships ({label(result['machine'])})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run_levels(url: str, photos: Sequence[Photo], levels: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """Each (concurrency, requests) level in turn, with the cores each process used during it."""
    out = []
    for concurrency, total in levels:
        before, started = cpu_seconds_by_process(), time.perf_counter()
        out.append(asyncio.run(drive(f"{url}/", photos, concurrency, total)))
        out[-1]["cores_used_by"] = cpu_share(before, cpu_seconds_by_process(), time.perf_counter() - started)
        print(json.dumps(out[-1]), flush=True)
    return out


def enrol(url: str, photos: Sequence[Photo]) -> list[str]:
    """Enrol each photo under its person's name; the photos the service refuses (several faces) are listed."""
    refused = []
    for photo in photos:
        person = photo.expected or photo.filename.rsplit("_", 1)[0]
        answer = requests.post(
            f"{url}/v1/people/{person}/faces", files={"images": (photo.filename, photo.data)}, timeout=300
        )
        if answer.status_code == 422 and answer.json().get("refused"):
            refused.append(photo.filename)
            continue
        answer.raise_for_status()
    return refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 100])
    # 1,000 at concurrency 100 (10 per client, as in the 64x64 workload): with 300, the ramp-up and the drain
    # were a third of the run.
    parser.add_argument("--requests", type=int, nargs="+", default=[48, 160, 1000])
    parser.add_argument("--small-requests", type=int, default=1000)
    parser.add_argument(
        "--no-in-recognizer",
        action="store_true",
        help="skip the second run at concurrency 100 with `make run INGRESS=in_recognizer`",
    )
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    lfw = [Photo(name, data) for name, data in lfw_photos(200, skip=100)]
    lfw_enrol = [Photo(name, data) for name, data in lfw_photos(20, skip=0)]
    small_enrol, small = small_workload(8, args.small_requests)
    distinct_probes = len({p.filename for p in small})

    # Floors alone on the machine (the same photos, batched by 16, on every core), before and after the service
    # runs; the ratio uses the higher of the two, so a slow moment of a shared machine never flatters HTTP.
    def floors_now() -> dict[str, float]:
        return {
            "lfw": model_floor(lfw, batch=16, threads=cores),
            "small": model_floor(small[:256], batch=16, threads=cores),
        }

    def measure(options: Sequence[str], lfw_levels: list[tuple[int, int]]) -> tuple[dict[str, Any], list[str]]:
        with shipped_service(options=options) as service:
            refused = enrol(service.url, lfw_enrol + small_enrol)
            asyncio.run(drive(f"{service.url}/", lfw, 8, 32))  # warm-up: every replica's first batches
            asyncio.run(drive(f"{service.url}/", small, 8, 32))
            return {
                "lfw": run_levels(service.url, lfw, lfw_levels),
                "small": run_levels(service.url, small, [(100, args.small_requests)]),
            }, refused

    floors_before = floors_now()
    http, refused = measure((), list(zip(args.concurrency, args.requests, strict=True)))
    # The same at 100 concurrent clients with the HTTP routes inside the Recognizer replicas: what the separate
    # ingress (which resends a request whose replica died) costs in throughput.
    in_recognizer = None
    if not args.no_in_recognizer:
        in_recognizer, _ = measure(["--ingress", "in_recognizer"], [(100, args.requests[-1])])
    floors_after = floors_now()
    floors = {name: max(floors_before[name], floors_after[name]) for name in floors_before}
    workloads = {
        name: {
            "model_floor_images_per_s": round(floors[name], 2),
            "model_floor_before_and_after": [round(floors_before[name], 2), round(floors_after[name], 2)],
            "http": http[name],
            "http_over_floor": {str(r["concurrency"]): round(r["images_per_s"] / floors[name], 3) for r in http[name]},
        }
        for name in ("lfw", "small")
    }
    if in_recognizer is not None:
        for name in ("lfw", "small"):
            workloads[name]["http_in_recognizer"] = in_recognizer[name]
            workloads[name]["http_in_recognizer_over_floor"] = {
                str(r["concurrency"]): round(r["images_per_s"] / floors[name], 3) for r in in_recognizer[name]
            }
    workloads["small"]["description"] = (
        f"LFW View 1 at 64x64 JPEG, 8 people enrolled (2 photos each), {distinct_probes} other photos of them "
        "as probes, answers checked"
    )
    result = {
        "benchmark": "http_load",
        "configuration": "make run (serve_app/config.yaml, auto-sized Recognizer, access logs on, SQS bridge up); "
        "http_in_recognizer: make run INGRESS=in_recognizer",
        "workloads": workloads,
        "enrolment_refused": refused,
        "machine": describe(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http_load.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "http_load.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
