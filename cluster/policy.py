"""The scaling policy: from queue backlog and in-flight work to Recognizer replicas and worker nodes.

A pure function (no Ray, no AWS, no clock of its own), so it is tested table by table and replayed by the
simulator exactly as the controller runs it.

The rule:

* **Capacity per replica.** A replica finishes one image every ``service_time_s`` seconds (measured: batched
  detect + embed on one worker), so within ``latency_target_s`` it can clear ``latency_target_s /
  service_time_s`` images. That is the backlog one replica may carry.
* **Demand** = SQS backlog (visible + in flight) + requests in flight in Serve.
  ``wanted = ceil(demand / capacity)``, clamped to ``[min_replicas, max_replicas]``; any demand at all wants at
  least one replica.
* **Up fast:** if ``wanted`` exceeds the current target, the target jumps to ``wanted`` at once.
* **Down slowly, with hysteresis:** the target only drops once demand has stayed below what one replica fewer
  could carry, discounted by ``hysteresis``, for ``scale_down_after_s`` seconds; then it drops to ``wanted``
  (zero when the queue is empty and nothing is in flight).
* **Nodes** = ``ceil(target / replicas_per_node)``, capped at ``max_nodes``: these are the worker nodes asked of
  Ray's autoscaler.

Two options, both off by default: in the simulator neither lowered p95 on the README's burst and day traces
without costing more than 10 % more node-minutes (the comparison is in the README, "Scaling policy").

* **Warm hours** (``warm_hours``, ``warm_replicas``): between those hours of the day (UTC) the floor is
  ``warm_replicas`` instead of ``min_replicas``, so a worker is already up when the first request of the day comes.
* **Trend** (``trend_lookahead_s``): the demand is projected ``trend_lookahead_s`` ahead along its recent growth
  (a smoothed rate of change between decisions: the arrival rate less what the running replicas clear), so that
  nodes that take that long to start are asked for before the backlog has grown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field, field_validator


class PolicyConfig(BaseModel):
    """The rule's settings: the controller application's ``policy`` argument and the simulator's, one schema."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    service_time_s: float = Field(
        0.1, gt=0, description="seconds one replica spends per image (measured, batched): the capacity estimate"
    )
    latency_target_s: float = Field(
        10.0, gt=0, description="how long an image may wait in the backlog (backlog per replica = this / service)"
    )
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(16, ge=1)
    replicas_per_node: int = Field(1, ge=1)
    max_nodes: int = Field(16, ge=0)
    scale_down_after_s: float = Field(60.0, ge=0, description="demand stays low this long before replicas go")
    hysteresis: float = Field(
        0.2, ge=0, lt=1, description="fraction of the next-lower capacity demand must stay under to count as low"
    )
    warm_hours: tuple[float, float] | None = Field(
        None, description="[start, end) hours of the day, UTC, in which warm_replicas is the floor; None: never"
    )
    warm_replicas: int = Field(1, ge=0, description="the floor during warm_hours")
    trend_lookahead_s: float = Field(
        0.0, ge=0, description="scale for the demand projected this far ahead along its growth; 0: off"
    )
    trend_smoothing: float = Field(
        0.5, gt=0, le=1, description="weight of the newest growth rate in its running average (1: no smoothing)"
    )

    @field_validator("warm_hours")
    @classmethod
    def _hours_of_a_day(cls, hours: tuple[float, float] | None) -> tuple[float, float] | None:
        if hours is not None and not all(0.0 <= hour <= 24.0 for hour in hours):
            raise ValueError("warm_hours are hours of the day, 0 to 24")
        return hours

    @property
    def images_per_replica(self) -> float:
        return max(1.0, self.latency_target_s / self.service_time_s)


@dataclass(frozen=True)
class Observation:
    now: float
    #: ApproximateNumberOfMessages + ApproximateNumberOfMessagesNotVisible of the request queue.
    backlog: int
    #: Requests in flight in Serve (HTTP and queue traffic the Recognizer holds).
    ongoing: int = 0
    #: Hour of the day, UTC (0 <= hour < 24), for ``warm_hours``; None: unknown, no warm floor.
    hour_of_day: float | None = None

    @property
    def demand(self) -> int:
        return max(0, self.backlog) + max(0, self.ongoing)


