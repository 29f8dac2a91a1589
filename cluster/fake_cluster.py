"""A fake multi-node Ray cluster on this machine, for the cluster's tests and benchmarks.

A real Ray head started with ``RAY_FAKE_CLUSTER=1`` and Ray's v1 autoscaler on the ``fake_multinode`` provider:
every "worker node" the autoscaler starts is a real raylet on this machine, on 127.0.0.1, with the resources of
its node type. Nodes come and go exactly as on EC2 (``request_resources``, ``min_workers``, the idle timeout), so
the placement of every deployment and the controller's decisions can be tried without a cloud.

Everything it starts is ended by pid: the ``ray start --block`` process group, then any process whose command line
names this cluster's own temporary directory. ``ray stop`` is never used (it would end every Ray process on the
machine, another test's or a ``make run`` too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from cluster.serve_tuning import WORKER_PROXY_PORT, serve_tuning

RAY = Path(sys.executable).with_name("ray")
CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
#: Every other port the head opens, each a free one (another Ray may be running on this machine).
PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "metrics-export-port",
    "ray-client-server-port",
    "runtime-env-agent-port",
)
#: The environment that keeps Ray on loopback, quiet, and without token authentication (platform notes).
RAY_ENVIRONMENT = {
    "RAY_FAKE_CLUSTER": "1",
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


#: A folder to copy the cluster's logs into when it is torn down (unset: they go with the cluster).
KEEP_LOGS_ENV = "FACEREC_FAKE_CLUSTER_LOGS"


class FakeClusterError(RuntimeError):
    """The fake cluster did not come up, or a condition on it did not hold in time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class WorkerType:
    """One worker node type: its resources, and how many of it the autoscaler keeps and may start."""

    name: str
    resources: dict[str, float]
    min_workers: int = 0
    max_workers: int = 3


def cluster_worker_resources(cpus: float, node_type: str = "cpu_worker") -> dict[str, float]:
    """What ``node_type`` advertises in cluster.yaml (its custom resources), with ``cpus`` CPUs: this machine's
    share instead of the instance's."""
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    resources = {k: float(v) for k, v in config["available_node_types"][node_type]["resources"].items()}
    resources["CPU"] = cpus
    return resources


def cluster_head_resources(cpus: float) -> dict[str, float]:
    """What cluster.yaml's head advertises (its one standby ``ingress``, no ``recognizer``), with ``cpus`` CPUs."""
    return cluster_worker_resources(cpus, node_type="head")


@dataclass(frozen=True)
class HeadNode:
    #: The head's resources: cluster.yaml's, with one logical CPU (no per-image deployment may land there).
    resources: dict[str, float] = field(default_factory=lambda: cluster_head_resources(1))


