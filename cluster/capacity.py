"""The cluster's throughput by worker count, from measured per-image costs and AWS's published limits.

``facerec sim capacity`` reads the CPU each node spent per image in one run of ``bench/cluster_cpu.py`` (a fake
cluster on one machine: measured) and combines it with what AWS publishes (cited below: not measured here), for
each path:

* a worker node: its vCPUs over the CPU per image of its processes (model and front together: they share the
  node's cores), so ``workers x`` that;
* the head: its vCPUs less what Ray and Serve use when idle, over the head's CPU per image;
* S3: 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD requests per second per prefix
  (https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html); the contract's keys share
  one prefix per bucket, so each bucket gets one prefix's rate until S3 splits it under sustained load;
* SQS standard queues: "a nearly unlimited number of transactions per second per API action" and up to 120,000
  messages in flight per queue (https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html):
  the consumers hold at most ``max_in_flight`` each, far below;
* EC2: every worker's vCPUs must fit the account's vCPU quota for its purchase option (Service Quotas
  ``L-1216C47A`` on-demand, ``L-34B43A08`` spot): not a rate, a ceiling on the worker count.

The cluster's rate is the smallest of these; the table says which one it is at each size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Published S3 request rates per prefix (see the module docstring).
S3_WRITES_PER_PREFIX_S = 3500.0
S3_READS_PER_PREFIX_S = 5500.0
#: Requests per image each bucket gets, by path (sqs_bridge/processor.py and the web tier's queue client):
#: input: the upload (PUT) and the bridge's read (GET); output: the answer (PUT), its sent-record (COPY), and the
#: redelivery check (HEAD).
INPUT_WRITES_PER_IMAGE = 1
INPUT_READS_PER_IMAGE = 1
OUTPUT_WRITES_PER_IMAGE = 2
OUTPUT_READS_PER_IMAGE = 1


@dataclass(frozen=True)
class PathCost:
    """What one image costs on one path, measured: milliseconds of CPU on a worker and on the head."""

    worker_ms: float
    head_ms: float
    #: Cores the head's processes use whatever the load (Ray's and Serve's own loops).
    head_idle_cores: float
    #: The worker's processes, largest first (for the report).
    worker_processes: dict[str, float]


@dataclass(frozen=True)
class Capacity:
    workers: int
    images_per_s: float
    limited_by: str
    limits: dict[str, float]


def path_costs(result: dict[str, Any]) -> dict[str, PathCost]:
    """Per path, the mean over the worker nodes of their per-image CPU, and the head's, from a cluster_cpu run."""
    costs: dict[str, PathCost] = {}
    for path, measured in result["paths"].items():
        nodes = measured["cpu_ms_per_image"]
        workers = [n for name, n in nodes.items() if name.removeprefix("worker ").isdigit()]
        processes: dict[str, float] = {}
        for node in workers:
            for process, ms in node["processes_per_image"].items():
                processes[process] = processes.get(process, 0.0) + ms / len(workers)
        costs[path] = PathCost(
            worker_ms=sum(processes.values()),
            head_ms=float(nodes["head"]["per_image_ms"]),
            head_idle_cores=float(nodes["head"]["idle_cores"]),
            worker_processes=dict(sorted(processes.items(), key=lambda kv: -kv[1])),
        )
    return costs


def capacity(cost: PathCost, workers: int, worker_vcpus: float, head_vcpus: float) -> Capacity:
    """The cluster's images per second on one path with ``workers`` worker nodes, and what limits it."""
    head_cores = max(0.0, head_vcpus - cost.head_idle_cores)
    limits = {
        f"{workers} workers' CPU": workers * worker_vcpus * 1000.0 / cost.worker_ms,
        "the head's CPU": head_cores * 1000.0 / cost.head_ms if cost.head_ms > 0 else math.inf,
        "S3 writes to the output bucket (one prefix)": S3_WRITES_PER_PREFIX_S / OUTPUT_WRITES_PER_IMAGE,
        "S3 reads of the output bucket (one prefix)": S3_READS_PER_PREFIX_S / OUTPUT_READS_PER_IMAGE,
        "S3 writes to the input bucket (one prefix)": S3_WRITES_PER_PREFIX_S / INPUT_WRITES_PER_IMAGE,
        "S3 reads of the input bucket (one prefix)": S3_READS_PER_PREFIX_S / INPUT_READS_PER_IMAGE,
    }
    limited_by = min(limits, key=lambda name: limits[name])
    return Capacity(workers, limits[limited_by], limited_by, limits)


#: What to change once a limit is reached.
BEYOND = {
    "workers' CPU": "more workers (the controller's max_nodes, cluster.yaml's max_workers, the EC2 vCPU quota)",
    "the head's CPU": "a larger head (it does no per-image work but this), or move what remains off it",
    "S3 writes to the output bucket (one prefix)": (
        "S3 splits a busy prefix after sustained load (ask AWS to pre-partition), or record the sent answer "
        "without a second write (the COPY)"
    ),
    "S3 reads of the output bucket (one prefix)": "as above: S3 partitions, or fewer HEADs (redeliveries only)",
    "S3 writes to the input bucket (one prefix)": "S3 partitions; producers' keys are the contract's",
    "S3 reads of the input bucket (one prefix)": "S3 partitions",
}


def advice(limited_by: str) -> str:
    return next((text for key, text in BEYOND.items() if limited_by.endswith(key)), "")


def table(result_file: Path, sizes: list[int], worker_vcpus: float, head_vcpus: float) -> str:
    """The README's capacity table (markdown), from one cluster_cpu result."""
    result = json.loads(result_file.read_text())
    costs = path_costs(result)
    lines = [
        f"Measured: {result_file.name} ({result['machine']['cpu']}, {result['machine']['isa']}; "
        f"{result['configuration']}). Per image: "
        + "; ".join(
            f"{path}: {cost.worker_ms:.1f} ms on a worker ("
            + ", ".join(
                f"{p.removeprefix('ServeReplica:')} {ms:.1f}" for p, ms in cost.worker_processes.items() if ms >= 0.5
            )
            + f"), {cost.head_ms:.2f} ms on the head"
            for path, cost in costs.items()
        )
        + f". Assumed: {worker_vcpus:g}-vCPU workers, a {head_vcpus:g}-vCPU head; AWS limits as published.",
        "",
        "| path | workers | images/s | limited by | then |",
        "|---|---|---|---|---|",
    ]
    for path, cost in costs.items():
        for size in sizes:
            row = capacity(cost, size, worker_vcpus, head_vcpus)
            lines.append(f"| {path} | {size} | {row.images_per_s:,.0f} | {row.limited_by} | {advice(row.limited_by)} |")
    return "\n".join(lines)
