"""The service's monitoring panels, defined once: the Grafana dashboard (``monitoring/grafana/facerec.json``) and
``facerec monitor``'s plots are both made from this list, so they always show the same series.

Ray exports each metric of :mod:`serve_app.metrics` with a ``ray_`` prefix (counters also get ``_total``,
histograms ``_bucket``/``_sum``/``_count``). Queries use ``[1m]`` rates: twelve scrapes at the 5 s interval of the
Prometheus that ``facerec`` starts (locally and on the head), six at the 10 s of Ray's own generated config:
enough for a rate either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Series:
    legend: str
    promql: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    series: tuple[Series, ...]


def _quantiles(metric: str, by: str, label: str) -> tuple[Series, ...]:
    return tuple(
        Series(
            f"p{q} {{{{{label}}}}}",
            f"histogram_quantile(0.{q}, sum by (le, {by}) (rate({metric}_bucket[1m])))",
        )
        for q in (50, 95, 99)
    )


PANELS: tuple[Panel, ...] = (
    Panel(
        "Requests per second by route",
        "req/s",
        (Series("{{route}}", "sum by (route) (rate(ray_facerec_requests_total[1m]))"),),
    ),
    Panel(
        "Request latency by route (p50 / p95 / p99)",
        "ms",
        _quantiles("ray_facerec_request_latency_ms", "route", "route"),
    ),
    Panel(
        "Errors per second by status",
        "req/s",
        (Series("{{status}}", 'sum by (status) (rate(ray_facerec_requests_total{status=~"4..|5.."}[1m]))'),),
    ),
    Panel(
        "Recognizer stage latency (p95)",
        "ms",
        (
            Series(
                "{{stage}}",
                "histogram_quantile(0.95, sum by (le, stage) (rate(ray_facerec_stage_latency_ms_bucket[1m])))",
            ),
        ),
    ),
    Panel(
        "Batch size and faces per image (mean)",
        "count",
        (
            Series(
                "jobs per batch",
                "sum(rate(ray_facerec_batch_size_sum[1m])) / sum(rate(ray_facerec_batch_size_count[1m]))",
            ),
            Series(
                "faces per image",
                "sum(rate(ray_facerec_faces_per_image_sum[1m])) / sum(rate(ray_facerec_faces_per_image_count[1m]))",
            ),
        ),
    ),
    Panel(
        "Recognizer utilisation",
        "requests",
        (
            Series(
                "requests held by Recognizer replicas",
                'sum(ray_serve_replica_processing_queries{deployment="Recognizer"})',
            ),
            Series("replicas healthy", 'sum(ray_serve_deployment_replica_healthy{deployment="Recognizer"})'),
        ),
    ),
    Panel(
        "Gallery",
        "count",
        (
            Series("faces", "max(ray_facerec_gallery_faces)"),
            Series("people", "max(ray_facerec_gallery_people)"),
            Series("revision", "max(ray_facerec_gallery_revision)"),
            Series("refresh failures / min", "sum(increase(ray_facerec_gallery_refresh_failures_total[1m]))"),
        ),
    ),
    Panel(
        "SQS bridge",
        "messages",
        (
            Series("{{outcome}} / s", "sum by (outcome) (rate(ray_facerec_bridge_messages_total[1m]))"),
            Series("in flight", "sum(ray_facerec_bridge_in_flight)"),
            Series("dead letters", "max(ray_facerec_bridge_dead_letters)"),
            Series("uncertain sends", "sum(ray_facerec_bridge_uncertain_sends)"),
        ),
    ),
    Panel(
        "Queue backlog, replicas and nodes (controller vs autoscaler)",
        "count",
        (
            Series("backlog", "max(ray_facerec_controller_backlog)"),
            Series("replicas wanted", "max(ray_facerec_controller_desired_replicas)"),
            Series("replicas running", "max(ray_facerec_controller_actual_replicas)"),
            Series("nodes wanted", "max(ray_facerec_controller_desired_nodes)"),
            Series("nodes alive", "max(ray_facerec_controller_actual_nodes)"),
            # The autoscaler's side: the nodes reporting to Ray (the head included).
            Series("Ray nodes up", "count(max by (instance) (ray_node_cpu_count))"),
        ),
    ),
)


def grafana_dashboard(datasource_uid: str = "${datasource}") -> dict[str, Any]:
    """The panels as a Grafana dashboard (schema 39; a time-series panel each, two per row)."""
    panels = []
    for index, panel in enumerate(PANELS):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": panel.title,
                "datasource": {"type": "prometheus", "uid": datasource_uid},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "targets": [
                    {
                        "refId": chr(ord("A") + position),
                        "expr": series.promql,
                        "legendFormat": series.legend,
                        "datasource": {"type": "prometheus", "uid": datasource_uid},
                    }
                    for position, series in enumerate(panel.series)
                ],
            }
        )
    return {
        "title": "facerec",
        "uid": "facerec-service",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "tags": ["facerec", "ray"],
        "templating": {
            "list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}]
        },
        "panels": panels,
    }
