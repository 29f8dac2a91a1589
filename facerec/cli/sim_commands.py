"""``facerec sim autoscale``: the scaling policy and the original controller on the same arrival trace."""

from __future__ import annotations

import argparse
import json

from cluster.policy import PolicyConfig
from cluster.simulate import SimConfig, burst_trace, day_trace, plot, simulate
from cluster.startup_profile import DEFAULT_PROFILE, StartupPhase, StartupProfile, load_startup_profile


def startup_profile(args: argparse.Namespace) -> StartupProfile:
    """The profile named by ``--startup-profile`` (default: unbaked), or one fixed phase for ``--startup-s``."""
    if args.startup_s is not None:
        phase = StartupPhase(name="startup", seconds=args.startup_s, source="--startup-s")
        return StartupProfile(name=f"fixed {args.startup_s:g} s", phases=[phase])
    return load_startup_profile(args.startup_profile or DEFAULT_PROFILE)


def autoscale(args: argparse.Namespace) -> int:
    profile = startup_profile(args)
    sim = SimConfig(
        service_time_s=args.service_time_s,
        startup_s=profile.new_node_s,
        # A bare --startup-s says nothing about which part an idle node skips: keep the old rule, no reuse.
        reuse_s=None if args.startup_s is not None else profile.reuse_s,
        idle_timeout_s=args.idle_timeout_s,
        horizon_s=args.horizon_s,
        start_hour=args.start_hour,
        # The day trace squeezes one day into its horizon; a burst runs on the wall clock.
        day_length_s=float(args.horizon_s) if args.trace == "day" else 86400.0,
    )
    policy = PolicyConfig(
        service_time_s=args.service_time_s,
        latency_target_s=args.latency_target_s,
        max_replicas=args.max_nodes,
        max_nodes=args.max_nodes,
        scale_down_after_s=args.scale_down_after_s,
        warm_hours=tuple(args.warm_hours) if args.warm_hours else None,
        trend_lookahead_s=args.trend_lookahead_s,
    )
    make_trace = burst_trace if args.trace == "burst" else day_trace
    arrivals = make_trace(args.images, args.horizon_s)
    timelines = [simulate(arrivals, rule, sim, policy) for rule in ("policy", "legacy")]
    if args.plot is not None:
        title = (
            f"{args.trace}: {args.images:,} images, {args.service_time_s} s/image, "
            f"start-up {profile.name} ({sim.startup_s:.0f} s)"
        )
        plot(timelines, args.plot, title)
    print(
        json.dumps(
            {
                "trace": args.trace,
                "images": int(arrivals.sum()),
                "service_time_s": args.service_time_s,
                "startup_profile": profile.name,
                "startup_phases_s": {phase.name: phase.seconds for phase in profile.phases},
                "startup_s": sim.startup_s,
                "reuse_s": sim.reuse_s,
                "max_nodes": args.max_nodes,
                "policy_options": {
                    "warm_hours": policy.warm_hours,
                    "trend_lookahead_s": policy.trend_lookahead_s,
                },
                **{timeline.name: timeline.summary() for timeline in timelines},
                "plot": str(args.plot) if args.plot else None,
            }
        )
    )
    return 0
