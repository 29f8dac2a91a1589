"""The scaling simulator: our policy against the original controller's rule on the same traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cluster.policy import PolicyConfig
from cluster.simulate import LEGACY_MAX_INSTANCES, SimConfig, burst_trace, day_trace, simulate
from cluster.startup_profile import PROFILES_DIR, load_startup_profile
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


def write_profile(path: Path, ec2_boot_s: float, setup_s: float, replica_s: float) -> Path:
    path.write_text(
        "name: tiny\n"
        "phases:\n"
        f"  - {{name: ec2_boot, seconds: {ec2_boot_s}, source: cited}}\n"
        f"  - {{name: setup, seconds: {setup_s}, source: measured}}\n"
        f"  - {{name: replica_start, seconds: {replica_s}, on_reuse: true, source: measured}}\n"
    )
    return path


def test_startup_profile_is_read_and_its_phases_summed(tmp_path: Path) -> None:
    profile = load_startup_profile(write_profile(tmp_path / "p.yaml", 20, 30, 5))
    assert [phase.name for phase in profile.phases] == ["ec2_boot", "setup", "replica_start"]
    assert (profile.new_node_s, profile.reuse_s) == (55, 5)
    json_profile = tmp_path / "p.json"
    json_profile.write_text(json.dumps(profile.model_dump()))
    assert load_startup_profile(json_profile) == profile
    with pytest.raises(ValidationError):
        (tmp_path / "bad.yaml").write_text("name: bad\nphases: [{name: setup, seconds: -1, source: x}]\n")
        load_startup_profile(tmp_path / "bad.yaml")


def test_shipped_profiles_cite_every_phase() -> None:
    unbaked, baked = (load_startup_profile(PROFILES_DIR / f"{name}.yaml") for name in ("unbaked", "baked"))
    for profile in (unbaked, baked):
        assert [phase.name for phase in profile.phases] == ["ec2_boot", "setup", "ray_join", "replica_start"]
        # Every figure says whether it was measured (and how), cited (and where) or assumed.
        assert all(phase.source.startswith(("measured", "cited", "assumption")) for phase in profile.phases)
    assert baked.new_node_s < unbaked.new_node_s
    assert baked.reuse_s == unbaked.reuse_s > 0


def test_cli_startup_profile_sets_when_the_first_answer_comes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 50 images at t=0 want one node (10 images/s): every image waits for its start-up, then 5 s of service.
    reports = {}
    for name, setup_s in (("quick", 0), ("slow", 100)):
        profile = write_profile(tmp_path / f"{name}.yaml", 20, setup_s, 5)
        argv = ["sim", "autoscale", "--images", "50", "--horizon-s", "300", "--startup-profile", str(profile)]
        assert main(argv) == 0
        reports[name] = json.loads(capsys.readouterr().out)
    quick, slow = reports["quick"], reports["slow"]
    assert (quick["startup_s"], slow["startup_s"]) == (25, 125)
    assert slow["startup_phases_s"] == {"ec2_boot": 20, "setup": 100, "replica_start": 5}
    assert quick["policy"]["images"] == slow["policy"]["images"] == 50
    assert quick["policy"]["drained_at_s"] == 30  # ready at 25, 5 s of service
    assert slow["policy"]["p95_latency_s"] - quick["policy"]["p95_latency_s"] == 100
    assert slow["legacy"]["p95_latency_s"] - quick["legacy"]["p95_latency_s"] == 100


def test_a_node_inside_its_idle_timeout_pays_only_the_reuse_phases() -> None:
    # 10 images at t=0 and 10 at t=100; the node is released at t=60 and would stop costing at t=120.
    arrivals = np.zeros(300, dtype=np.int64)
    arrivals[0] = arrivals[100] = 10
    policy = PolicyConfig(service_time_s=0.1, latency_target_s=30.0, max_replicas=2, max_nodes=2, scale_down_after_s=10)
    reused = SimConfig(startup_s=50, reuse_s=5, idle_timeout_s=60, horizon_s=300)
    fresh = SimConfig(startup_s=50, reuse_s=None, idle_timeout_s=60, horizon_s=300)
    with_reuse, without = (simulate(arrivals, "policy", sim, policy) for sim in (reused, fresh))
    assert with_reuse.latencies[:10] == without.latencies[:10] == [51.0] * 10
    assert with_reuse.latencies[10:] == [6.0] * 10  # replica start only, 5 s, answered within the next second
    assert without.latencies[10:] == [51.0] * 10  # a new node: the whole start-up again
    assert max(with_reuse.nodes) == 1 and max(without.nodes) == 2  # the released one still bills beside it
    assert with_reuse.node_seconds < without.node_seconds


def test_images_arriving_late_are_answered_past_the_horizon() -> None:
    arrivals = np.zeros(100, dtype=np.int64)
    arrivals[99] = 5
    timeline = simulate(arrivals, "policy", SimConfig(startup_s=50, horizon_s=100), POLICY)
    # Seen at the decision of t=100, ready at t=150, answered within that second: 152 - 99 s after arriving.
    assert timeline.latencies == [52.0] * 5
    assert timeline.drained_at == 151


def test_warm_hours_follow_the_simulated_clock() -> None:
    # A day squeezed into 2,400 s (100 s an hour); warm from 08:00 to 20:00: one node from t=800 to t=2,000.
    warm = PolicyConfig(service_time_s=0.1, latency_target_s=30.0, warm_hours=(8, 20), scale_down_after_s=0)
    sim = SimConfig(startup_s=10, idle_timeout_s=0, horizon_s=2400, day_length_s=2400)
    timeline = simulate(np.zeros(2400, dtype=np.int64), "policy", sim, warm)
    billed = np.flatnonzero(timeline.nodes)
    assert (billed.min(), billed.max()) == (800, 1999)


def test_a_warm_worker_is_up_when_the_trace_starts_inside_warm_hours() -> None:
    warm = PolicyConfig(service_time_s=0.1, latency_target_s=30.0, max_replicas=2, max_nodes=2, warm_hours=(8, 20))
    sim = SimConfig(startup_s=100, horizon_s=600, start_hour=10)
    timeline = simulate(burst_trace(20, 600), "policy", sim, warm)
    assert timeline.latencies == [1.0] * 10 + [2.0] * 10  # 10 images/s from the first second, no start-up
    assert timeline.nodes[-1] == 1  # and it stays: still business hours
    night = simulate(burst_trace(20, 600), "policy", SimConfig(startup_s=100, horizon_s=600, start_hour=21), warm)
    assert min(night.latencies) == 101.0


def test_a_rule_that_never_serves_stops_at_the_overrun_limit() -> None:
    no_nodes = PolicyConfig(max_replicas=1, max_nodes=0)
    timeline = simulate(burst_trace(5, 60), "policy", SimConfig(horizon_s=60, overrun_limit_s=30), no_nodes)
    assert (len(timeline.backlog), timeline.latencies, timeline.drained_at) == (90, [], None)
