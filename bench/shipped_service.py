"""The service exactly as ``make run`` ships it, started for a benchmark and stopped afterwards.

``python -m facerec.local_run`` in a subprocess (its own moto server, Ray head, the Serve application from
``serve_app/config.yaml`` with its ``auto`` sizing and access logs, and the SQS bridge), on free loopback ports
and in a temporary working directory, so that a benchmark measures what users run and never touches a
``make run`` that is already up. Stopped with SIGTERM, as ``make stop`` does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
#: What ``facerec.local_run`` prints once every application is deployed.
READY_BANNER = "facerec is running"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ShippedService:
    url: str
    #: The local stack's names and endpoint, as ``facerec aws status --json`` would give them (``run/aws.json``).
    stack: dict[str, Any]
    workdir: Path
    pid: int


@contextmanager
def shipped_service(
    start_timeout_s: float = 600.0, environment: dict[str, str] | None = None, options: Sequence[str] = ()
) -> Iterator[ShippedService]:
    """Start ``make run``'s stack, wait until a Recognizer replica answers ``/healthz``, stop it on exit.

    ``environment`` adds variables and ``options`` adds ``facerec.local_run`` options (for A/B runs of a
    setting, e.g. ``["--ingress", "in_recognizer"]``); the default is exactly what ``make run`` starts.
    """
    ports = {name: free_port() for name in ("http", "dashboard", "moto", "metrics", "prometheus")}
    with tempfile.TemporaryDirectory(prefix="facerec-bench-") as workdir:
        log = (Path(workdir) / "service.log").open("wb")
        env = {**os.environ, "PYTHONPATH": str(REPO), **(environment or {})}
        process = subprocess.Popen(
            [sys.executable, "-m", "facerec.local_run", *(f"--{k}-port={v}" for k, v in ports.items()), *options],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{ports['http']}"
        try:
            _wait_healthy(url, process, start_timeout_s, Path(workdir) / "service.log")
            stack = json.loads((Path(workdir) / "run" / "aws.json").read_text())
            yield ShippedService(url, stack, Path(workdir), process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        # Both applications up (local_run prints its banner after the bridge is deployed), so that no replica is
        # still importing torch while a benchmark measures.
        started = READY_BANNER in log.read_text(errors="replace")
        try:
            if started and requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the service did not become healthy in {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")
