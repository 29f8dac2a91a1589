"""``facerec monitoring start``: Prometheus (and Grafana, where installed) for the cluster's head.

Run by ``cluster.yaml``'s head start commands after ``ray start --head``. Both bind 127.0.0.1 (reach them through
``ray attach cluster.yaml -p 9090`` / ``-p 3000``, like the dashboard). Prometheus scrapes every Ray node listed
by this Ray session and evaluates ``monitoring/alerts.yml``; Grafana gets Ray's generated provisioning (its own
dashboards and the Prometheus data source) plus ``monitoring/grafana/*.json``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import urllib.request
from pathlib import Path

from facerec.prometheus import REPO, start_detached

log = logging.getLogger("facerec")

RAY_SESSION = Path("/tmp/ray/session_latest")


def start(prometheus_port: int, grafana_port: int, directory: Path) -> int:
    from facerec.prometheus import grafana_command

    try:
        url = start_detached(
            prometheus_port, directory / "prometheus", RAY_SESSION / "prom_metrics_service_discovery.json"
        )
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    started: dict[str, object] = {"prometheus": url}
    command = grafana_command(RAY_SESSION / "metrics" / "grafana", grafana_port, REPO / "monitoring" / "grafana")
    grafana = f"http://127.0.0.1:{grafana_port}"
    if _answers(f"{grafana}/api/health"):  # started by an earlier run of the head's start commands
        started["grafana"] = grafana
    elif command is None:
        log.info("no Grafana installed: the dashboard's Metrics tab stays empty; `facerec monitor` draws the panels")
        started["grafana"] = None
    else:
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "grafana.log").open("ab") as output:
            subprocess.Popen(command, stdout=output, stderr=output, start_new_session=True)
        started["grafana"] = grafana
    print(json.dumps(started))
    return 0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
