"""`make run`'s start-up check: a port counts as taken only while something listens on it."""

from __future__ import annotations

import os
import socket
import subprocess

from cluster.serve_tuning import SERVE_TUNING_FILE, serve_tuning
from facerec.local_run import _listening


def _time_wait_port() -> int:
    """A loopback port whose last connection the server closed first: it sits in TIME_WAIT, nothing listens."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = int(listener.getsockname()[1])
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the side that closes first keeps the TIME_WAIT state
    client.close()
    listener.close()
    return port


def test_a_listener_counts_as_running() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert _listening(int(listener.getsockname()[1]))


def test_time_wait_sockets_after_a_load_run_do_not_count() -> None:
    port = _time_wait_port()
    # The situation the old bind-based probe got wrong: a bind without SO_REUSEADDR still fails here.
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            bind_failed = False
        except OSError:
            bind_failed = True
    assert bind_failed, "expected the port to be in TIME_WAIT"
    assert not _listening(port)


def test_make_run_deploys_the_shipped_config() -> None:
    """`make run` reads the application's arguments from the Serve config shipped with the app, and they validate."""
    import yaml

    from facerec.local_run import CONFIG
    from serve_app.app import AppArgs

    assert CONFIG.is_file(), CONFIG
    args = AppArgs.model_validate(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"])
    assert args.recognition.checkpoint


def test_make_run_and_the_cluster_nodes_read_the_same_serve_settings() -> None:
    """`make run` parses cluster/serve_tuning.env; each cluster node sources it in sh: both see the same values."""
    parsed = serve_tuning()
    assert parsed["RAY_SERVE_LOG_TO_STDERR"] == "0" and parsed["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    # Unbuffered on the cluster: a buffer would hold the controller's decisions until it filled.
    assert "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE" not in parsed
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    script = f'set -a; . "{SERVE_TUNING_FILE}"; set +a; env'
    shell = subprocess.run(["sh", "-c", script], env=clean, capture_output=True, text=True, check=True, timeout=30)
    sourced = dict(line.split("=", 1) for line in shell.stdout.splitlines() if line.startswith("RAY_SERVE_"))
    assert sourced == parsed
