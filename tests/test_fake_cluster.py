"""The controller on a fake multi-node Ray cluster: SQS backlog -> worker nodes -> drained -> back to the head.

A real Ray head (``RAY_FAKE_CLUSTER=1``, Ray's v1 autoscaler with the ``fake_multinode`` provider: every
"worker node" is a real raylet on this machine, on 127.0.0.1) runs cluster/serve_config.yaml as
`facerec cluster deploy` renders it, with the moto server's S3 and SQS. Only what cannot run here is changed:
ports, loopback, one CPU per fake node, short cool-downs, and the legacy POST / answered directly (the test
reads the response queue itself).

What is asserted is what the controller decided and what Ray did for it, never how fast this machine drains a
queue (a slower CPU drains later, it must not decide differently):

* the decisions, read back from the controller's own log lines (its inputs and outputs each period), and
  checked against :mod:`cluster.policy` for the inputs it saw;
* the bundles it asked for with ``request_resources``, read back from the autoscaler's published status;
* the Recognizer replica count it set through Serve's scaling API, and the replicas and nodes that came.

The backlog is certain when the controller decides on it: the first deploy leaves out the SQS bridge (the only
consumer of the request queue), so the 300 queued messages stay queued while the controller scales to
``MAX_WORKERS`` and Ray starts the nodes and replicas; only then does the second deploy (the full config) add
the bridge, which drains the queue. Every wait is on a condition with a generous limit (the test must also pass
on a CPU three times slower); the seconds it prints are figures, not assertions.

The head and everything it starts are ended by pid: the ``ray start --block`` process group, then any process
whose command line names this test's own temporary directory. ``ray stop`` is never used (it would end every
Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, provision, status
from cluster.deploy import deploy, render_serve_config
from cluster.fake_cluster import FakeCluster, WorkerType, cluster_worker_resources
from cluster.fake_cluster import fake_cluster as start_fake_cluster
from cluster.policy import PolicyConfig, nodes_for, wanted_replicas
from tests.queue_helpers import Stack, check_all_answered, collect_responses, enqueue, enrol, numbered
from tests.waiting import wait_until

pytestmark = pytest.mark.cluster

MAX_WORKERS = 3
#: With the policy below (100 images per replica) any backlog over 200 wants MAX_WORKERS replicas.
MESSAGES = 300
NODE_BUNDLE = {"recognizer": 1.0}
#: Limits for what this machine's speed decides (raylets, model loads, the drain): three times what a 2-core
#: machine needs, and more.
START_LIMIT_S = 300
DRAIN_LIMIT_S = 900
#: One line per controller period (cluster/controller.py, QueueController.step).
DECISION_LINE = re.compile(
    r"backlog=(?P<backlog>\d+) ongoing=(?P<ongoing>\d+) -> replicas=(?P<replicas>\d+) nodes=(?P<nodes>\d+)"
    r" \((?P<reason>[^)]*)\)(?P<applied> applied)?$"
)


@dataclass(frozen=True)
class LoggedDecision:
    """One controller period as its log line records it."""

    backlog: int
    ongoing: int
    replicas: int
    nodes: int
    reason: str
    applied: bool


@dataclass(frozen=True)
class Recognizer:
    """The Recognizer deployment as Serve reports it."""

    target: int
    #: Node id of each RUNNING replica.
    running_on: list[str]


@dataclass(frozen=True)
class ControlledCluster:
    """The fake cluster seen from the controller's side: its nodes, requests, replicas and logged decisions."""

    base: FakeCluster

    @property
    def dashboard(self) -> str:
        return self.base.dashboard

    @property
    def http(self) -> str:
        return self.base.http

    @property
    def temp(self) -> Path:
        return self.base.temp

    def _get(self, route: str, **params: int) -> Any:
        return self.base.get(route, **params)

    def worker_nodes(self) -> set[str]:
        """Ids of the alive nodes offering the ``recognizer`` resource (the head has none)."""
        return self.base.worker_nodes("recognizer")

    def requested_bundles(self) -> list[dict[str, float]]:
        """The bundles standing from ``request_resources``, as the autoscaler last published them."""
        cluster_status = self._get("api/cluster_status")["data"].get("clusterStatus") or {}
        demand = cluster_status.get("loadMetricsReport", {}).get("requestDemand", [])
        return [dict(bundle) for bundle, count in demand for _ in range(count)]

    def recognizer(self) -> Recognizer:
        """Serve's target for the Recognizer (set by the controller) and where its replicas run."""
        return self.deployment("facerec", "Recognizer")

    def deployment(self, app: str, name: str) -> Recognizer:
        """Serve's target for a deployment and the nodes its RUNNING replicas are on (target -1: not deployed)."""
        applications = self._get("api/serve/applications/").get("applications") or {}
        deployment = applications.get(app, {}).get("deployments", {}).get(name)
        if deployment is None:
            return Recognizer(-1, [])
        running = [r["node_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"]
        return Recognizer(deployment["target_num_replicas"], running)

    def application_running(self, name: str) -> bool:
        applications = self._get("api/serve/applications/").get("applications") or {}
        return bool(applications.get(name, {}).get("status") == "RUNNING")

    def decisions(self) -> list[LoggedDecision]:
        """Every decision the controller has logged so far (Serve writes its replica's log under the temp dir)."""
        decisions = []
        for log_file in sorted((self.temp / "session_latest" / "logs" / "serve").glob("*QueueController*.log")):
            # The last piece may be a line still being written: only whole lines count.
            for line in log_file.read_text(errors="replace").split("\n")[:-1]:
                if match := DECISION_LINE.search(line):
                    decisions.append(
                        LoggedDecision(
                            backlog=int(match["backlog"]),
                            ongoing=int(match["ongoing"]),
                            replicas=int(match["replicas"]),
                            nodes=int(match["nodes"]),
                            reason=match["reason"],
                            applied=bool(match["applied"]),
                        )
                    )
        return decisions

    def on_head_alone(self) -> bool:
        """No worker node, no standing node request, no Recognizer replica wanted or running."""
        recognizer = self.recognizer()
        return (
            not self.worker_nodes()
            and not self.requested_bundles()
            and recognizer.target == 0
            and not recognizer.running_on
        )


@pytest.fixture(scope="module")
def fake_cluster(moto_endpoint: str) -> Iterator[ControlledCluster]:
    """cluster.yaml's shape for the fake provider: a head with no `recognizer`, 1-CPU workers (moto's endpoint is
    in this process's environment, which the cluster's processes inherit)."""
    worker = WorkerType("cpu_worker", cluster_worker_resources(2), min_workers=0, max_workers=MAX_WORKERS)
    with start_fake_cluster([worker]) as cluster:
        yield ControlledCluster(cluster)


def _serve_config(stack: StackConfig, http_port: int, dashboard: str, *, bridge: bool) -> dict[str, Any]:
    """The rendered cluster config, adapted to this machine; without the SQS bridge when ``bridge`` is false."""
    config = render_serve_config(stack)
    config["http_options"]["host"] = "127.0.0.1"
    config["http_options"]["port"] = http_port
    apps = {app["name"]: app for app in config["applications"]}
    facerec = apps["facerec"]["args"]
    facerec["queue_mode"] = False  # the test reads the response queue itself
    facerec["recognizer"].update({"num_cpus": 1.0, "max_replicas": MAX_WORKERS})
    apps["bridge"]["args"].update({"wait_time_s": 1})
    controller = apps["controller"]["args"]
    controller["period_s"] = 1.0
    controller["dashboard_url"] = dashboard
    assert controller["node_bundle"] == NODE_BUNDLE
    # 100 images per replica: 300 queued messages want 3 replicas, one per fake node.
    controller["policy"].update(
        {
            "max_replicas": MAX_WORKERS,
            "max_nodes": MAX_WORKERS,
            "scale_down_after_s": 5.0,
            "latency_target_s": 10.0,
            "service_time_s": 0.1,
        }
    )
    if not bridge:
        config["applications"] = [app for app in config["applications"] if app["name"] != "bridge"]
    return config


def _policy(config: dict[str, Any]) -> PolicyConfig:
    """The policy the controller runs with, from the same application arguments it is given."""
    controller = next(app for app in config["applications"] if app["name"] == "controller")
    return PolicyConfig.model_validate(controller["args"]["policy"])


def test_backlog_brings_worker_nodes_that_drain_it_then_leave(
    fake_cluster: ControlledCluster, moto_endpoint: str
) -> None:
    cluster = fake_cluster
    stack_config = StackConfig(
        prefix=f"fc{uuid.uuid4().hex[:8]}", endpoint=moto_endpoint, visibility_timeout_s=30, max_receive_count=10
    )
    clients = AwsClients.for_stack(stack_config)
    stack = Stack(stack_config, clients, provision(stack_config, clients))
    http_port = cluster.base.http_port
    full_config = _serve_config(stack_config, http_port, cluster.dashboard, bridge=True)
    policy = _policy(full_config)
    assert wanted_replicas(MESSAGES, policy) == MAX_WORKERS == nodes_for(MAX_WORKERS, policy)

    # First deploy: everything but the SQS bridge, so nothing can consume the request queue yet.
    deploy(_serve_config(stack_config, http_port, cluster.dashboard, bridge=False), cluster.dashboard)
    wait_until(lambda: _answers(f"{cluster.http}/docs"), START_LIMIT_S, "the ingress did not start")
    # Serve deploys one replica at first; the controller's first decision (no work) takes it to zero.
    wait_until(cluster.on_head_alone, START_LIMIT_S, "the idle cluster did not settle on the head", interval=1)

    # HTTP demand alone (the ingress reports its in-flight requests) brings up a replica to enrol with: the
    # queue is empty, Serve's target is zero, and only the controller can raise it.
    before_enrol = len(cluster.decisions())
    enrol(cluster.http, timeout=START_LIMIT_S)
    enrol_decisions = cluster.decisions()[before_enrol:]
    assert any(
        d.applied and d.backlog == 0 and d.ongoing > 0 and d.replicas >= 1 and d.nodes >= 1 for d in enrol_decisions
    ), enrol_decisions
    wait_until(cluster.on_head_alone, START_LIMIT_S, "the cluster did not go back to the head after enrolling", 1)

    # The backlog, with no consumer: it stays whole while the controller decides and Ray acts.
    items, answers = numbered(MESSAGES)
    before_backlog = len(cluster.decisions())
    started = time.monotonic()
    ids = enqueue(stack, items)
    first_node: float | None = None
    peak_requested = peak_nodes = 0

    def scaled_for_the_backlog() -> bool:
        nonlocal first_node, peak_requested, peak_nodes
        nodes, bundles, recognizer = cluster.worker_nodes(), cluster.requested_bundles(), cluster.recognizer()
        if nodes and first_node is None:
            first_node = time.monotonic() - started
        peak_requested, peak_nodes = max(peak_requested, len(bundles)), max(peak_nodes, len(nodes))
        return (
            len(nodes) == MAX_WORKERS
            and bundles == [NODE_BUNDLE] * MAX_WORKERS
            and recognizer.target == MAX_WORKERS
            and len(recognizer.running_on) == MAX_WORKERS
            and set(recognizer.running_on) == nodes  # one replica on each worker node Ray started
            and any(d.backlog == MESSAGES for d in cluster.decisions()[before_backlog:])
        )

    wait_until(scaled_for_the_backlog, START_LIMIT_S, "the backlog did not bring MAX_WORKERS nodes", interval=1)
    scaled = time.monotonic() - started
    assert status(stack_config, clients)["request_queue"] == {"visible": MESSAGES, "in_flight": 0}
    backlog_decisions = cluster.decisions()[before_backlog:]
    assert max(d.nodes for d in backlog_decisions) == MAX_WORKERS
    to_max = next(d for d in backlog_decisions if d.nodes == MAX_WORKERS)
    # The decision follows from what the controller saw, by the policy's rule.
    assert to_max.applied, to_max
    assert to_max.replicas == wanted_replicas(to_max.backlog + to_max.ongoing, policy) == MAX_WORKERS, to_max
    assert all(d.backlog <= MESSAGES and d.nodes == nodes_for(d.replicas, policy) for d in backlog_decisions)

    # Second deploy: the full config adds the bridge (the other applications are unchanged), which drains.
    deploy(full_config, cluster.dashboard)
    wait_until(lambda: cluster.application_running("bridge"), START_LIMIT_S, "the bridge did not start", 0.5)
    # Redeploying the unchanged recognition application keeps the count the controller set (the controller
    # only calls the scaling API when its decision changes, so a reset here would stick). The wait covers only
    # the instant between the controller's call and its log line.
    wait_until(
        lambda: cluster.recognizer().target == [d for d in cluster.decisions() if d.applied][-1].replicas,
        60,
        "the redeploy changed the Recognizer count the controller had set",
        interval=1,
    )
    # The consumers follow the node count, one on each worker node, never on the head: watched while draining.
    consumer_nodes: list[list[str]] = []
    watching = threading.Event()

    def watch_consumers() -> None:
        while not watching.wait(0.5):
            with contextlib.suppress(requests.RequestException):
                consumer_nodes.append(cluster.deployment("bridge", "SqsBridge").running_on)

    watcher = threading.Thread(target=watch_consumers, daemon=True)
    watcher.start()
    try:
        responses = collect_responses(stack, MESSAGES, timeout=DRAIN_LIMIT_S)
    finally:
        watching.set()
        watcher.join(timeout=30)
    drained = time.monotonic() - started
    assert all(cluster.base.head_node() not in nodes for nodes in consumer_nodes)
    assert max(len(set(nodes)) for nodes in consumer_nodes) == MAX_WORKERS, consumer_nodes
    assert all(len(set(nodes)) == len(nodes) for nodes in consumer_nodes)  # never two on one node

    def back_on_head_alone() -> bool:
        latest = cluster.decisions()[-1]
        return latest.replicas == latest.nodes == 0 and cluster.on_head_alone()

    wait_until(back_on_head_alone, START_LIMIT_S, "workers were not removed after the queue emptied", interval=1)
    back_to_head = time.monotonic() - started

    check_all_answered(stack, ids, answers, responses)
    assert len(responses) == MESSAGES  # no duplicates
    assert status(stack_config, clients)["request_queue"] == {"visible": 0, "in_flight": 0}
    drain_decisions = cluster.decisions()[before_backlog + len(backlog_decisions) :]
    assert all(d.nodes == nodes_for(d.replicas, policy) <= MAX_WORKERS for d in drain_decisions)
    report = {
        "messages": MESSAGES,
        "seconds_to_first_worker_node": None if first_node is None else round(first_node, 1),
        "seconds_to_max_workers": round(scaled, 1),
        "peak_worker_nodes_requested": peak_requested,
        "peak_worker_nodes": peak_nodes,
        "seconds_to_drained": round(drained, 1),
        "seconds_draining": round(drained - scaled, 1),
        "seconds_to_head_only": round(back_to_head, 1),
        "decisions_applied": [
            f"backlog {d.backlog} + ongoing {d.ongoing} -> {d.replicas} replicas, {d.nodes} nodes"
            for d in backlog_decisions + drain_decisions
            if d.applied
        ],
    }
    print(json.dumps(report))
    if target := os.environ.get("FACEREC_FAKE_CLUSTER_REPORT"):
        Path(target).write_text(json.dumps(report, indent=1) + "\n")


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False
