"""Replay an arrival trace against a scaling rule, one simulated second at a time.

Nodes take ``startup_s`` to join (EC2 boot, Ray, model load) and, once no longer wanted, stay for
``idle_timeout_s`` (Ray's autoscaler idle timeout) before they stop costing. Each ready replica clears one
image every ``service_time_s``. Images are served first in, first out; latency is completion minus arrival.

Two rules are compared on the same trace:

* ``policy``: :func:`cluster.policy.decide`, evaluated every ``period_s`` as the controller does;
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
    idle_timeout_s: float = 60.0
    period_s: float = 5.0
    horizon_s: int = 3600


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
            "max_latency_s": round(float(latencies.max()), 1),
            "node_minutes": round(self.node_seconds / 60.0, 1),
            "peak_nodes": max(self.nodes) if self.nodes else 0,
            "drained_at_s": None if self.drained_at is None else round(self.drained_at, 1),
        }


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
    """Run ``rule`` (``policy`` or ``legacy``) over per-second ``arrivals``."""
    timeline = Timeline(rule)
    waiting: deque[list[float]] = deque()  # [arrival second, count] groups, oldest first
    ready_at: list[float] = []  # one entry per live node: when it is (or was) ready
    leaving_at: dict[int, float] = {}  # node index -> when it stops costing
    state = PolicyState()
    credit = 0.0
    replicas_per_node = max(1, policy.replicas_per_node)
    total = int(arrivals.sum())
    last_arrival = int(np.flatnonzero(arrivals).max()) if total else 0
    served = 0
    for second in range(max(sim.horizon_s, len(arrivals))):
        now = float(second)
        if second < len(arrivals) and arrivals[second]:
            waiting.append([now, float(arrivals[second])])
        backlog = int(sum(count for _, count in waiting))
        if second % int(sim.period_s) == 0:
            if rule == "policy":
                decision = decide(Observation(now, backlog), state, policy)
                state, wanted_nodes = decision.state, decision.nodes
            else:
                wanted_nodes = max(len(ready_at), min(LEGACY_MAX_INSTANCES, backlog))
            live = [i for i in range(len(ready_at)) if i not in leaving_at]
            for _ in range(wanted_nodes - len(live)):
                ready_at.append(now + sim.startup_s)
            for index in live[wanted_nodes:] if wanted_nodes < len(live) else []:
                leaving_at[index] = now + sim.idle_timeout_s
        ready_nodes = sum(1 for i, t in enumerate(ready_at) if t <= now and i not in leaving_at)
        costing = sum(1 for i in range(len(ready_at)) if i not in leaving_at or leaving_at[i] > now)
        timeline.node_seconds += costing
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
        timeline.nodes.append(costing)
    return timeline


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
