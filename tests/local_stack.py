"""The whole local stack as `make run` starts it (`python -m facerec.local_run`), in a subprocess on free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.serve_fixtures import free_port
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
PORTS = ("http", "dashboard", "moto", "metrics", "prometheus")


@contextlib.contextmanager
def running_local_stack(folder: Path, *options: str) -> Iterator[tuple[dict[str, int], Path]]:
    """Start it in ``folder`` (its ``run/`` and log land there) with its own moto server and no API key; yields its
    ports and its log file once it says it is running; stops it (SIGTERM, then kill) afterwards."""
    ports = {name: free_port() for name in PORTS}
    log_path = folder / "service.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FACEREC_"))}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "facerec.local_run", *options, *(f"--{k}-port={v}" for k, v in ports.items())],
            cwd=folder,
            env={**environment, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                lambda: process.poll() is not None or "facerec is running" in log_path.read_text(errors="replace"),
                600,
                "the local stack did not start",
            )
            assert process.poll() is None, log_path.read_text()[-3000:]
            yield ports, log_path
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
