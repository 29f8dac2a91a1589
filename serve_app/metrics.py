"""Every metric of the product (Serve app, SQS bridge, controller), in one place.

Exported through Ray's metrics agent (Prometheus format) to the Ray dashboard.

Names are prefixed ``facerec_``; Ray adds ``ray_`` when it exports them, so on the metrics endpoint they read
``ray_facerec_requests_total`` and so on. Created lazily, once per process, because a metric object must be
built inside the Ray worker that records it.
"""

from __future__ import annotations

from functools import cache

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BOUNDARIES_MS = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0]
FACE_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 5.5, 10.5, 20.5, 50.5]
BATCH_BOUNDARIES = [1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5]


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "facerec_requests", description="HTTP requests by route and status code.", tag_keys=("route", "status")
        )
        self.request_latency_ms = Histogram(
            "facerec_request_latency_ms",
            description="HTTP request latency by route (milliseconds).",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("route",),
        )
        self.faces_per_image = Histogram(
            "facerec_faces_per_image", description="Faces found per recognised image.", boundaries=FACE_BOUNDARIES
        )
        self.stage_latency_ms = Histogram(
            "facerec_stage_latency_ms",
            description="Recognizer batch time per stage: decode, detect, embed, match (milliseconds).",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("stage",),
        )
        self.batch_size = Histogram(
            "facerec_batch_size", description="Jobs per Recognizer batch.", boundaries=BATCH_BOUNDARIES
        )
        self.gallery_faces = Gauge(
            "facerec_gallery_faces", description="Faces enrolled in the gallery a replica serves from."
        )
        self.gallery_people = Gauge("facerec_gallery_people", description="People enrolled in the gallery.")
        self.gallery_revision = Gauge("facerec_gallery_revision", description="Gallery revision a replica serves.")
        self.gallery_refresh_failures = Counter(
            "facerec_gallery_refresh_failures",
            description="Gallery refreshes that failed (the store unreachable or a snapshot unreadable).",
        )


class BridgeMetrics:
    """The SQS bridge's consumer (one per bridge replica)."""

    def __init__(self) -> None:
        self.messages = Counter(
            "facerec_bridge_messages", description="Request messages finished, by outcome.", tag_keys=("outcome",)
        )
        self.in_flight = Gauge("facerec_bridge_in_flight", description="Request messages held by a consumer.")
        self.dead_letters = Gauge(
            "facerec_bridge_dead_letters", description="Request messages on the dead-letter queue (should be 0)."
        )
        self.uncertain_sends = Gauge(
            "facerec_bridge_uncertain_sends",
            description="SendMessage attempts for a response that failed after they may have reached SQS (each such "
            "attempt may deliver that response twice).",
        )


#: The queue-depth controller's view and decisions, one gauge each.
CONTROLLER_GAUGES = {
    "backlog": "Request queue backlog: visible plus in-flight messages.",
    "ongoing": "Requests the ingress replicas report in flight.",
    "desired_replicas": "Recognizer replicas the policy wants.",
    "desired_nodes": "Worker nodes the policy asks Ray's autoscaler for.",
    "actual_replicas": "Recognizer replicas running.",
    "actual_nodes": "Worker nodes alive.",
    "max_nodes": "The most worker nodes the policy may ask for (its max_nodes).",
    "latency_target_s": "The latency the policy sizes for (its latency_target_s), in seconds.",
}


@cache
def metrics() -> Metrics:
    """The Serve application's metrics (ingress and Recognizer)."""
    return Metrics()


@cache
def bridge_metrics() -> BridgeMetrics:
    return BridgeMetrics()


@cache
def controller_gauges() -> dict[str, Gauge]:
    return {name: Gauge(f"facerec_controller_{name}", description=text) for name, text in CONTROLLER_GAUGES.items()}
