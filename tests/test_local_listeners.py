"""`make run` listens on loopback only, but for the one listener Ray Serve opens on every interface itself.

Every server the local stack starts (Serve's HTTP proxy, the dashboard, the metrics exporter, moto, Prometheus,
Ray's own GCS, raylet and workers) binds 127.0.0.1. Ray Serve 2.60 also starts an inter-deployment gRPC server in
every replica on ``[::]:0`` (``ray/serve/_private/replica.py``: ``add_port_to_grpc_server(self._server,
"[::]:0")``), with no setting to change it; that exception is named here so that anything else that opens a port
beyond loopback fails this test (README, "Reliability": "Listening sockets").
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from pathlib import Path

import pytest

from tests.listeners import Listener, _address, listeners
from tests.local_stack import running_local_stack

#: What Ray Serve's replicas are called in the process table (``ray::ServeReplica:<app>:<deployment>``).
SERVE_REPLICA = "ray::ServeReplica:"


@pytest.mark.parametrize(
    ("hex_address", "address", "loopback"),
    [
        ("0100007F", "127.0.0.1", True),
        ("00000000", "0.0.0.0", False),
        ("00000000000000000000000000000000", "::", False),
        ("00000000000000000000000001000000", "::1", True),
        ("0000000000000000FFFF00000100007F", "::ffff:127.0.0.1", True),
    ],
)
def test_proc_net_addresses_are_read_in_host_order(hex_address: str, address: str, loopback: bool) -> None:
    parsed = _address(hex_address)
    assert parsed == ipaddress.ip_address(address)
    assert Listener(parsed, 1, None, "?").loopback_only is loopback


def test_a_loopback_listener_is_found_with_its_process() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        found = [listener for listener in listeners() if listener.port == port]
    assert [(str(f.address), f.pid, f.loopback_only) for f in found] == [("127.0.0.1", os.getpid(), True)]


@pytest.mark.serve
def test_make_run_opens_nothing_beyond_loopback_but_serves_replica_grpc(tmp_path: Path) -> None:
    before = listeners()
    with running_local_stack(tmp_path) as (ports, _):
        opened = listeners() - before
    ours = {listener.port for listener in opened}
    # `make run` runs without Prometheus where it is not installed (`make test` installs it first).
    expected = {name: port for name, port in ports.items() if name != "prometheus" or shutil.which("prometheus")}
    assert set(expected.values()) <= ours, f"the stack's own ports {expected} are not all listening: {sorted(ours)}"

    beyond = [listener for listener in opened if not listener.loopback_only]
    serve_grpc = [
        listener
        for listener in beyond
        if listener.command.startswith(SERVE_REPLICA) and listener.address.is_unspecified
    ]
    others = [listener for listener in beyond if listener not in serve_grpc]
    print(
        f"\n{len(opened)} listeners opened, {len(opened) - len(beyond)} on loopback; "
        f"{len(serve_grpc)} Serve replica gRPC servers on every interface"
    )
    assert others == [], "listening beyond loopback:\n" + "\n".join(map(str, others))
    # One per replica at most: more would mean a second server of Ray's that this test does not know about.
    replicas = {listener.pid for listener in serve_grpc}
    assert len(serve_grpc) == len(replicas)
