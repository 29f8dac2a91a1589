"""Which key each HTTP route needs: one table for the whole API, read by the ingress and by its documentation.

Every operation is listed here with what it needs (:data:`ROUTE_ACCESS`); the ingress refuses a route it cannot
find here (a new route without a decision is closed, not open), and ``tests/test_access.py`` checks every
operation of ``/openapi.json`` against this table.

* ``open``: no key, ever (the health check; the console's static files are outside the API).
* ``recognize``: recognition, verification and detection: they compare a photo with the gallery, or find faces.
* ``manage``: everything that reads or changes the gallery: people, faces, chips, re-embedding.
* ``any key``: the service's status (either scope may read it: the console needs it to start).
* ``legacy``: the old contract's ``POST /``, which has no key: ``open`` (existing clients keep working, a warning
  at start says so) or ``key`` (a ``recognize`` key), as the operator chooses (``access.legacy_route``).

Only once keys exist (one made with ``facerec keys create``, or ``FACEREC_API_KEY`` set) are keys needed at all:
a service with none is open, as ``make run`` is on loopback. A revoked key still counts: revoking the last key
leaves the service closed, not open to everyone.
"""

from __future__ import annotations

from typing import Literal

Access = Literal["open", "recognize", "manage", "any key", "legacy"]
LegacyRoute = Literal["open", "key"]

#: (method, path as the API declares it) -> what it needs.
ROUTE_ACCESS: dict[tuple[str, str], Access] = {
    ("POST", "/"): "legacy",
    ("GET", "/"): "open",  # a browser asking for / is sent to the console; nothing else answers there
    ("GET", "/healthz"): "open",
    ("GET", "/v1/status"): "any key",
    ("POST", "/v1/recognize"): "recognize",
    ("POST", "/v1/detect"): "recognize",
    ("POST", "/v1/verify"): "recognize",
    ("GET", "/v1/people"): "manage",
    ("GET", "/v1/people/{name}"): "manage",
    ("DELETE", "/v1/people/{name}"): "manage",
    ("POST", "/v1/people/{name}/faces"): "manage",
    ("DELETE", "/v1/people/{name}/faces/{face_id}"): "manage",
    ("GET", "/v1/people/{name}/faces/{face_id}/image"): "manage",
    ("GET", "/v1/gallery"): "manage",
    ("POST", "/v1/gallery/reembed"): "manage",
}

#: The framework's own pages: the API's description, open like its source code (they hold no data).
DOCUMENTATION = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def scopes_for(access: Access, legacy_route: LegacyRoute) -> frozenset[str] | None:
    """The scopes any one of which grants ``access`` (``None``: no key needed)."""
    if access == "legacy":
        access = "open" if legacy_route == "open" else "recognize"
    if access == "open":
        return None
    if access == "any key":
        return frozenset({"recognize", "manage"})
    return frozenset({access})
