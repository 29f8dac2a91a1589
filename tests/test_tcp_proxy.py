"""The outage tests' proxy: it forwards, it cuts (resets open connections, refuses new ones), and it comes back."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.tcp_proxy import cuttable_proxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(connection,), daemon=True).start()

    def echo(connection: socket.socket) -> None:
        with connection:
            while data := connection.recv(4096):
                connection.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(5)
    server.close()


def roundtrip(connection: socket.socket, payload: bytes) -> bytes:
    connection.sendall(payload)
    return connection.recv(4096)


def test_the_proxy_forwards_cuts_and_restores(echo_port: int) -> None:
    with cuttable_proxy(echo_port) as proxy:
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        assert roundtrip(held, b"hello") == b"hello"
        proxy.cut()
        with pytest.raises(OSError):  # the open connection was reset (or reads as closed)
            if roundtrip(held, b"again") == b"":
                raise ConnectionResetError("closed")
        with pytest.raises(ConnectionRefusedError):  # nothing listens: a new request never reaches the service
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        proxy.restore()
        after = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        assert roundtrip(after, b"back") == b"back"
        for connection in (held, after):
            connection.close()
