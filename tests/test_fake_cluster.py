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
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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
from cluster.policy import PolicyConfig, nodes_for, wanted_replicas
from tests.queue_helpers import Stack, check_all_answered, collect_responses, enqueue, enrol, numbered
from tests.serve_fixtures import free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.cluster

RAY = Path(sys.executable).with_name("ray")
MAX_WORKERS = 3
#: With the policy below (100 images per replica) any backlog over 200 wants MAX_WORKERS replicas.
MESSAGES = 300
NODE_BUNDLE = {"recognizer": 1.0}
#: Every other port the head opens, each a free one (another Ray may be running in this test session).
PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "metrics-export-port",
    "ray-client-server-port",
    "runtime-env-agent-port",
)
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
class FakeCluster:
    dashboard: str
    http: str
    temp: Path

    def _get(self, route: str, **params: int) -> Any:
        response = requests.get(f"{self.dashboard}/{route}", params=params, timeout=10)
        response.raise_for_status()
        return response.json()

    def worker_nodes(self) -> set[str]:
        """Ids of the alive nodes offering the ``recognizer`` resource (the head has none)."""
        nodes = self._get("api/v0/nodes", limit=1000, detail=1)["data"]["result"]["result"]
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE" and n.get("resources_total", {}).get("recognizer")}

    def requested_bundles(self) -> list[dict[str, float]]:
        """The bundles standing from ``request_resources``, as the autoscaler last published them."""
        cluster_status = self._get("api/cluster_status")["data"].get("clusterStatus") or {}
        demand = cluster_status.get("loadMetricsReport", {}).get("requestDemand", [])
        return [dict(bundle) for bundle, count in demand for _ in range(count)]

    def recognizer(self) -> Recognizer:
        """Serve's target for the Recognizer (set by the controller) and where its replicas run."""
        applications = self._get("api/serve/applications/").get("applications") or {}
        deployment = applications.get("facerec", {}).get("deployments", {}).get("Recognizer")
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


def _autoscaling_config(gcs_port: int) -> dict[str, Any]:
    """cluster.yaml's shape for the fake provider: a head with no `recognizer`, a 1-CPU worker type."""
    return {
        "cluster_name": "fake-facerec",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Where the fake worker nodes join (the provider assumes 6379 otherwise).
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {
                "resources": {"CPU": 1, "recognizer": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_WORKERS,
            },
        },
        "head_node_type": "ray.head.default",  # the fake provider names its head this way
        "auth": {"ssh_user": "ubuntu"},
        # The keys `ray up` would fill in from the provider's defaults (the fake provider ships none in 2.60).
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _pids_naming(temp: Path) -> list[int]:
    """Processes whose command line names ``temp`` (only this test's Ray processes do)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if str(temp).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def _end_processes_of(head: subprocess.Popen[bytes], temp: Path) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=10)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_naming(temp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(pytest.fail.Exception):  # what survives SIGTERM gets SIGKILL next
            wait_until(lambda: not _pids_naming(temp), 15, "processes outlived the signal", interval=0.5)


@pytest.fixture(scope="module")
def fake_cluster(moto_endpoint: str) -> Iterator[FakeCluster]:
    # A short path: Ray's socket paths live under it and must stay under 108 characters.
    temp = Path(tempfile.mkdtemp(prefix="rfc", dir="/tmp"))
    config = temp / "autoscaling.json"
    dashboard_port, http_port, gcs_port = free_port(), free_port(), free_port()
    config.write_text(json.dumps(_autoscaling_config(gcs_port)))
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    with (temp / "head.log").open("wb") as log:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=1"]
            + ["--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
            + [f"--port={gcs_port}"]
            + [f"--{flag}={free_port()}" for flag in PORT_FLAGS]
            + [f"--autoscaling-config={config}", f"--temp-dir={temp}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cluster = FakeCluster(f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{http_port}", temp)
    try:
        for route in ("api/v0/nodes", "api/serve/applications/"):
            url = f"{cluster.dashboard}/{route}"
            wait_until(functools.partial(_answers, url), 90, f"the head's dashboard: no /{route}")
        yield cluster
    finally:
        _end_processes_of(head, temp)
        shutil.rmtree(temp, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _serve_config(stack: StackConfig, http_port: int, dashboard: str, *, bridge: bool) -> dict[str, Any]:
    """The rendered cluster config, adapted to this machine; without the SQS bridge when ``bridge`` is false."""
    config = render_serve_config(stack)
    config["http_options"]["host"] = "127.0.0.1"
    config["http_options"]["port"] = http_port
    apps = {app["name"]: app for app in config["applications"]}
    facerec = apps["facerec"]["args"]
    facerec["queue_mode"] = False  # the test reads the response queue itself, so no ResponseRouter
    apps["facerec"]["deployments"] = [d for d in apps["facerec"]["deployments"] if d["name"] != "ResponseRouter"]
    facerec["recognizer"].update({"num_cpus": 1.0, "max_replicas": MAX_WORKERS})
    apps["bridge"]["args"].update({"wait_time_s": 1})
    controller = apps["controller"]["args"]
    controller["period_s"] = 1.0
    controller["dashboard_url"] = dashboard
    assert controller["node_bundle"] == NODE_BUNDLE
    # 100 images per replica: 300 queued messages want 3 replicas, one per fake node.
    controller["policy"].update(
        {"max_replicas": MAX_WORKERS, "max_nodes": MAX_WORKERS, "scale_down_after_s": 5.0, "latency_target_s": 10.0}
    )
    if not bridge:
        config["applications"] = [app for app in config["applications"] if app["name"] != "bridge"]
    return config


def _policy(config: dict[str, Any]) -> PolicyConfig:
    """The policy the controller runs with, from the same application arguments it is given."""
    controller = next(app for app in config["applications"] if app["name"] == "controller")
    return PolicyConfig.model_validate(controller["args"]["policy"])


def test_backlog_brings_worker_nodes_that_drain_it_then_leave(fake_cluster: FakeCluster, moto_endpoint: str) -> None:
    cluster = fake_cluster
    stack_config = StackConfig(
        prefix=f"fc{uuid.uuid4().hex[:8]}", endpoint=moto_endpoint, visibility_timeout_s=30, max_receive_count=10
    )
    clients = AwsClients.for_stack(stack_config)
    stack = Stack(stack_config, clients, provision(stack_config, clients))
    http_port = int(cluster.http.rsplit(":", 1)[1])
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
    responses = collect_responses(stack, MESSAGES, timeout=DRAIN_LIMIT_S)
    drained = time.monotonic() - started

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
