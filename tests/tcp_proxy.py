"""A TCP proxy on 127.0.0.1 that a test can cut and restore: an outage of whatever sits behind it.

It runs its own asyncio loop on a thread. A cut resets every open connection and stops listening, so new ones are
refused until the restore: what a client sees when an endpoint goes away. Refusing (rather than accepting and
resetting) keeps the two kinds of failure apart the way a real outage does: a refused request never reached the
service, a reset one may have been carried out without its reply coming back.

The proxy listens on a port below the kernel's ephemeral range, so that no outgoing connection can take it while
it is dark and it can listen on it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Iterator
from pathlib import Path


class CuttableProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._cut = threading.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cuttable-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CuttableProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until :meth:`restore`."""
        self._cut.set()
        asyncio.run_coroutine_threadsafe(self._go_dark(), self._loop).result(10)

    def restore(self) -> None:
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self._cut.clear()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        await self._reset_all()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen_first())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            if self._server is not None:
                self._server.close()
            self._loop.close()

    async def _listen_first(self) -> None:
        low = _ephemeral_low()
        for _ in range(100):
            self.port = random.randrange(max(1024, low - 12000), low)
            with contextlib.suppress(OSError):
                await self._listen()
                return
        raise RuntimeError("no free port below the ephemeral range")

    async def _listen(self) -> None:
        # reuse_address (asyncio's default here) lets the port be bound again while old connections linger.
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _go_dark(self) -> None:
        if self._server is not None:
            self._server.close()  # stops listening; the connections already open are reset below
            self._server = None
        await self._reset_all()

    async def _reset_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut.is_set():
            _reset(writer)
            return
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _reset(writer)
            return
        self._writers.update((writer, upstream_writer))
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            self._writers.difference_update((writer, upstream_writer))
            for side in (writer, upstream_writer):
                _reset(side)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        writer.write_eof()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _reset(writer: asyncio.StreamWriter) -> None:
    # abort() drops the connection at once (an RST where the socket allows), unlike a polite close.
    with contextlib.suppress(Exception):
        writer.transport.abort()


@contextlib.contextmanager
def cuttable_proxy(target_port: int) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy(target_port).start()
    try:
        yield proxy
    finally:
        proxy.stop()
