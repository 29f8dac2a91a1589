"""The queue-depth controller: SQS backlog and Serve's in-flight requests in, worker nodes and replicas out.

Every ``period_s`` it reads the request queue's backlog (visible + in flight) and the requests the ingress
replicas report in flight, runs :func:`cluster.policy.decide`, and acts only through Ray:

* nodes: ``ray.autoscaler.sdk.request_resources(bundles=[node_bundle] * nodes)``; each call replaces the
  previous request, so zero nodes clears it and the autoscaler's idle timeout then removes the workers;
* replicas: Serve's external scaling API (``POST /api/v1/applications/<app>/deployments/<name>/scale`` on the
  dashboard), which the Recognizer's application allows with ``external_scaler_enabled: true``.

It never calls EC2 and never asks for more than the policy's caps. Every decision is logged with its inputs,
and backlog, demand, desired and actual replicas and nodes are exported as ``facerec_controller_*`` metrics on
the Ray dashboard.

It runs as a one-replica Serve application on the head (``cluster/serve_config.yaml``), so Serve restarts it
if it dies. :class:`QueueController` holds the loop's logic without Ray or AWS so that it can be tested alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import requests
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayError
from ray.serve import Application

from aws_stack.clients import AwsClients, aws_client
from aws_stack.stack import StackConfig, queue_counts, queue_urls
from cluster.load_balancer import LoadBalancerArgs, TargetSync, alive_nodes
from cluster.policy import Decision, Observation, PolicyConfig, PolicyState, decide
from serve_app.deployments.supervision import BackgroundTasks, Supervised
from serve_app.metrics import controller_gauges

# Serve writes this logger to the replica's log file (and the dashboard): every decision is visible there.
log = logging.getLogger(f"ray.serve.{__name__}")


class PerNodeDeployment(BaseModel):
    """A deployment with one replica on every worker node the controller asks for (a node-local consumer)."""

    app: str
    deployment: str
    #: Replicas beyond one per worker node (the head's standby ingress).
    plus: int = Field(0, ge=0)


class ControllerArgs(BaseModel):
    """Application arguments of the controller (the ``args:`` of the ``controller`` application)."""

    stack: StackConfig = Field(default_factory=StackConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    period_s: float = Field(5.0, gt=0, description="seconds between decisions")
    recognition_app: str = "facerec"
    recognizer_deployment: str = "Recognizer"
    #: What one worker node offers the Recognizer: the custom resource only worker node types advertise.
    node_bundle: dict[str, float] = Field(default_factory=lambda: {"recognizer": 1.0})
    dashboard_url: str = Field("http://127.0.0.1:8265", description="the head's dashboard (Serve's scaling API)")
    #: Ingress reports older than this are ignored (the replica that sent them has gone).
    report_ttl_s: float = Field(15.0, gt=0)
    #: The load balancer whose targets follow the nodes (the workers' proxies, or the head's while none runs).
    load_balancer: LoadBalancerArgs | None = None
    #: Set to the node count with every node decision (their applications need ``external_scaler_enabled``).
    #: An application that is not deployed is skipped: the Recognizer's scaling never waits on it.
    per_node: list[PerNodeDeployment] = Field(default_factory=list)


class Actuator(Protocol):
    def set_nodes(self, nodes: int) -> None: ...

    def set_replicas(self, replicas: int) -> None: ...


@dataclass(frozen=True)
class Step:
    """One period: what was observed and what was decided."""

    observation: Observation
    decision: Decision
    applied: bool


def utc_hour(epoch_s: float) -> float:
    """Hour of the day in UTC: the policy's ``warm_hours`` are UTC, whatever the head's time zone."""
    return (epoch_s % 86400.0) / 3600.0


def utc_hour_now() -> float:
    return utc_hour(time.time())


class QueueController:
    """The control loop's body: observe, decide, act on change (or after a failed act), log."""

    def __init__(
        self,
        policy: PolicyConfig,
        backlog: Callable[[], int],
        ongoing: Callable[[], int],
        actuator: Actuator,
        clock: Callable[[], float] = time.monotonic,
        hour_of_day: Callable[[], float] = utc_hour_now,
    ) -> None:
        self._policy = policy
        self._backlog = backlog
        self._ongoing = ongoing
        self._actuator = actuator
        self._clock = clock
        self._hour_of_day = hour_of_day
        self._state = PolicyState()
        self._applied: tuple[int, int] | None = None

    def step(self) -> Step:
        observation = Observation(
            now=self._clock(), backlog=self._backlog(), ongoing=self._ongoing(), hour_of_day=self._hour_of_day()
        )
        decision = decide(observation, self._state, self._policy)
        self._state = decision.state
        wanted = (decision.replicas, decision.nodes)
        applied = False
        if wanted != self._applied:
            # Nodes first: replicas asked for before their nodes exist just wait in Serve's pending state.
            self._actuator.set_nodes(decision.nodes)
            self._actuator.set_replicas(decision.replicas)
            self._applied, applied = wanted, True
        log.info(
            "backlog=%d ongoing=%d -> replicas=%d nodes=%d (%s)%s",
            observation.backlog,
            observation.ongoing,
            decision.replicas,
            decision.nodes,
            decision.reason,
            " applied" if applied else "",
        )
        return Step(observation, decision, applied)


