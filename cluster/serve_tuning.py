"""Ray Serve's settings for this service (``cluster/serve_tuning.env``), for the processes that start Ray.

Each cluster node's ``ray start`` sources the file in sh (cluster.yaml); ``make run`` and the fake cluster read it
here, so that one machine, the fake cluster and the real one run the same settings.
"""

from __future__ import annotations

from pathlib import Path

SERVE_TUNING_FILE = Path(__file__).resolve().parent / "serve_tuning.env"
#: Where the worker nodes' HTTP proxies listen (the load balancer's target port); the head's stays on Serve's.
WORKER_PROXY_PORT = "RAY_SERVE_WORKER_PROXY_HTTP_PORT"


def serve_tuning(path: Path = SERVE_TUNING_FILE) -> dict[str, str]:
    """The ``NAME=value`` lines of the file (comments and blank lines skipped)."""
    settings: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings
