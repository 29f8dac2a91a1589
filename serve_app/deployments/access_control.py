"""The ingress's key check: a plain ASGI middleware in front of every route (see :mod:`serve_app.access.policy`).

It finds the operation a request is for by the table's own path templates (as ``/openapi.json`` names them),
looks up what it needs, and asks the replica's :class:`~serve_app.access.guard.AccessGuard`. A refusal is
answered here, in the API's error shape (``{"error": {"code", "message"}}``), before the route reads a byte of
the body. An operation the table does not list would pass unguarded, so an ingress replica refuses to start with
one (:func:`undecided_operations`), and ``tests/test_access.py`` checks the table against ``/openapi.json``. The
principal of an allowed request is left in ``scope["state"]["principal"]`` for the audit trail.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.access.audit import ACTIONS, REFUSALS_RECORDED, AuditTrail
from serve_app.access.guard import AccessGuard, Principal, Refusal
from serve_app.access.policy import DOCUMENTATION, ROUTE_ACCESS, Access, LegacyRoute, scopes_for
from serve_app.deployments.http_limits import send_error

#: An enrolment's answer is read for the face ids it names (it is small: ids and file names); no more than this.
ANSWER_READ_LIMIT = 256 * 1024

#: The table's operations as (method, path pattern, template).
_PATTERNS = [(method, compile_path(path)[0], path) for method, path in ROUTE_ACCESS]


def undecided_operations(app: FastAPI) -> set[tuple[str, str]]:
    """Operations of ``app`` without an access decision (an ingress replica with any refuses to start)."""
    paths = app.openapi().get("paths", {})
    return {(method.upper(), path) for path, operations in paths.items() for method in operations} - set(ROUTE_ACCESS)


class AccessControl:
    """Wraps the FastAPI app; ``state`` is the app's ``state``, whose ``access_guard`` and ``legacy_route`` the
    ingress replica sets (no guard: everything open, as before keys existed)."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard: AccessGuard | None = getattr(self.state, "access_guard", None)
        if scope["type"] != "http" or guard is None:
            await self.app(scope, receive, send)
            return
        found = _operation_of(scope)
        if found is None:  # documentation, the console's files, no such route (404) or method (405)
            await self.app(scope, receive, send)
            return
        operation, path_parameters = found
        legacy: LegacyRoute = getattr(self.state, "legacy_route", "open")
        needed = scopes_for(ROUTE_ACCESS[operation], legacy)
        key = _header(scope, b"x-api-key")
        if needed is not None and guard.needs_store(key):
            await asyncio.to_thread(guard.refresh, key)  # a store read: off the event loop
        client = str((scope.get("client") or ("unknown", 0))[0])
        decision = guard.decide(needed, key, client)
        trail: AuditTrail | None = getattr(self.state, "audit_trail", None)
        if isinstance(decision, Refusal):
            if trail is not None and decision.code in REFUSALS_RECORDED and (key is not None or decision.status != 401):
                _audit(
                    trail,
                    REFUSALS_RECORDED[decision.code],
                    decision.status,
                    client,
                    decision.who,
                    operation,
                    path_parameters,
                )
            await _answer(send, decision)
            return
        scope.setdefault("state", {})["principal"] = decision
        action = ACTIONS.get(operation)
        if trail is None or action is None:
            await self.app(scope, receive, send)
            return
        status = 500  # what a request that raises before answering is recorded with
        answer = bytearray()

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif (
                message["type"] == "http.response.body" and action == "faces.enrol" and len(answer) < ANSWER_READ_LIMIT
            ):
                answer.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            face_ids = _enrolled(bytes(answer)) if action == "faces.enrol" else ()
            _audit(trail, action, status, client, decision, operation, path_parameters, face_ids)


def _audit(
    trail: AuditTrail,
    action: str,
    status: int,
    client: str,
    who: Principal | None,
    operation: tuple[str, str],
    path_parameters: dict[str, str],
    face_ids: tuple[str, ...] = (),
) -> None:
    face_id = path_parameters.get("face_id")
    trail.event(
        action,
        status,
        client,
        key=who.name if who is not None else None,
        key_id=who.key_id if who is not None else None,
        operation=f"{operation[0]} {operation[1]}",
        person=path_parameters.get("name"),
        face_ids=face_ids or ((face_id,) if face_id else ()),
    )


def _enrolled(answer: bytes) -> tuple[str, ...]:
    try:
        body = json.loads(answer)
        return tuple(str(entry["face_id"]) for entry in body.get("enrolled", ()))
    except (ValueError, TypeError, KeyError, AttributeError):
        return ()


def _operation_of(scope: Scope) -> tuple[tuple[str, str], dict[str, str]] | None:
    """(method, path template) of the table's operation this request is for, and its path parameters; ``None``
    for anything else."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):  # an application under a route prefix: its own paths, as it declares them
        path = path[len(root) :] or "/"
    if path in DOCUMENTATION:
        return None
    method = "GET" if scope["method"] == "HEAD" else scope["method"]
    for allowed, pattern, template in _PATTERNS:
        matched = pattern.match(path)
        if allowed == method and matched:
            return (method, template), matched.groupdict()
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            try:
                return str(value.decode("latin-1")).strip() or None
            except UnicodeDecodeError:
                return None
    return None


async def _answer(send: Send, refusal: Refusal) -> None:
    headers: list[tuple[bytes, bytes]] = []
    if refusal.retry_after_s is not None:
        headers.append((b"retry-after", str(refusal.retry_after_s).encode()))
    if refusal.status == 401:
        headers.append((b"www-authenticate", b'ApiKey header="X-API-Key"'))
    await send_error(send, refusal.status, refusal.code, refusal.message, tuple(headers))


NEEDS: dict[Access, str] = {
    "recognize": "a key of scope `recognize`",
    "manage": "a key of scope `manage`",
    "any key": "a key of either scope",
    "legacy": "no key with `access.legacy_route: open` (the default), a `recognize` key with `key`",
}
REFUSALS = {
    401: "no key, or one that is unknown, revoked or mistyped",
    403: "a key without the scope this route needs",
    429: "over the key's request rate, or too many refused keys from this address (see Retry-After)",
}


def document_access(app: FastAPI) -> None:
    """Add the key (``X-API-Key``) and each operation's need and refusals to ``/openapi.json``, from the table."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["ApiKey"] = {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "Needed once keys exist (`facerec keys create`); until then every route is open.",
        }
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                access = ROUTE_ACCESS.get((method.upper(), path))
                if access is None or access == "open":
                    continue
                operation["security"] = [{"ApiKey": []}] if access != "legacy" else [{}, {"ApiKey": []}]
                need = f"Access: {NEEDS[access]}, once keys exist."
                operation["description"] = f"{operation.get('description', '')}\n\n{need}".strip()
                responses = operation.setdefault("responses", {})
                for status, why in REFUSALS.items():
                    responses.setdefault(
                        str(status),
                        {
                            "description": why,
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                        },
                    )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
