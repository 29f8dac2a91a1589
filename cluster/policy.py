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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


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

    @property
    def demand(self) -> int:
        return max(0, self.backlog) + max(0, self.ongoing)


@dataclass(frozen=True)
class PolicyState:
    replicas: int = 0
    #: When demand was last too high to drop a replica (None: never observed): the cool-down counts from here.
    last_busy: float | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    nodes: int
    reason: str
    state: PolicyState


def wanted_replicas(demand: int, config: PolicyConfig) -> int:
    if demand <= 0:
        return config.min_replicas
    wanted = math.ceil(demand / config.images_per_replica)
    return max(config.min_replicas, min(config.max_replicas, max(1, wanted)))


def nodes_for(replicas: int, config: PolicyConfig) -> int:
    return min(config.max_nodes, math.ceil(replicas / max(1, config.replicas_per_node)))


def decide(observation: Observation, state: PolicyState, config: PolicyConfig) -> Decision:
    """The replica target and node count for this period, and the state to carry to the next."""
    demand, now, current = observation.demand, observation.now, state.replicas
    wanted = wanted_replicas(demand, config)
    if wanted > current:
        target, reason, new_state = wanted, f"scale up: demand {demand} needs {wanted}", PolicyState(wanted, now)
    elif wanted == current or _busy(demand, current, config):
        target, reason, new_state = current, f"steady: demand {demand} for {current}", PolicyState(current, now)
    else:
        low_since = state.last_busy if state.last_busy is not None else now
        low_for = now - low_since
        if low_for >= config.scale_down_after_s:
            target, reason, new_state = (
                wanted,
                f"scale down: demand {demand} low for {low_for:.0f}s",
                PolicyState(wanted, now),
            )
        else:
            target, reason, new_state = (
                current,
                f"cool-down: demand {demand} low for {low_for:.0f}s",
                PolicyState(current, low_since),
            )
    return Decision(target, nodes_for(target, config), reason, new_state)


def _busy(demand: int, replicas: int, config: PolicyConfig) -> bool:
    """Demand above what one replica fewer could carry, less the hysteresis margin."""
    if replicas <= 0:
        return demand > 0
    lower_capacity = (replicas - 1) * config.images_per_replica * (1.0 - config.hysteresis)
    return demand > lower_capacity
