"""Both paths on a fake multi-node cluster, as cluster/serve_config.yaml places them: the per-image work on the
workers, every photo answered right, and a worker node killed mid-run loses nothing.

A real Ray head and two worker raylets on 127.0.0.1 (``cluster/fake_cluster.py``), the moto server as S3/SQS, and
the cluster's Serve config as ``facerec cluster deploy`` renders it, adapted only to this machine (ports, loopback,
CPU counts, a controller that holds the two workers). HTTP requests go to the workers' proxies, as the cluster's
load balancer sends them (one port the fake workers' proxies share; the kernel spreads the connections).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import BotoCoreError

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, provision, status
from cluster.deploy import deploy, render_serve_config
from cluster.fake_cluster import RAY_ENVIRONMENT, FakeCluster, WorkerType, cluster_worker_resources, fake_cluster
from serve_app.queue_mode.answer_inbox import INBOX_NAMESPACE
from tests.queue_helpers import (
    Stack,
    collect_responses,
    enqueue,
    enrol,
    moto_target_group,
    numbered,
    pool,
    receive_responses,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.cluster

WORKERS = 2
START_LIMIT_S = 600
#: The Serve deployments that do per-image work, by application: all on worker nodes (and the head's one
#: standby ingress).
PER_IMAGE = {("facerec", "Recognizer"), ("bridge", "SqsBridge"), ("facerec", "Ingress")}


def _targets(elbv2: Any, group: str) -> set[tuple[str, int]]:
    described = elbv2.describe_target_health(TargetGroupArn=group)["TargetHealthDescriptions"]
    return {
        (t["Target"]["Id"], int(t["Target"]["Port"])) for t in described if t["TargetHealth"]["State"] != "draining"
    }


def _config(stack: StackConfig, cluster: FakeCluster, target_group: str) -> dict[str, Any]:
    config = render_serve_config(stack)
    config["http_options"].update({"host": "127.0.0.1", "port": cluster.http_port})
    apps = {app["name"]: app for app in config["applications"]}
    facerec = apps["facerec"]["args"]
    assert facerec["queue_mode"] is True  # POST / through S3 + SQS, as shipped
    facerec["recognizer"].update({"num_cpus": 1.0, "max_replicas": WORKERS})
    facerec["recognition"]["torch_threads"] = 1
    facerec["queue_timeout_s"] = 600
    apps["bridge"]["args"].update({"wait_time_s": 1})
    controller = apps["controller"]["args"]
    controller.update({"period_s": 1.0, "dashboard_url": cluster.dashboard})
    # The balancer's targets: the fake workers' shared proxy port, or the head's.
    controller["load_balancer"] = {
        "target_group_arn": target_group,
        "worker_port": cluster.worker_http_port,
        "head_port": cluster.http_port,
    }
    controller["policy"].update({"min_replicas": WORKERS, "max_replicas": WORKERS, "max_nodes": WORKERS})
    return config


def _replicas(cluster: FakeCluster) -> dict[tuple[str, str], list[str]]:
    """(application, deployment) -> the node of each RUNNING replica."""
    applications = cluster.get("api/serve/applications/").get("applications") or {}
    return {
        (app, name): [r["node_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"]
        for app, details in applications.items()
        for name, deployment in (details.get("deployments") or {}).items()
    }


def _placed_on_workers(cluster: FakeCluster) -> bool:
    """One of each per-image deployment on every worker node, the head's standby ingress, nothing else."""
    workers, head = cluster.worker_nodes(), cluster.head_node()
    replicas = _replicas(cluster)
    if len(workers) != WORKERS:
        return False
    for key in PER_IMAGE:
        expected = sorted([*workers, head] if key == ("facerec", "Ingress") else workers)
        if sorted(replicas.get(key, [])) != expected:
            return False
    return True


