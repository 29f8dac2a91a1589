"""Errors raised inside another deployment answer as themselves; Ray's own failures answer 503 with Retry-After."""

from __future__ import annotations

import asyncio
import json

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve_app.deployments import ingress
from serve_app.deployments.ingress import APIError
from serve_app.gallery_store import GalleryStoreError


def raised_in_a_deployment(cause: Exception) -> Exception:
    """What awaiting a handle gives when the deployment raised ``cause``: a RayTaskError that is also a ``cause``."""
    wrapped = RayTaskError("GalleryWriter.add_faces", "Traceback (most recent call last): ...", cause)  # type: ignore[no-untyped-call]
    dual: Exception = wrapped.as_instanceof_cause()  # type: ignore[no-untyped-call]
    return dual


def answer(error: Exception) -> tuple[int, str, str | None]:
    """The ingress's answer to ``error`` escaping a route, through the handler the app picks for its class."""
    handler = next(
        ingress.app.exception_handlers[klass]
        for klass in type(error).__mro__
        if klass in ingress.app.exception_handlers
    )
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""})
    response: JSONResponse = asyncio.run(handler(request, error))  # type: ignore[arg-type]
    code = json.loads(bytes(response.body))["error"]["code"]
    return response.status_code, code, response.headers.get("Retry-After")


def test_a_gallery_store_error_from_the_writer_is_gallery_unavailable() -> None:
    error = raised_in_a_deployment(GalleryStoreError("the bucket cannot be reached"))
    assert isinstance(error, GalleryStoreError)  # how Ray hands it over: both at once, RayError first
    assert answer(error) == (503, "gallery_unavailable", "5")


def test_an_api_error_from_another_deployment_keeps_its_status_and_code() -> None:
    error = raised_in_a_deployment(APIError(404, "person_not_found", "no such person"))
    assert answer(error) == (404, "person_not_found", None)


def test_a_lost_replica_is_503_with_retry_after() -> None:
    assert answer(ActorDiedError()) == (503, "unavailable", "2")
    assert answer(raised_in_a_deployment(ActorDiedError())) == (503, "unavailable", "2")


def test_a_bug_in_another_deployment_is_raised_as_itself_for_a_500() -> None:
    with pytest.raises(ValueError, match="a bug"):
        answer(raised_in_a_deployment(ValueError("a bug")))
