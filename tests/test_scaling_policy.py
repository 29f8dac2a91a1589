"""The scaling policy, table by table: pure function, no Ray, no AWS."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

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


# Warm hours: between 08:00 and 20:00 UTC one replica stays up with nothing to do.
WARM = PolicyConfig(service_time_s=0.1, latency_target_s=10.0, max_replicas=8, warm_hours=(8, 20))


@pytest.mark.parametrize(("hour", "replicas"), [(7.99, 0), (8.0, 1), (13.5, 1), (19.99, 1), (20.0, 0), (None, 0)])
def test_warm_hours_keep_a_replica_up_with_no_demand(hour: float | None, replicas: int) -> None:
    assert decide(Observation(0.0, 0, hour_of_day=hour), PolicyState(), WARM).replicas == replicas


@pytest.mark.parametrize(("hour", "replicas"), [(23.0, 1), (3.0, 1), (6.0, 0), (12.0, 0)])
def test_warm_hours_may_wrap_past_midnight(hour: float, replicas: int) -> None:
    night = PolicyConfig(warm_hours=(22, 6), warm_replicas=1)
    assert decide(Observation(0.0, 0, hour_of_day=hour), PolicyState(), night).replicas == replicas


def test_warm_hours_raise_the_floor_not_the_demand() -> None:
    assert decide(Observation(0.0, 250, hour_of_day=10.0), PolicyState(), WARM).replicas == 3


def test_after_warm_hours_the_replica_goes_after_the_cool_down() -> None:
    state, replicas = PolicyState(), []
    for now, hour in [(0.0, 19.9), (5.0, 19.99), (10.0, 20.0), (40.0, 20.01), (71.0, 20.02)]:
        decision = decide(Observation(now, 0, hour_of_day=hour), state, WARM)
        state = decision.state
        replicas.append(decision.replicas)
    assert replicas == [1, 1, 1, 1, 0]  # low since t=5, the 60 s cool-down ends at t=65


def test_warm_hours_are_hours_of_a_day() -> None:
    with pytest.raises(ValidationError):
        PolicyConfig(warm_hours=(8, 25))


# Trend: the demand projected 60 s ahead along its smoothed growth (half the newest rate, half the last average).
TREND = PolicyConfig(**{**CONFIG.model_dump(), "trend_lookahead_s": 60.0})


def test_trend_asks_for_replicas_before_the_backlog_needs_them() -> None:
    growing = [(0.0, 0), (5.0, 50), (10.0, 100)]  # +10 images/s
    assert [d.replicas for d in run(growing)] == [0, 1, 1]
    with_trend = run(growing, TREND)
    # t=5: rate 5/s -> 50 + 300 = 350 -> 4 replicas; t=10: rate 7.5/s -> 100 + 450 = 550 -> 6.
    assert [d.replicas for d in with_trend] == [0, 4, 6]
    assert [d.nodes for d in with_trend] == [0, 2, 3]
    assert with_trend[1].reason == "scale up: demand 50 (projected 350) needs 4"


def test_trend_ignores_falling_demand() -> None:
    falling = [(0.0, 500), (5.0, 300), (10.0, 100)]
    assert [d.replicas for d in run(falling, TREND)] == [d.replicas for d in run(falling)] == [5, 5, 5]