@pytest.fixture(scope="module")
def running(moto_endpoint: str) -> Iterator[tuple[FakeCluster, Stack, tuple[Any, str]]]:
    stack_config = StackConfig(
        prefix=f"fp{uuid.uuid4().hex[:8]}", endpoint=moto_endpoint, visibility_timeout_s=20, max_receive_count=10
    )
    clients = AwsClients.for_stack(stack_config)
    stack = Stack(stack_config, clients, provision(stack_config, clients))
    worker = WorkerType("cpu_worker", cluster_worker_resources(2), min_workers=WORKERS, max_workers=WORKERS)
    with fake_cluster([worker]) as cluster:
        wait_until(lambda: len(cluster.worker_nodes()) == WORKERS, START_LIMIT_S, "the workers did not start", 1)
        balancer = moto_target_group(moto_endpoint)
        deploy(_config(stack_config, cluster, balancer[1]), cluster.dashboard)
        wait_until(lambda: _placed_on_workers(cluster), START_LIMIT_S, "per-image work not on the workers", 1)
        wait_until(lambda: _healthy(cluster.workers_http), START_LIMIT_S, "the workers' proxies do not answer", 1)
        enrol(cluster.workers_http, timeout=START_LIMIT_S)
        yield cluster, stack, balancer


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=10).status_code == 200
    except requests.RequestException:
        return False


#: What a client of the legacy contract retries: a connection refused or reset, and these statuses.
RETRYABLE = {502, 503, 504}


def _post(url: str, name: str, data: bytes, attempts: int = 5) -> tuple[int, str, int]:
    """POST / as a legacy client does, retrying what it may retry: (status, body, retries it took)."""
    for attempt in range(attempts):
        try:
            response = requests.post(f"{url}/", files={"inputFile": (name, data)}, timeout=900)
        except requests.ConnectionError:
            time.sleep(1.0)
            continue
        if response.status_code not in RETRYABLE:
            return response.status_code, response.text, attempt
        time.sleep(1.0)
    return 0, "gave up", attempts


def test_both_paths_answer_every_photo_right_with_the_work_on_the_workers(
    running: tuple[FakeCluster, Stack, tuple[Any, str]],
) -> None:
    cluster, stack, (elbv2, group) = running
    # The controller put the workers' proxies behind the balancer and took the head's out (every fake node has
    # the address 127.0.0.1: one target, on the workers' port).
    wanted = {("127.0.0.1", cluster.worker_http_port)}
    wait_until(lambda: _targets(elbv2, group) == wanted, START_LIMIT_S, "the balancer's targets did not follow", 1)
    items, answers = numbered(60)
    ids = enqueue(stack, items)
    photos = pool()
    jobs = [(f"web_{i:03d}.jpg", *photos[i % len(photos)]) for i in range(60)]
    with ThreadPoolExecutor(max_workers=20) as clients:
        results = list(clients.map(lambda job: _post(cluster.workers_http, job[0], job[1]), jobs))
    responses = collect_responses(stack, 60, timeout=START_LIMIT_S)
    assert {r["key"]: r["body"] for r in responses} == {cid: repr((key[:-4], answers[key])) for cid, key in ids.items()}
    assert [(code, body) for code, body, _ in results] == [
        (200, f"{name[:-4]}:{expected}") for name, _, expected in jobs
    ]
    assert _placed_on_workers(cluster)
    # The head's standby ingress took no request: its inbox never waited for, read or was handed an answer.
    head = cluster.head_node()
    on_head = [r for r in _ingress_replicas(cluster) if r["node_id"] == head and r["state"] == "RUNNING"]
    assert len(on_head) == 1
    assert _inbox_stats(cluster, f"inbox-{on_head[0]['replica_id']}") == {
        "read": 0,
        "forwarded": 0,
        "delivered_by_others": 0,
        "delete_failed": 0,
        "waiting": 0,
    }


def _inbox_stats(cluster: FakeCluster, name: str) -> dict[str, int]:
    """An inbox's counts, asked from a process of its own (this one may be connected to another Ray)."""
    script = (
        "import json, ray\n"
        f"ray.init(address={cluster.gcs_address!r}, logging_level='ERROR')\n"
        f"inbox = ray.get_actor({name!r}, namespace={INBOX_NAMESPACE!r})\n"
        "print(json.dumps(ray.get(inbox.stats.remote(), timeout=60)))\n"
    )
    env = {**os.environ, **RAY_ENVIRONMENT}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    stats: dict[str, int] = json.loads(run.stdout.strip().splitlines()[-1])
    return stats


def _ingress_replicas(cluster: FakeCluster) -> list[dict[str, Any]]:
    applications = cluster.get("api/serve/applications/").get("applications") or {}
    return list(applications["facerec"]["deployments"]["Ingress"]["replicas"])


