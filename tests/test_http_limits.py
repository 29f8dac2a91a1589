"""The ingress's body limit and per-route metrics, as an ASGI middleware around a small FastAPI app (no Ray).

The app is called through ASGI directly, one ``http.request`` message per chunk, the way a server streams a
chunked upload.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Annotated, Any

from fastapi import FastAPI, File, UploadFile

from serve_app.deployments.http_limits import LimitsAndMetrics

LIMIT = 1000
BOUNDARY = "b0undary"


def make_app() -> tuple[FastAPI, list[tuple[str, int]]]:
    app = FastAPI()
    app.state.max_body_bytes = LIMIT
    seen: list[tuple[str, int]] = []

    def observe(route: str, status: int, _seconds: float) -> None:
        seen.append((route, status))

    app.add_middleware(LimitsAndMetrics, state=app.state, observe=observe)

    @app.post("/upload/{name}")
    async def upload(name: str, image: Annotated[UploadFile, File()]) -> dict[str, int | str]:
        return {"name": name, "bytes": len(await image.read()), "in_flight": app.state.in_flight}

    return app, seen


def multipart(payload: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'.encode()
    return head + payload + f"\r\n--{BOUNDARY}--\r\n".encode()


def call(
    app: FastAPI, method: str, path: str, chunks: list[bytes], declare_length: bool = True
) -> tuple[int, Any, int]:
    """(status, JSON body, chunks the app read) for one request whose body arrives in ``chunks``."""
    headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]
    if declare_length:
        headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
    else:
        headers.append((b"transfer-encoding", b"chunked"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    pending = list(chunks)
    read = 0
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not pending:
            await asyncio.sleep(3600)  # a client that keeps the connection open and sends nothing more
        read += 1
        return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return int(start["status"]), json.loads(body), read


def test_a_body_within_the_limit_reaches_the_route_and_is_counted() -> None:
    app, seen = make_app()
    status, body, _ = call(app, "POST", "/upload/a", [multipart(b"x" * 100)])
    assert (status, body) == (200, {"name": "a", "bytes": 100, "in_flight": 1})
    assert seen == [("/upload/{name}", 200)]
    assert app.state.in_flight == 0


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    app, seen = make_app()
    status, body, read = call(app, "POST", "/upload/a", [multipart(b"x" * LIMIT)])
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert read == 0
    assert seen == [("unmatched", 413)]


def test_a_chunked_body_without_length_is_cut_off_at_the_limit() -> None:
    app, seen = make_app()
    body_bytes = multipart(b"x" * 10 * LIMIT)
    chunks = [body_bytes[i : i + 200] for i in range(0, len(body_bytes), 200)]
    status, body, read = call(app, "POST", "/upload/a", chunks, declare_length=False)
    assert status == 413 and "over the 1000-byte limit" in body["error"]["message"]
    assert read == LIMIT // 200 + 1  # stopped at the chunk that passed the limit: the rest was never read
    assert seen[-1][1] == 413
    assert app.state.in_flight == 0
    # A chunked body within the limit is served as usual.
    small = multipart(b"y" * 300)
    status, body, _ = call(app, "POST", "/upload/b", [small[:100], small[100:]], declare_length=False)
    assert status == 200 and body["bytes"] == 300


def test_unknown_routes_are_counted_as_unmatched() -> None:
    app, seen = make_app()
    status, _, _ = call(app, "POST", "/nowhere", [b""])
    assert status == 404
    assert seen == [("unmatched", 404)]
