"""Monitoring: `make run`'s Prometheus scrapes the service, the dashboard queries it, `facerec monitor` plots it;
the Grafana dashboard and the alert rules in the repository are valid and name only metrics that exist.

The live test starts the whole local stack (`python -m facerec.local_run`, as `make run` does) with a real
Prometheus from the operating system (`make prometheus`), sends real photos, and waits (bounded) for the series.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from facerec.monitor_panels import PANELS, grafana_dashboard
from facerec.prometheus import ALERT_RULES, query, ready, start_detached
from tests.local_stack import running_local_stack
from tests.serve_fixtures import free_port
from tests.waiting import wait_until

from .conftest import SCENES

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "monitoring" / "grafana" / "facerec.json"
SHOTS = os.environ.get("FACEREC_SCREENSHOTS")


def _metric_names(promql: str) -> set[str]:
    return set(re.findall(r"\b(ray_[a-z0-9_]+)", promql))


def _facerec_metrics() -> set[str]:
    """Every name serve_app/metrics.py defines, as Ray exports it (``ray_`` prefix, counters' ``_total``, ...)."""
    from serve_app.metrics import CONTROLLER_GAUGES

    source = (REPO / "serve_app" / "metrics.py").read_text()
    names = set(re.findall(r'"(facerec_[a-z_]+)"', source)) | {f"facerec_controller_{n}" for n in CONTROLLER_GAUGES}
    return {f"ray_{name}{suffix}" for name in names for suffix in ("", "_total", "_bucket", "_sum", "_count")}


def _rays_own_metrics() -> set[str]:
    """The metric names Ray's own Grafana dashboards use (the panels shipped in the Ray wheel)."""
    import ray.dashboard.modules.metrics.dashboards as dashboards

    folder = Path(dashboards.__file__).parent
    return {name for path in folder.glob("*_panels.py") for name in _metric_names(path.read_text())}


def test_the_dashboard_in_the_repository_is_the_panels_and_names_only_existing_metrics() -> None:
    assert json.loads(DASHBOARD.read_text()) == grafana_dashboard(), "regenerate: facerec monitor --grafana ..."
    known = _facerec_metrics() | _rays_own_metrics()
    used = {name for panel in PANELS for series in panel.series for name in _metric_names(series.promql)}
    assert used and used <= known, used - known
    titles = " ".join(panel.title for panel in PANELS).lower()
    for topic in ("route", "latency", "stage", "batch", "gallery", "bridge", "backlog", "errors"):
        assert topic in titles


def test_the_alert_rules_are_valid_and_name_only_existing_metrics() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make prometheus` installs it"
    checked = subprocess.run([promtool, "check", "rules", str(ALERT_RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = [rule for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for rule in group["rules"]]
    known = _facerec_metrics() | _rays_own_metrics()
    for rule in rules:
        assert _metric_names(rule["expr"]) <= known, (rule["alert"], _metric_names(rule["expr"]) - known)
    alerts = {rule["alert"] for rule in rules}
    assert {
        "FacerecDeadLetters",
        "FacerecBacklogGrowingAtMaxNodes",
        "FacerecLatencyOverTarget",
        "FacerecReplicasUnhealthy",
        "FacerecGalleryRefreshFailing",
    } <= alerts


def test_the_heads_prometheus_starts_once_in_the_background(tmp_path: Path) -> None:
    """`facerec monitoring start` (cluster.yaml's head): detached, on 127.0.0.1, and not twice."""
    port = free_port()
    url = start_detached(port, tmp_path, discovery_file=tmp_path / "no-nodes-yet.json")
    pid = int((tmp_path / "prometheus.pid").read_text())
    try:
        assert url == f"http://127.0.0.1:{port}" and ready(url)
        assert start_detached(port, tmp_path) == url and int((tmp_path / "prometheus.pid").read_text()) == pid
        config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
        assert config["rule_files"] == [str(ALERT_RULES)]
    finally:
        os.kill(pid, signal.SIGTERM)


@pytest.fixture
def local_stack(tmp_path: Path) -> Iterator[tuple[dict[str, int], Path]]:
    with running_local_stack(tmp_path) as (ports, _):
        yield ports, tmp_path


@pytest.mark.serve
def test_make_runs_prometheus_sees_the_services_series_and_facerec_monitor_plots_them(
    local_stack: tuple[dict[str, int], Path],
) -> None:
    ports, folder = local_stack
    api, prometheus = f"http://127.0.0.1:{ports['http']}", f"http://127.0.0.1:{ports['prometheus']}"
    photo = (SCENES / "knn" / "test" / "obama1.jpg").read_bytes()
    started = time.monotonic()

    def post(count: int, first: int) -> None:
        for index in range(first, first + count):
            answer = requests.post(f"{api}/", files={"inputFile": (f"q{index}.jpg", photo)}, timeout=300)
            assert answer.status_code == 200, answer.text

    def counted() -> float:
        found = query(prometheus, 'sum(ray_facerec_requests_total{route="/"})')
        return float(found[0]["value"][1]) if found else 0.0

    # Two batches of requests, each seen by a scrape of its own, so that rates have two points.
    post(6, 0)
    wait_until(lambda: counted() >= 6, 180, "Prometheus never had the facerec_ series", interval=2.0)
    print(f"\nfirst facerec_ series in Prometheus {time.monotonic() - started:.0f} s after the first request")
    post(6, 6)
    wait_until(lambda: counted() >= 12, 180, "Prometheus did not see the second batch", interval=2.0)

    def scrapes() -> int:
        counted = query(prometheus, 'max(count_over_time(ray_facerec_requests_total{route="/"}[5m]))')
        return int(float(counted[0]["value"][1])) if counted else 0

    wait_until(lambda: scrapes() >= 4, 120, "Prometheus did not keep scraping the service", interval=2.0)
    # The dashboard was started pointing at it: its Metrics tab's health check says so.
    health = requests.get(f"http://127.0.0.1:{ports['dashboard']}/api/prometheus_health", timeout=30)
    assert health.status_code == 200 and health.json()["result"] is True, health.text
    # The alert rules are loaded and evaluated (none fires on a healthy stack).
    groups = requests.get(f"{prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
    assert sum(len(group["rules"]) for group in groups) >= 5
    firing = requests.get(f"{prometheus}/api/v1/alerts", timeout=30).json()["data"]["alerts"]
    assert not [alert for alert in firing if alert["state"] == "firing"], firing

    out = Path(SHOTS) / "monitor.png" if SHOTS else folder / "monitor.png"
    facerec = Path(sys.executable).with_name("facerec")
    plotted = subprocess.run(
        [str(facerec), "monitor", "--prometheus", prometheus, "--minutes", "5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    panels = json.loads(plotted.stdout.strip().splitlines()[-1])["panels"]
    print(f"facerec monitor: {panels}")
    for title in ("Requests per second by route", "Request latency by route (p50 / p95 / p99)", "Gallery"):
        assert panels[title]["series"] >= 1 and panels[title]["points"] >= 2, (title, panels[title])
    assert out.stat().st_size > 20_000