def _answers_for(stack: Stack, ids: set[str]) -> dict[str, list[str]]:
    """Every response body for these correlation ids, read off the response queue until each has one. Answers of
    HTTP requests whose ingress died with its node (they name an inbox that is gone) may be read here too: they
    are nobody's, and left out."""
    by_key: dict[str, list[str]] = {}
    deadline = time.monotonic() + START_LIMIT_S
    while not ids <= set(by_key):
        assert time.monotonic() < deadline, f"{len(ids - set(by_key))} of {len(ids)} requests unanswered"
        for response in receive_responses(stack):
            if response["key"] in ids:
                by_key.setdefault(response["key"], []).append(response["body"])
    return by_key


def _node_processes(raylet: int) -> list[int]:
    """The raylet and every process under it (the node's agents, proxy and replicas): what a machine takes down."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [raylet]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _raylet_of(node_id: str) -> int:
    """The pid of the raylet of ``node_id`` (its command line names it)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if b"raylet/raylet" in cmdline and f"--node_id={node_id}".encode() in cmdline:
                    return int(entry.name)
    raise AssertionError(f"no raylet for node {node_id}")


def test_a_worker_node_killed_mid_run_loses_nothing(running: tuple[FakeCluster, Stack, tuple[Any, str]]) -> None:
    """Queue path: every request answered once, right (the dead node's messages reappear). HTTP path: every
    request answered right, some after a retry the client saw it needed (a reset connection or a 5xx)."""
    cluster, stack, _ = running
    items, answers = numbered(120)
    photos = pool()
    jobs = [(f"kill_{i:03d}.jpg", *photos[i % len(photos)]) for i in range(120)]
    victim = sorted(cluster.worker_nodes())[0]
    raylet = _raylet_of(victim)
    killed = threading.Event()

    def in_flight() -> int:
        try:
            return int(status(stack.config, stack.clients)["request_queue"]["in_flight"])
        except BotoCoreError:  # the local S3/SQS stand-in, busy with the whole cluster, refused a connection
            return -1

    def kill_mid_run() -> None:
        # Mid-run: the consumers hold requests (the queue was empty before) and the ingresses wait for answers.
        wait_until(lambda: in_flight() >= 10, START_LIMIT_S, "no request in flight")
        # A machine failing: its raylet and every process of the node at once (a raylet killed alone leaves its
        # proxy and replicas running a while, answering for a node that is gone: no machine does that).
        for pid in _node_processes(raylet):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.set()

    killer = threading.Thread(target=kill_mid_run)
    killer.start()
    ids = enqueue(stack, items)
    with ThreadPoolExecutor(max_workers=20) as clients:
        results = list(clients.map(lambda job: _post(cluster.workers_http, job[0], job[1]), jobs))
    killer.join(timeout=START_LIMIT_S)
    assert killed.is_set(), "the worker node was not killed mid-run"
    by_key = _answers_for(stack, set(ids))
    wait_until(lambda: victim not in cluster.worker_nodes(), START_LIMIT_S, "the killed node still counts", 1)
    # Every queued request answered right; a second copy only from a lapse the consumers counted (none expected).
    assert {cid: bodies[0] for cid, bodies in by_key.items()} == {
        cid: repr((key[:-4], answers[key])) for cid, key in ids.items()
    }
    assert all(len(set(bodies)) == 1 for bodies in by_key.values())
    assert [(code, body) for code, body, _ in results] == [
        (200, f"{name[:-4]}:{expected}") for name, _, expected in jobs
    ]
    retried = sum(1 for _, _, retries in results if retries)
    print(f"\nworker node killed: 120 queued + 120 HTTP answered right; {retried} HTTP requests retried by the client")
    # The survivor goes on serving both paths. (Ray's fake node provider never notices a node that died, so no
    # replacement comes here; on EC2 the instance is gone and the autoscaler starts another.)
    more, more_answers = numbered(10)
    more_ids = enqueue(stack, more)
    assert {cid: bodies[0] for cid, bodies in _answers_for(stack, set(more_ids)).items()} == {
        cid: repr((key[:-4], more_answers[key])) for cid, key in more_ids.items()
    }
    data, expected = photos[0]
    assert _post(cluster.workers_http, "after_000.jpg", data)[:2] == (200, f"after_000:{expected}")