class InFlightReports:
    """The latest in-flight count from each ingress replica, expired after ``ttl_s``."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._reports: dict[str, tuple[float, int]] = {}
        # report() runs on Serve's request threads and total() on the loop's worker thread: without the lock a
        # report landing mid-iteration raises (or is lost with the rebuilt dictionary).
        self._lock = threading.Lock()

    def report(self, source: str, in_flight: int) -> None:
        with self._lock:
            self._reports[source] = (self._clock(), max(0, in_flight))

    def total(self) -> int:
        now = self._clock()
        with self._lock:
            for source in [k for k, (at, _) in self._reports.items() if now - at > self._ttl_s]:
                del self._reports[source]
            return sum(count for _, count in self._reports.values())


#: How often a per-node deployment's count is set again even though the decision did not change.
PER_NODE_REFRESH_S = 60.0


class RayActuator:
    """Nodes through the autoscaler SDK, replicas through Serve's external scaling API."""

    def __init__(self, args: ControllerArgs, clock: Callable[[], float] = time.monotonic) -> None:
        self._bundle = dict(args.node_bundle)
        self._dashboard = args.dashboard_url.rstrip("/")
        self._recognizer = (args.recognition_app, args.recognizer_deployment)
        self._per_node = {(d.app, d.deployment): d.plus for d in args.per_node}
        self._clock = clock
        self._nodes: int | None = None
        #: What each per-node deployment was last set to, and when (absent: not set, or not deployed then).
        self._per_node_set: dict[tuple[str, str], tuple[int, float]] = {}
        self._missing: set[tuple[str, str]] = set()

    def set_nodes(self, nodes: int) -> None:
        """Ask the autoscaler for ``nodes`` worker nodes, and one replica of each per-node deployment on each."""
        from ray.autoscaler.sdk import request_resources

        if nodes > 0:
            request_resources(bundles=[dict(self._bundle) for _ in range(nodes)])
        else:
            request_resources(num_cpus=0)  # clears the standing request; idle workers then time out
        self._nodes = nodes
        self.keep_per_node()

    def keep_per_node(self) -> None:
        """Set each per-node deployment to the node count, where it differs from what was set or was set over a
        minute ago: an application deployed (or redeployed) after the decision gets its count within a period."""
        if self._nodes is None:
            return
        now = self._clock()
        for target, plus in self._per_node.items():
            wanted = self._nodes + plus
            last = self._per_node_set.get(target)
            if last is not None and last[0] == wanted and now - last[1] < PER_NODE_REFRESH_S:
                continue
            if self._scale(*target, wanted, missing_ok=True):
                self._per_node_set[target] = (wanted, now)
                self._missing.discard(target)
            else:
                self._per_node_set.pop(target, None)
                if target not in self._missing:  # said once, not every period
                    log.info("per-node deployment %s/%s is not deployed: left alone until it is", *target)
                    self._missing.add(target)

    def set_replicas(self, replicas: int) -> None:
        self._scale(*self._recognizer, replicas)

    def _scale(self, app: str, deployment: str, replicas: int, missing_ok: bool = False) -> bool:
        """Serve's external scaling API; False when the application is not deployed and ``missing_ok``."""
        url = f"{self._dashboard}/api/v1/applications/{app}/deployments/{deployment}/scale"
        response = requests.post(url, json={"target_num_replicas": replicas}, headers=_dashboard_headers(), timeout=10)
        if response.status_code == 404 and missing_ok:
            return False
        if response.status_code != 200:
            raise RuntimeError(f"Serve scaling API answered {response.status_code}: {response.text[:300]}")
        return True


