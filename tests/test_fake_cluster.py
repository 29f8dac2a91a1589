"""The controller on a fake multi-node Ray cluster: SQS backlog -> worker nodes -> drained -> back to the head.

A real Ray head (``RAY_FAKE_CLUSTER=1``, Ray's v1 autoscaler with the ``fake_multinode`` provider: every
"worker node" is a real raylet on this machine, on 127.0.0.1) runs cluster/serve_config.yaml as
`facerec cluster deploy` renders it, with the moto server's S3 and SQS. Only what cannot run here is changed:
ports, loopback, one CPU per fake node, short cool-downs, and the legacy POST / answered directly (the test
reads the response queue itself).

The head and everything it starts are ended by pid: the ``ray start --block`` process group, then any process
whose command line names this test's own temporary directory. ``ray stop`` is never used (it would end every
Ray process on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
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

from cluster.deploy import deploy, render_serve_config
from sqs_bridge.stack import AwsClients, StackConfig, provision
from tests.queue_helpers import Stack, check_all_answered, collect_responses, enqueue, enrol, numbered
from tests.serve_fixtures import free_port, wait_until

RAY = Path(sys.executable).with_name("ray")
MAX_WORKERS = 3
MESSAGES = 300
#: Every other port the head opens, each a free one (another Ray may be running in this test session).
PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "metrics-export-port",
    "ray-client-server-port",
    "runtime-env-agent-port",
)


@dataclass(frozen=True)
class FakeCluster:
    dashboard: str
    http: str
    temp: Path

    def worker_nodes(self) -> int:
        """Alive nodes offering the ``recognizer`` resource (the head has none)."""
        response = requests.get(f"{self.dashboard}/api/v0/nodes", params={"limit": 1000, "detail": 1}, timeout=10)
        response.raise_for_status()
        nodes = response.json()["data"]["result"]["result"]
        return sum(1 for n in nodes if n["state"] == "ALIVE" and n.get("resources_total", {}).get("recognizer"))


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
        deadline = time.monotonic() + 15
        while _pids_naming(temp) and time.monotonic() < deadline:
            time.sleep(0.5)


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
            wait_until(lambda url=url: _answers(url), 90, f"the head's dashboard: no /{route}")
        yield cluster
    finally:
        _end_processes_of(head, temp)
        shutil.rmtree(temp, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _serve_config(stack: StackConfig, http_port: int, dashboard: str) -> dict[str, Any]:
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
    # 100 images per replica: 300 queued messages want 3 replicas, one per fake node.
    controller["policy"].update(
        {"max_replicas": MAX_WORKERS, "max_nodes": MAX_WORKERS, "scale_down_after_s": 5.0, "latency_target_s": 10.0}
    )
    return config


def test_backlog_brings_worker_nodes_that_drain_it_then_leave(fake_cluster: FakeCluster, moto_endpoint: str) -> None:
    stack_config = StackConfig(
        prefix=f"fc{uuid.uuid4().hex[:8]}", endpoint=moto_endpoint, visibility_timeout_s=30, max_receive_count=10
    )
    clients = AwsClients.for_stack(stack_config)
    stack = Stack(stack_config, clients, provision(stack_config, clients))
    http_port = int(fake_cluster.http.rsplit(":", 1)[1])
    deploy(_serve_config(stack_config, http_port, fake_cluster.dashboard), fake_cluster.dashboard)
    wait_until(lambda: _answers(f"{fake_cluster.http}/docs"), 180, "the ingress did not start")
    # Serve deploys one replica at first; the controller's first decision (no work) takes it to zero.
    wait_until(lambda: fake_cluster.worker_nodes() == 0, 120, "the idle cluster did not settle on the head")

    # HTTP demand alone (the ingress reports its in-flight requests) brings up a replica to enrol with.
    enrol(fake_cluster.http, timeout=300)
    wait_until(lambda: fake_cluster.worker_nodes() == 0, 120, "the cluster did not go back to the head after enrolling")

    items, answers = numbered(MESSAGES)
    started = time.monotonic()
    ids = enqueue(stack, items)
    peak = 0

    def nodes_seen(at_least: int) -> bool:
        nonlocal peak
        peak = max(peak, fake_cluster.worker_nodes())
        return peak >= at_least

    wait_until(lambda: nodes_seen(1), 60, "no worker node came for the backlog")
    first_node = time.monotonic() - started
    responses = collect_responses(stack, MESSAGES, timeout=600)
    drained = time.monotonic() - started
    peak = max(peak, fake_cluster.worker_nodes())
    wait_until(lambda: fake_cluster.worker_nodes() == 0, 120, "workers were not removed after the queue emptied")
    back_to_head = time.monotonic() - started

    check_all_answered(stack, ids, answers, responses)
    assert len(responses) == MESSAGES  # no duplicates
    assert 2 <= peak <= MAX_WORKERS
    report = {
        "messages": MESSAGES,
        "seconds_to_first_worker_node": round(first_node, 1),
        "seconds_to_drained": round(drained, 1),
        "seconds_to_head_only": round(back_to_head, 1),
        "peak_worker_nodes": peak,
    }
    print(json.dumps(report))
    if target := os.environ.get("FACEREC_FAKE_CLUSTER_REPORT"):
        Path(target).write_text(json.dumps(report, indent=1) + "\n")
