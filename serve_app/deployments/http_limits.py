"""The ingress's outermost layer: the request-body limit, the in-flight count and the per-route metrics.

A plain ASGI middleware rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs every
request through an extra task and memory stream, a measurable share of the ingress's CPU per request, and it
cannot stop a body that arrives without a ``Content-Length``. Here the limit holds for both: a declared length
over the limit is refused before a byte is read, and a chunked body is counted as it streams in and refused
(413) the moment it passes the limit, without buffering it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Called once per request with (route path or "unmatched", status code, seconds).
Observer = Callable[[str, int, float], None]


class LimitsAndMetrics:
    """Wraps the FastAPI app; ``state`` is the app's ``state`` (``max_body_bytes``, ``in_flight``)."""

    def __init__(self, app: ASGIApp, state: Any, observe: Observer) -> None:
        self.app = app
        self.state = state
        self.observe = observe
        state.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        limit: int | None = getattr(self.state, "max_body_bytes", None)
        status: int | None = None  # set when a response starts
        refused = False
        seen = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if refused:
                return  # the 413 went out: whatever the app answers to the cut-off body is dropped
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        async def counting_receive() -> Message:
            nonlocal seen, refused, status
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request" and limit is not None:
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Answer now and tell the app the client went away: nothing more is read or buffered.
                    if status is None:
                        await _refuse(send, f"the request body is over the {limit}-byte limit")
                        status = 413
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        declared = _content_length(scope)
        try:
            if limit is not None and declared is not None and declared > limit:
                await _refuse(send_status, f"the request body is {declared} bytes; the limit is {limit}")
                return
            self.state.in_flight += 1
            try:
                await self.app(scope, counting_receive, send_status)
            finally:
                self.state.in_flight -= 1
        finally:
            route = scope.get("route")
            # No response at all: the app failed before answering, which the client sees as a 500.
            self.observe(getattr(route, "path", "unmatched"), status or 500, time.perf_counter() - started)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _refuse(send: Send, message: str) -> None:
    await send_error(send, 413, "body_too_large", message)


async def send_error(
    send: Send, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """Answer from an ASGI layer in the API's error shape, ``{"error": {"code", "message"}}``."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})
