"""The controller's loop body against stand-in inputs and a recording actuator (no Ray, no AWS).

The policy itself is tested table by table in test_scaling_policy.py; here: what reaches the actuator, when.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from cluster.controller import ControllerArgs, InFlightReports, QueueController, RayActuator, utc_hour
from cluster.policy import PolicyConfig

POLICY = PolicyConfig(service_time_s=0.1, latency_target_s=10.0, max_replicas=4, max_nodes=4, scale_down_after_s=30)


@dataclass
class Recorder:
    calls: list[tuple[str, int]] = field(default_factory=list)
    fail_next: bool = False

    def set_nodes(self, nodes: int) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("dashboard restarting")
        self.calls.append(("nodes", nodes))

    def set_replicas(self, replicas: int) -> None:
        self.calls.append(("replicas", replicas))


@dataclass
class World:
    backlog: int = 0
    ongoing: int = 0
    now: float = 0.0


def controller(world: World, actuator: Recorder) -> QueueController:
    return QueueController(POLICY, lambda: world.backlog, lambda: world.ongoing, actuator, clock=lambda: world.now)


def test_backlog_scales_up_at_once_and_acts_only_on_change() -> None:
    world, actuator = World(backlog=300), Recorder()
    loop = controller(world, actuator)
    step = loop.step()
    assert (step.decision.replicas, step.decision.nodes, step.applied) == (3, 3, True)
    assert actuator.calls == [("nodes", 3), ("replicas", 3)]  # nodes first, then replicas
    world.now = 5
    assert loop.step().applied is False
    assert len(actuator.calls) == 2


def test_ingress_requests_count_as_demand() -> None:
    world, actuator = World(backlog=0, ongoing=5), Recorder()
    assert controller(world, actuator).step().decision.replicas == 1
    assert actuator.calls == [("nodes", 1), ("replicas", 1)]


def test_never_asks_beyond_the_caps() -> None:
    world, actuator = World(backlog=1_000_000), Recorder()
    step = controller(world, actuator).step()
    assert (step.decision.replicas, step.decision.nodes) == (POLICY.max_replicas, POLICY.max_nodes)


def test_idle_queue_goes_to_zero_only_after_the_cool_down() -> None:
    world, actuator = World(backlog=250), Recorder()
    loop = controller(world, actuator)
    loop.step()
    world.backlog = 0
    for now in (5, 15, 29):
        world.now = now
        assert loop.step().decision.replicas == 3, f"scaled down too early at {now}s"
    world.now = 36
    step = loop.step()
    assert (step.decision.replicas, step.decision.nodes, step.applied) == (0, 0, True)
    assert actuator.calls[-2:] == [("nodes", 0), ("replicas", 0)]


def test_a_failed_action_is_retried_next_period() -> None:
    world, actuator = World(backlog=120), Recorder(fail_next=True)
    loop = controller(world, actuator)
    with pytest.raises(ConnectionError):
        loop.step()
    assert actuator.calls == []
    world.now = 5
    assert loop.step().applied is True
    assert actuator.calls == [("nodes", 2), ("replicas", 2)]


def test_in_flight_reports_sum_per_replica_and_expire() -> None:
    now = [0.0]
    reports = InFlightReports(ttl_s=10, clock=lambda: now[0])
    reports.report("ingress-a", 4)
    reports.report("ingress-b", 3)
    reports.report("ingress-a", 6)  # a newer report replaces the older one
    assert reports.total() == 9
    now[0] = 8
    reports.report("ingress-b", 1)
    now[0] = 12  # ingress-a last reported 12 s ago: gone
    assert reports.total() == 1


def test_the_controller_takes_the_policy_schema_itself() -> None:
    """One schema: the controller application's `policy` argument is validated into PolicyConfig directly."""
    args = ControllerArgs.model_validate({"policy": {"max_replicas": 4, "latency_target_s": 5}})
    assert args.policy == PolicyConfig(max_replicas=4, latency_target_s=5.0)
    with pytest.raises(ValidationError):
        ControllerArgs.model_validate({"policy": {"max_replicas": 0}})
    with pytest.raises(ValidationError, match="extra"):
        ControllerArgs.model_validate({"policy": {"max_replica": 4}})  # a misspelt key is an error, not ignored


@pytest.mark.parametrize(("hour", "replicas"), [(9.0, 1), (21.0, 0)])
def test_warm_hours_read_the_controllers_utc_clock(hour: float, replicas: int) -> None:
    warm = PolicyConfig(warm_hours=(8, 20))
    loop = QueueController(warm, lambda: 0, lambda: 0, Recorder(), clock=lambda: 0.0, hour_of_day=lambda: hour)
    assert loop.step().decision.replicas == replicas
    assert utc_hour(3 * 86400 + 9.5 * 3600) == 9.5


def test_reports_from_request_threads_never_break_or_lose_a_total() -> None:
    """Ingress replicas report on Serve's request threads while the loop's thread totals: no error, no loss."""
    reports = InFlightReports(ttl_s=3600)
    for i in range(2000):
        reports.report(f"old-{i}", 0)
    stop = threading.Event()
    sent: list[str] = []

    def report_forever() -> None:
        i = 0
        while not stop.is_set() and i < 200_000:
            reports.report(f"new-{i}", 1)
            sent.append(f"new-{i}")
            i += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows within a few totals
    reporter = threading.Thread(target=report_forever)
    reporter.start()
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            reports.total()
    finally:
        stop.set()
        reporter.join(timeout=30)
        sys.setswitchinterval(interval)
    assert reports.total() == len(sent)  # every report counted once, none lost by a concurrent total


def test_per_node_deployments_follow_the_node_count_and_a_missing_one_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SQS consumers get one replica per worker node; an application not (yet) deployed holds nothing up."""
    per_node = [("bridge", "SqsBridge", 0), ("absent", "X", 0), ("facerec", "Ingress", 1)]
    import ray.autoscaler.sdk

    posted: list[tuple[str, int]] = []

    class ScaleApi(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            posted.append((self.path, body["target_num_replicas"]))
            found = "/applications/absent/" not in self.path
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_: object) -> None:
            pass

    requested: list[object] = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **kw: requested.append(kw))
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScaleApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        args = ControllerArgs.model_validate(
            {
                "dashboard_url": f"http://127.0.0.1:{server.server_port}",
                "per_node": [{"app": app, "deployment": name, "plus": plus} for app, name, plus in per_node],
            }
        )
        now = [0.0]
        actuator = RayActuator(args, clock=lambda: now[0])
        actuator.keep_per_node()  # no decision yet: nothing to follow
        actuator.set_nodes(3)
        actuator.set_replicas(3)
        now[0] = 5.0
        actuator.keep_per_node()  # every period: the one set stays; the missing one is asked again
        now[0] = 70.0
        actuator.keep_per_node()  # a minute on: set again, in case a redeploy reset it
        actuator.set_nodes(0)
    finally:
        server.shutdown()
    assert requested == [{"bundles": [{"recognizer": 1.0}] * 3}, {"num_cpus": 0}]
    bridge, absent, ingress = (f"/api/v1/applications/{app}/deployments/{name}/scale" for app, name, _ in per_node)
    # The ingress gets one replica per worker node and one more: the head's standby.
    assert posted == [
        (bridge, 3),
        (absent, 3),
        (ingress, 4),
        ("/api/v1/applications/facerec/deployments/Recognizer/scale", 3),
        (absent, 3),
        (bridge, 3),
        (absent, 3),
        (ingress, 4),
        (bridge, 0),
        (absent, 0),
        (ingress, 1),
    ]
