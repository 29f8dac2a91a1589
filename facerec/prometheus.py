"""A Prometheus on 127.0.0.1 for the local stack (`make run`), and a small client for its HTTP API.

Ray writes where every node's metrics endpoint is into ``prom_metrics_service_discovery.json`` (a Prometheus
file-based service discovery list) in its temp directory; Prometheus scrapes what that file lists, so it can
start before Ray and picks the nodes up as they appear. The Ray dashboard's Metrics tab and its overview charts
query the Prometheus named by ``RAY_PROMETHEUS_HOST``, which must be in the environment before Ray starts.

The binary comes from the operating system (`make prometheus` installs Debian's package, as `make browser`
installs Chromium); ``ray metrics launch-prometheus`` would download one, which cannot work offline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
ALERT_RULES = REPO / "monitoring" / "alerts.yml"
#: Where Ray keeps the node list (a link to the current session's copy), for a Ray started with its default
#: temp directory.
RAY_DISCOVERY_FILE = Path("/tmp/ray/prom_metrics_service_discovery.json")
SCRAPE_INTERVAL_S = 5


def prometheus_binary() -> str | None:
    """``FACEREC_PROMETHEUS`` or ``prometheus`` on PATH (Debian: /usr/bin/prometheus); ``None`` if neither."""
    configured = os.environ.get("FACEREC_PROMETHEUS")
    if configured:
        return configured if Path(configured).is_file() else None
    return shutil.which("prometheus")


def write_config(directory: Path, discovery_file: Path = RAY_DISCOVERY_FILE) -> Path:
    """A Prometheus config that scrapes every Ray node every few seconds and evaluates the alert rules."""
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": [str(ALERT_RULES)],
        "scrape_configs": [
            {
                "job_name": "ray",
                "file_sd_configs": [{"files": [str(discovery_file)], "refresh_interval": "5s"}],
            }
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def local_prometheus(port: int, directory: Path, discovery_file: Path = RAY_DISCOVERY_FILE) -> Iterator[str | None]:
    """Run Prometheus on 127.0.0.1:``port`` (data and log under ``directory``) while the block runs; yields its
    URL, or ``None`` when no Prometheus is installed (the service runs without it)."""
    binary = prometheus_binary()
    if binary is None:
        log.warning("no Prometheus found (`make prometheus` installs it): the dashboard's Metrics tab stays empty")
        yield None
        return
    url = f"http://127.0.0.1:{port}"
    process = _launch(binary, port, directory, discovery_file, retention="2d", detached=False)
    try:
        _wait_ready(process, url, directory)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
    return _get(url, "query", {"query": promql})


def query_range(url: str, promql: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
    """A range query: ``[{"metric": {...}, "values": [[t, "v"], ...]}, ...]``."""
    return _get(url, "query_range", {"query": promql, "start": start, "end": end, "step": step_s})


def _get(url: str, endpoint: str, parameters: dict[str, object]) -> list[dict[str, Any]]:
    address = f"{url}/api/v1/{endpoint}?{urllib.parse.urlencode(parameters)}"
    with urllib.request.urlopen(address, timeout=30) as response:
        document = json.loads(response.read())
    if document.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {parameters.get('query')!r}: {document.get('error')}")
    result: list[dict[str, Any]] = document["data"]["result"]
    return result


def start_detached(port: int, directory: Path, discovery_file: Path = RAY_DISCOVERY_FILE) -> str:
    """Start Prometheus in the background (it outlives this process: the cluster head's start command; its pid in
    ``directory/prometheus.pid``), unless one already answers on ``port``; returns its URL. Raises
    ``RuntimeError`` when none is installed or it fails."""
    url = f"http://127.0.0.1:{port}"
    if ready(url):
        return url
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError("no Prometheus installed (the head's setup installs Debian/Ubuntu's `prometheus`)")
    process = _launch(binary, port, directory, discovery_file, retention="15d", detached=True)
    (directory / "prometheus.pid").write_text(str(process.pid))
    _wait_ready(process, url, directory)
    return url


def _launch(
    binary: str, port: int, directory: Path, discovery_file: Path, *, retention: str, detached: bool
) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(directory, discovery_file)
    with (directory / "prometheus.log").open("ab") as output:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--storage.tsdb.retention.time={retention}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=output,
            stderr=output,
            start_new_session=detached,
        )


def _wait_ready(process: subprocess.Popen[bytes], url: str, directory: Path) -> None:
    deadline = time.monotonic() + 60
    while not ready(url):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Prometheus did not start: see {directory / 'prometheus.log'}")
        time.sleep(0.2)


def grafana_command(grafana_dir: Path, port: int, dashboards: Path) -> list[str] | None:
    """How to run Grafana with Ray's generated provisioning (``grafana_dir``: the session's ``metrics/grafana``,
    whose dashboards folder also receives ``dashboards``' JSON files), on 127.0.0.1; ``None`` without Grafana."""
    binary = shutil.which("grafana-server") or shutil.which("grafana")
    if binary is None:
        return None
    target = grafana_dir / "dashboards"
    target.mkdir(parents=True, exist_ok=True)
    for dashboard in dashboards.glob("*.json"):
        shutil.copy(dashboard, target / dashboard.name)
    homepath = Path("/usr/share/grafana")
    server = [binary] if binary.endswith("grafana-server") else [binary, "server"]
    return [
        *server,
        f"--homepath={homepath}",
        f"--config={grafana_dir / 'grafana.ini'}",
        "cfg:default.server.http_addr=127.0.0.1",
        f"cfg:default.server.http_port={port}",
    ]