def autoscaling_config(gcs_port: int, head: HeadNode, workers: list[WorkerType]) -> dict[str, Any]:
    """cluster.yaml's shape for the fake provider: the head, and each worker type with its resources."""
    node_types: dict[str, Any] = {
        "ray.head.default": {"resources": head.resources, "node_config": {}, "max_workers": 0}
    }
    for worker in workers:
        node_types[worker.name] = {
            "resources": worker.resources,
            "node_config": {},
            "min_workers": worker.min_workers,
            "max_workers": worker.max_workers,
        }
    return {
        "cluster_name": "fake-facerec",
        "max_workers": sum(w.max_workers for w in workers),
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
        "available_node_types": node_types,
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


@dataclass(frozen=True)
class FakeCluster:
    """A running fake cluster: its dashboard, Serve's HTTP ports (free, not yet listening), and its temp dir."""

    dashboard: str
    #: The head's proxy (the config's ``http_options.port``).
    http_port: int
    #: Every worker node's proxy, all on one port of this machine (Serve binds it with SO_REUSEPORT, so the kernel
    #: spreads connections over the workers' proxies: the load balancer of the cluster).
    worker_http_port: int
    gcs_address: str
    temp: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def workers_http(self) -> str:
        """The workers' proxies, as the cluster's load balancer reaches them."""
        return f"http://127.0.0.1:{self.worker_http_port}"

    def get(self, route: str, **params: int) -> Any:
        """A dashboard API answer, as JSON."""
        response = requests.get(f"{self.dashboard}/{route}", params=params, timeout=10)
        response.raise_for_status()
        return response.json()

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The alive nodes as the state API lists them (``node_id``, ``is_head_node``, ``resources_total``...)."""
        nodes = self.get("api/v0/nodes", limit=1000, detail=1)["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def worker_nodes(self, resource: str = "recognizer") -> set[str]:
        """Ids of the alive nodes offering ``resource`` (the head offers none of the workers' resources)."""
        return {n["node_id"] for n in self.alive_nodes() if n.get("resources_total", {}).get(resource)}

    def head_node(self) -> str:
        return str(next(n["node_id"] for n in self.alive_nodes() if n.get("is_head_node")))


def _pids_naming(temp: Path) -> list[int]:
    """Processes whose command line names ``temp`` (only this cluster's Ray processes do)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if str(temp).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5) -> None:
    """Poll ``condition()`` until it holds; :class:`FakeClusterError` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if condition():
                return
        time.sleep(interval)
    raise FakeClusterError(f"timed out after {timeout:.0f}s: {what}")


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
        with contextlib.suppress(FakeClusterError):  # what survives SIGTERM gets SIGKILL next
            wait_for(lambda: not _pids_naming(temp), 15, "processes outlived the signal")


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def fake_cluster(
    workers: list[WorkerType],
    head: HeadNode | None = None,
    environment: dict[str, str] | None = None,
    start_timeout_s: float = 90.0,
) -> Iterator[FakeCluster]:
    """Start a fake cluster's head (the autoscaler then starts workers as asked), yield it, end it by pid.

    Every Ray process of the cluster starts with the Serve settings each cluster node starts with
    (``cluster/serve_tuning.env``; the workers' proxy port is a free one here), and ``environment`` on top (the AWS
    endpoint, say).
    """
    # A short path: Ray's socket paths live under it and must stay under 108 characters.
    temp = Path(tempfile.mkdtemp(prefix="rfc", dir="/tmp"))
    config = temp / "autoscaling.json"
    dashboard_port, http_port, worker_http_port, gcs_port = free_port(), free_port(), free_port(), free_port()
    config.write_text(json.dumps(autoscaling_config(gcs_port, head or HeadNode(), workers)))
    env = {
        **os.environ,
        **serve_tuning(),
        WORKER_PROXY_PORT: str(worker_http_port),
        **RAY_ENVIRONMENT,
        **(environment or {}),
    }
    head_resources = (head or HeadNode()).resources
    head_cpus = int(head_resources.get("CPU", 1))
    # `ray up` gives the head its node type's resources (RAY_OVERRIDE_RESOURCES); a head started by hand needs
    # them on its command line (the autoscaling config's head entry is only the autoscaler's bookkeeping).
    custom = {name: amount for name, amount in head_resources.items() if name not in ("CPU", "GPU", "memory")}
    with (temp / "head.log").open("wb") as log:
        process = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--disable-usage-stats", f"--num-cpus={head_cpus}"]
            + [f"--resources={json.dumps(custom)}"]
            + ["--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
            + [f"--port={gcs_port}"]
            + [f"--{flag}={free_port()}" for flag in PORT_FLAGS]
            + [f"--autoscaling-config={config}", f"--temp-dir={temp}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    cluster = FakeCluster(
        f"http://127.0.0.1:{dashboard_port}", http_port, worker_http_port, f"127.0.0.1:{gcs_port}", temp
    )
    try:
        for route in ("api/v0/nodes", "api/serve/applications/"):
            url = f"{cluster.dashboard}/{route}"
            wait_for(lambda url=url: _answers(url), start_timeout_s, f"the head's dashboard: no /{route}")  # type: ignore[misc]
        yield cluster
    finally:
        _end_processes_of(process, temp)
        if keep := os.environ.get(KEEP_LOGS_ENV):  # every node's logs, for a failure to be read afterwards
            with contextlib.suppress(OSError):
                shutil.copytree(temp / "session_latest" / "logs", Path(keep) / temp.name, symlinks=False)
        shutil.rmtree(temp, ignore_errors=True)
