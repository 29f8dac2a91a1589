"""Replay an arrival trace against a scaling rule, one simulated second at a time.

A new node takes ``startup_s`` to serve (EC2 boot, setup, Ray join, replica start: a start-up profile's phases
summed, see :mod:`cluster.startup_profile`) and, once no longer wanted, stays for ``idle_timeout_s`` (Ray's
autoscaler idle timeout) before it stops costing. A node wanted again inside that window serves again after
``reuse_s`` (the replica's start) instead of a new node being started; with ``reuse_s`` None (a bare
``--startup-s``) it is never reused. Each ready replica clears one image every ``service_time_s``. Images are
served first in, first out; latency is completion minus arrival. The run goes on past ``horizon_s`` until every
image has been answered, so late images count too.

Two rules are compared on the same trace:

* ``policy``: :func:`cluster.policy.decide`, evaluated every ``period_s`` as the controller does, told the hour
  of the day (the day trace spans one day over its horizon; ``start_hour`` is the hour of second 0); the run
  starts with the nodes the policy keeps when idle at that hour (a warm worker, if any) already up;
* ``legacy``: the original controller: one new instance per queued message, up to 19, and no scale-in of its
  own (instances stay until the end of the run).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.policy import Observation, PolicyConfig, PolicyState, decide

LEGACY_MAX_INSTANCES = 19


@dataclass(frozen=True)
class SimConfig:
    service_time_s: float = 0.1
    startup_s: float = 90.0
    #: Seconds for a node still inside its idle timeout to serve again; None: released nodes are never reused.
    reuse_s: float | None = None
    idle_timeout_s: float = 60.0
    period_s: float = 5.0
    horizon_s: int = 3600
    #: Hour of the day at second 0, and simulated seconds per day (the day trace squeezes a day into its horizon).
    start_hour: float = 0.0
    day_length_s: float = 86400.0
    #: The run stops this long after the horizon even if images are still waiting (a rule that never serves).
    overrun_limit_s: int = 7 * 86400

    def hour_of_day(self, second: float) -> float:
        return (self.start_hour + 24.0 * second / self.day_length_s) % 24.0


@dataclass
class Timeline:
    """Per-second series of one run, and each image's latency."""

    name: str
    backlog: list[int] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    node_seconds: float = 0.0
    drained_at: float | None = None

    def summary(self) -> dict[str, float | int | None]:
        latencies = np.asarray(self.latencies) if self.latencies else np.zeros(1)
        return {
            "images": len(self.latencies),
            "p50_latency_s": round(float(np.percentile(latencies, 50)), 1),
            "p95_latency_s": round(float(np.percentile(latencies, 95)), 1),
            "p99_latency_s": round(float(np.percentile(latencies, 99)), 1),
            "max_latency_s": round(float(latencies.max()), 1),
            "node_minutes": round(self.node_seconds / 60.0, 1),
            "peak_nodes": max(self.nodes) if self.nodes else 0,
            "nodes_at_end": self.nodes[-1] if self.nodes else 0,
            "drained_at_s": None if self.drained_at is None else round(self.drained_at, 1),
        }


@dataclass
class _Node:
    ready_at: float
    #: When a released node stops costing; None while it is wanted.
    leaving_at: float | None = None


def burst_trace(images: int, horizon_s: int) -> np.ndarray:
    arrivals = np.zeros(horizon_s, dtype=np.int64)
    arrivals[0] = images
    return arrivals


def day_trace(images: int, horizon_s: int, seed: int = 0) -> np.ndarray:
    """A day compressed into ``horizon_s``: a morning and a larger evening peak over a quiet base."""
    t = np.linspace(0.0, 24.0, horizon_s, endpoint=False)
    shape = 0.05 + np.exp(-((t - 9.5) ** 2) / 2.0) + 1.6 * np.exp(-((t - 19.0) ** 2) / 3.0)
    rates = images * shape / shape.sum()
    arrivals: np.ndarray = np.random.default_rng(seed).poisson(rates).astype(np.int64)
    return arrivals