@dataclass(frozen=True)
class PolicyState:
    replicas: int = 0
    #: When demand was last too high to drop a replica (None: never observed): the cool-down counts from here.
    last_busy: float | None = None
    #: The previous observation's demand and time, and the smoothed growth rate (images/s), for the trend.
    last_demand: int | None = None
    last_seen: float | None = None
    demand_rate: float = 0.0


@dataclass(frozen=True)
class Decision:
    replicas: int
    nodes: int
    reason: str
    state: PolicyState


def wanted_replicas(demand: int, config: PolicyConfig, floor: int | None = None) -> int:
    """Replicas for ``demand``, at least ``floor`` (default ``min_replicas``), at most ``max_replicas``."""
    floor = config.min_replicas if floor is None else floor
    if demand <= 0:
        return floor
    wanted = math.ceil(demand / config.images_per_replica)
    return max(floor, min(config.max_replicas, max(1, wanted)))


def floor_replicas(observation: Observation, config: PolicyConfig) -> int:
    """``min_replicas``, raised to ``warm_replicas`` inside ``warm_hours`` (a window may wrap past midnight)."""
    if config.warm_hours is None or observation.hour_of_day is None:
        return config.min_replicas
    start, end = config.warm_hours
    hour = observation.hour_of_day % 24.0
    inside = start <= hour < end if start <= end else hour >= start or hour < end
    return max(config.min_replicas, config.warm_replicas) if inside else config.min_replicas


def projected_demand(observation: Observation, state: PolicyState, config: PolicyConfig) -> tuple[int, float]:
    """The demand to scale for (the observed one while the trend is off), and the smoothed growth rate to carry."""
    demand, now = observation.demand, observation.now
    rate = state.demand_rate
    if state.last_demand is not None and state.last_seen is not None and now > state.last_seen:
        newest = (demand - state.last_demand) / (now - state.last_seen)
        rate = config.trend_smoothing * newest + (1.0 - config.trend_smoothing) * rate
    if config.trend_lookahead_s <= 0 or rate <= 0:
        return demand, rate
    return demand + math.ceil(rate * config.trend_lookahead_s), rate


def nodes_for(replicas: int, config: PolicyConfig) -> int:
    return min(config.max_nodes, math.ceil(replicas / max(1, config.replicas_per_node)))


def decide(observation: Observation, state: PolicyState, config: PolicyConfig) -> Decision:
    """The replica target and node count for this period, and the state to carry to the next."""
    now, current = observation.now, state.replicas
    demand, rate = projected_demand(observation, state, config)
    wanted = wanted_replicas(demand, config, floor_replicas(observation, config))
    seen = f"demand {observation.demand}" + (f" (projected {demand})" if demand != observation.demand else "")
    if wanted > current:
        target, reason, new_state = wanted, f"scale up: {seen} needs {wanted}", PolicyState(wanted, now)
    elif wanted == current or _busy(demand, current, config):
        target, reason, new_state = current, f"steady: {seen} for {current}", PolicyState(current, now)
    else:
        low_since = state.last_busy if state.last_busy is not None else now
        low_for = now - low_since
        if low_for >= config.scale_down_after_s:
            target, reason, new_state = (
                wanted,
                f"scale down: {seen} low for {low_for:.0f}s",
                PolicyState(wanted, now),
            )
        else:
            target, reason, new_state = (
                current,
                f"cool-down: {seen} low for {low_for:.0f}s",
                PolicyState(current, low_since),
            )
    new_state = replace(new_state, last_demand=observation.demand, last_seen=now, demand_rate=rate)
    return Decision(target, nodes_for(target, config), reason, new_state)


def _busy(demand: int, replicas: int, config: PolicyConfig) -> bool:
    """Demand above what one replica fewer could carry, less the hysteresis margin."""
    if replicas <= 0:
        return demand > 0
    lower_capacity = (replicas - 1) * config.images_per_replica * (1.0 - config.hysteresis)
    return demand > lower_capacity
