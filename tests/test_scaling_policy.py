"""The scaling policy, table by table: pure function, no Ray, no AWS."""

from __future__ import annotations

import pytest

from cluster.policy import Decision, Observation, PolicyConfig, PolicyState, decide, nodes_for, wanted_replicas

# 0.1 s per image and a 10 s latency target: one replica carries a backlog of 100 images.
CONFIG = PolicyConfig(service_time_s=0.1, latency_target_s=10.0, max_replicas=8, replicas_per_node=2, max_nodes=4)


@pytest.mark.parametrize(
    ("demand", "replicas"),
    [(0, 0), (1, 1), (100, 1), (101, 2), (350, 4), (800, 8), (10_000, 8)],
)
def test_wanted_replicas(demand: int, replicas: int) -> None:
    assert wanted_replicas(demand, CONFIG) == replicas


def test_minimum_replicas_hold_even_when_idle() -> None:
    assert wanted_replicas(0, PolicyConfig(min_replicas=1)) == 1


@pytest.mark.parametrize(("replicas", "nodes"), [(0, 0), (1, 1), (2, 1), (3, 2), (8, 4), (12, 4)])
def test_nodes_follow_replicas_and_are_capped(replicas: int, nodes: int) -> None:
    assert nodes_for(replicas, CONFIG) == nodes


# (previous replicas, last_busy, now, backlog, ongoing) -> (replicas, nodes, reason starts with)
TABLE = [
    # From zero: any work at all starts a replica (and its node) at once.
    ((0, None), 0.0, 1, 0, (1, 1, "scale up")),
    ((0, None), 0.0, 0, 3, (1, 1, "scale up")),
    # A burst jumps straight to what it needs, not one step at a time.
    ((1, 0.0), 5.0, 700, 16, (8, 4, "scale up")),
    # Load that one replica fewer could not carry (with 20% margin) holds the replicas.
    ((4, 0.0), 100.0, 250, 0, (4, 2, "steady")),
    # Low load waits out the cool-down period...
    ((4, 0.0), 30.0, 50, 0, (4, 2, "cool-down")),
    # ...then drops straight to what it needs.
    ((4, 0.0), 61.0, 50, 0, (1, 1, "scale down")),
    # An empty queue with nothing in flight ends at zero replicas and zero worker nodes.
    ((1, 0.0), 60.0, 0, 0, (0, 0, "scale down")),
    ((1, 0.0), 59.0, 0, 0, (1, 1, "cool-down")),
    # Hysteresis: 4 replicas, demand 260 > 3 x 100 x 0.8 = 240: not low enough to drop even one.
    ((4, 0.0), 500.0, 260, 0, (4, 2, "steady")),
    # Demand 230 < 240: counts as low, and after the cool-down goes to ceil(230/100) = 3.
    ((4, 0.0), 500.0, 230, 0, (3, 2, "scale down")),
]


@pytest.mark.parametrize(("previous", "now", "backlog", "ongoing", "expected"), TABLE)
def test_policy_table(
    previous: tuple[int, float | None], now: float, backlog: int, ongoing: int, expected: tuple[int, int, str]
) -> None:
    decision = decide(Observation(now, backlog, ongoing), PolicyState(*previous), CONFIG)
    assert (decision.replicas, decision.nodes) == expected[:2]
    assert decision.reason.startswith(expected[2])


def run(trace: list[tuple[float, int]], config: PolicyConfig = CONFIG) -> list[Decision]:
    state, decisions = PolicyState(), []
    for now, backlog in trace:
        decision = decide(Observation(now, backlog), state, config)
        decisions.append(decision)
        state = decision.state
    return decisions


def test_cool_down_restarts_when_load_returns() -> None:
    # Busy until t=10, quiet t=20..50, busy again at t=60, quiet after: the 60 s cool-down counts from t=60.
    trace = [(0.0, 500), (10.0, 500), (20.0, 0), (50.0, 0), (60.0, 500), (70.0, 0), (115.0, 0), (121.0, 0)]
    replicas = [d.replicas for d in run(trace)]
    assert replicas == [5, 5, 5, 5, 5, 5, 5, 0]


def test_never_exceeds_the_caps() -> None:
    decisions = run([(float(t), 10**6) for t in range(0, 100, 10)])
    assert max(d.replicas for d in decisions) == CONFIG.max_replicas
    assert max(d.nodes for d in decisions) == CONFIG.max_nodes