def simulate(arrivals: np.ndarray, rule: str, sim: SimConfig, policy: PolicyConfig) -> Timeline:
    """Run ``rule`` (``policy`` or ``legacy``) over per-second ``arrivals``, until every image is answered."""
    timeline = Timeline(rule)
    waiting: deque[list[float]] = deque()  # [arrival second, count] groups, oldest first
    nodes: list[_Node] = []  # every node that still costs, oldest first
    state = PolicyState()
    credit = 0.0
    replicas_per_node = max(1, policy.replicas_per_node)
    total = int(arrivals.sum())
    last_arrival = int(np.flatnonzero(arrivals).max()) if total else 0
    served = 0
    if rule == "policy":
        # The trace starts on a cluster as the policy keeps it with nothing to do: a warm worker is already up.
        idle = decide(Observation(0.0, 0, hour_of_day=sim.hour_of_day(0.0)), state, policy)
        if idle.nodes:
            state, nodes = idle.state, [_Node(ready_at=0.0) for _ in range(idle.nodes)]
    second, end = 0, max(sim.horizon_s, len(arrivals))
    while second < end or (served < total and second < end + sim.overrun_limit_s):
        now = float(second)
        if second < len(arrivals) and arrivals[second]:
            waiting.append([now, float(arrivals[second])])
        backlog = int(sum(count for _, count in waiting))
        if second % int(sim.period_s) == 0:
            if rule == "policy":
                observation = Observation(now, backlog, hour_of_day=sim.hour_of_day(now))
                decision = decide(observation, state, policy)
                state, wanted_nodes = decision.state, decision.nodes
            else:
                wanted_nodes = max(_wanted_count(nodes), min(LEGACY_MAX_INSTANCES, backlog))
            _resize(nodes, wanted_nodes, now, sim)
        nodes[:] = [node for node in nodes if node.leaving_at is None or node.leaving_at > now]
        ready_nodes = sum(1 for node in nodes if node.leaving_at is None and node.ready_at <= now)
        timeline.node_seconds += len(nodes)
        credit += ready_nodes * replicas_per_node / sim.service_time_s
        while waiting and credit >= 1.0:
            arrival, count = waiting[0]
            take = min(count, math.floor(credit))
            timeline.latencies.extend([now + 1.0 - arrival] * int(take))
            served += int(take)
            credit -= take
            if take >= count:
                waiting.popleft()
            else:
                waiting[0][1] = count - take
        if not waiting:
            credit = 0.0  # idle capacity does not bank
            if served == total and timeline.drained_at is None and second >= last_arrival:
                timeline.drained_at = now + 1.0
        timeline.backlog.append(backlog)
        timeline.nodes.append(len(nodes))
        second += 1
    return timeline


def _wanted_count(nodes: list[_Node]) -> int:
    return sum(1 for node in nodes if node.leaving_at is None)


def _resize(nodes: list[_Node], wanted: int, now: float, sim: SimConfig) -> None:
    """Release the newest wanted nodes, or add nodes: first the released ones still there, then new ones."""
    live = [node for node in nodes if node.leaving_at is None]
    for node in live[wanted:]:
        node.leaving_at = now + sim.idle_timeout_s
    missing = wanted - len(live)
    if missing > 0 and sim.reuse_s is not None:
        released = sorted((node for node in nodes if node.leaving_at is not None), key=lambda node: node.ready_at)
        for node in released[:missing]:
            node.leaving_at = None
            node.ready_at = max(node.ready_at, now + sim.reuse_s)
            missing -= 1
    nodes.extend(_Node(ready_at=now + sim.startup_s) for _ in range(max(0, missing)))


def plot(timelines: list[Timeline], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 1, figsize=(9, 9), dpi=110)
    for timeline in timelines:
        minutes = np.arange(len(timeline.backlog)) / 60.0
        summary = timeline.summary()
        label = f"{timeline.name}: p95 {summary['p95_latency_s']} s, {summary['node_minutes']} node-minutes"
        axes[0].plot(minutes, timeline.backlog, label=label)
        axes[1].plot(minutes, timeline.nodes, label=timeline.name)
        if timeline.latencies:
            ordered = np.sort(timeline.latencies)
            axes[2].plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=timeline.name)
    axes[0].set_ylabel("backlog (images)")
    axes[1].set_ylabel("worker nodes (billed)")
    axes[1].set_xlabel("minutes")
    axes[2].set_xlabel("latency (s)")
    axes[2].set_ylabel("fraction of images")
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