def _dashboard_headers() -> dict[str, str]:
    """Ray's bearer token when the cluster runs with token authentication."""
    headers: dict[str, str] = {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    token_file = Path.home() / ".ray" / "auth_token"
    if not token and os.environ.get("RAY_AUTH_MODE", "") != "disabled" and token_file.is_file():
        token = token_file.read_text().strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


class SqsBacklog:
    """ApproximateNumberOfMessages + ApproximateNumberOfMessagesNotVisible of the request queue."""

    def __init__(self, stack: StackConfig) -> None:
        clients = AwsClients.for_stack(stack)
        self._sqs = clients.sqs
        self._url = queue_urls(stack, clients).requests

    def __call__(self) -> int:
        counts = queue_counts(self._sqs, self._url)
        return counts["visible"] + counts["in_flight"]


def cluster_state(app: str, deployment: str, node_bundle: dict[str, float]) -> tuple[int, int]:
    """(running Recognizer replicas, alive nodes offering ``node_bundle``), for the metrics."""
    import ray

    replicas = 0
    application = serve.status().applications.get(app)
    if application is not None and deployment in application.deployments:
        replicas = application.deployments[deployment].replica_states.get("RUNNING", 0)  # type: ignore[call-overload]
    nodes = 0
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        resources = node.get("Resources", {})
        if node.get("Alive") and all(resources.get(key, 0) >= amount for key, amount in node_bundle.items()):
            nodes += 1
    return int(replicas), nodes


class ControllerDeployment(Supervised):
    """The Serve deployment that runs the loop (one replica, on the head)."""

    def __init__(self, args: ControllerArgs) -> None:
        self._args = args
        self._reports = InFlightReports(args.report_ttl_s)
        self._actuator = RayActuator(args)
        self._targets: TargetSync | None = None
        if args.load_balancer is not None:
            elbv2 = aws_client("elbv2", region=args.stack.region, endpoint=args.stack.endpoint)
            self._targets = TargetSync(elbv2, args.load_balancer)
        self._controller = QueueController(args.policy, SqsBacklog(args.stack), self._reports.total, self._actuator)
        self._gauges = controller_gauges()
        self._last: dict[str, object] = {}
        self._background = BackgroundTasks()
        self._background.start("controller loop", self._run())

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                step = await asyncio.to_thread(self._controller.step)
                await asyncio.to_thread(self._actuator.keep_per_node)
                if self._targets is not None:
                    workers, head = await asyncio.to_thread(alive_nodes, next(iter(self._args.node_bundle)))
                    await asyncio.to_thread(self._targets.sync, workers, head)
                replicas, nodes = await asyncio.to_thread(
                    cluster_state, self._args.recognition_app, self._args.recognizer_deployment, self._args.node_bundle
                )
                self._publish(step, replicas, nodes)
            except (BotoCoreError, ClientError, requests.RequestException, RuntimeError, RayError):
                # A failed read or act is retried next period (the controller re-applies until it succeeds).
                log.exception("controller step failed")
            await asyncio.sleep(max(0.0, self._args.period_s - (time.monotonic() - started)))

    def _publish(self, step: Step, replicas: int, nodes: int) -> None:
        values = {
            "backlog": step.observation.backlog,
            "ongoing": step.observation.ongoing,
            "desired_replicas": step.decision.replicas,
            "desired_nodes": step.decision.nodes,
            "actual_replicas": replicas,
            "actual_nodes": nodes,
            # The policy's bounds beside its decisions: the alert rules compare against them.
            "max_nodes": self._args.policy.max_nodes,
            "latency_target_s": self._args.policy.latency_target_s,
        }
        for name, value in values.items():
            self._gauges[name].set(value)
        self._last = {**values, "reason": step.decision.reason, "at": time.time()}

    def report(self, source: str, in_flight: int) -> None:
        """Called by each ingress replica every few seconds with the requests it holds."""
        self._reports.report(source, in_flight)

    def status(self) -> dict[str, object]:
        """The last observation and decision (for `facerec` tooling and tests)."""
        return dict(self._last)

    def __del__(self) -> None:
        if hasattr(self, "_background"):  # absent when __init__ failed
            self._background.stop_all()


def build_controller(args: dict[str, object] | ControllerArgs) -> Application:
    """``import_path: cluster.controller:build_controller`` in the Serve config."""
    config = args if isinstance(args, ControllerArgs) else ControllerArgs.model_validate(args)
    deployment = serve.deployment(
        name="QueueController", num_replicas=1, max_ongoing_requests=100, ray_actor_options={"num_cpus": 0}
    )(ControllerDeployment)
    return deployment.bind(config)
