"""``facerec sim autoscale``: the scaling policy and the original controller on the same arrival trace."""

from __future__ import annotations

import argparse
import json

from cluster.policy import PolicyConfig
from cluster.simulate import SimConfig, burst_trace, day_trace, plot, simulate


def autoscale(args: argparse.Namespace) -> int:
    sim = SimConfig(service_time_s=args.service_time_s, startup_s=args.startup_s, horizon_s=args.horizon_s)
    policy = PolicyConfig(
        service_time_s=args.service_time_s,
        latency_target_s=args.latency_target_s,
        max_replicas=args.max_nodes,
        max_nodes=args.max_nodes,
    )
    make_trace = burst_trace if args.trace == "burst" else day_trace
    arrivals = make_trace(args.images, args.horizon_s)
    timelines = [simulate(arrivals, rule, sim, policy) for rule in ("policy", "legacy")]
    if args.plot is not None:
        title = f"{args.trace}: {args.images:,} images, {args.service_time_s} s/image, {args.startup_s:.0f} s start-up"
        plot(timelines, args.plot, title)
    print(
        json.dumps(
            {
                "trace": args.trace,
                "images": int(arrivals.sum()),
                "service_time_s": args.service_time_s,
                "startup_s": args.startup_s,
                "max_nodes": args.max_nodes,
                **{timeline.name: timeline.summary() for timeline in timelines},
                "plot": str(args.plot) if args.plot else None,
            }
        )
    )
    return 0
