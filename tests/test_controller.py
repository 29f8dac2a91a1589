"""The controller's loop body against stand-in inputs and a recording actuator (no Ray, no AWS).

The policy itself is tested table by table in test_scaling_policy.py; here: what reaches the actuator, when.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from pydantic import ValidationError

from cluster.controller import ControllerArgs, InFlightReports, QueueController, utc_hour
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
