"""The scaling simulator: our policy against the original controller's rule on the same traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.policy import PolicyConfig
from cluster.simulate import LEGACY_MAX_INSTANCES, SimConfig, burst_trace, day_trace, simulate
from facerec.cli.main import main

SIM = SimConfig(service_time_s=0.1, startup_s=90.0, idle_timeout_s=60.0, horizon_s=1800)
POLICY = PolicyConfig(service_time_s=0.1, latency_target_s=30.0, max_replicas=19, max_nodes=19)


def test_burst_same_latency_far_fewer_node_minutes() -> None:
    arrivals = burst_trace(5000, SIM.horizon_s)
    ours, legacy = (simulate(arrivals, rule, SIM, POLICY) for rule in ("policy", "legacy"))
    assert len(ours.latencies) == len(legacy.latencies) == 5000  # nothing lost, everything served
    assert ours.summary()["p95_latency_s"] <= legacy.summary()["p95_latency_s"] + 10  # type: ignore[operator]
    assert ours.nodes[-1] == 0  # back to zero workers
    assert legacy.nodes[-1] == LEGACY_MAX_INSTANCES  # the old rule never scales in
    assert ours.node_seconds < legacy.node_seconds / 5


def test_service_is_bounded_by_capacity() -> None:
    # One node at 10 images/s after a 90 s start: 600 images cannot finish before 90 + 60 s.
    arrivals = burst_trace(600, 600)
    one_node = PolicyConfig(service_time_s=0.1, latency_target_s=30.0, max_replicas=1, max_nodes=1)
    timeline = simulate(arrivals, "policy", SimConfig(service_time_s=0.1, horizon_s=600), one_node)
    assert timeline.drained_at is not None and 149 <= timeline.drained_at <= 152
    assert max(timeline.nodes) == 1


def test_day_trace_is_reproducible_and_has_two_peaks() -> None:
    first, second = day_trace(20_000, 2400, seed=3), day_trace(20_000, 2400, seed=3)
    assert np.array_equal(first, second)
    hourly = first.reshape(24, -1).sum(axis=1)
    assert hourly.argmax() in (18, 19, 20) and hourly[9] > 3 * hourly[3]


def test_cli_prints_both_rules_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "sim.png"
    assert main(["sim", "autoscale", "--images", "3000", "--horizon-s", "900", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["policy"]["images"] == report["legacy"]["images"] == 3000
    assert report["policy"]["node_minutes"] < report["legacy"]["node_minutes"]
    assert png.read_bytes()[:4] == b"\x89PNG"
