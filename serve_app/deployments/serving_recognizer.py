"""A Recognizer replica that also serves the HTTP API: one hop fewer for every request.

Serve's proxy hands each HTTP request to a replica of the application's ingress. When the ingress is its own
deployment, every photo then crosses a second actor call to a Recognizer replica and back, and the ingress
process spends CPU on both (on 2 cores, 0.21-0.29 of a core at 100 concurrent clients, about an eighth of the
machine). Here the routes of :class:`IngressDeployment` run inside each Recognizer replica and put photos straight
into that replica's batch queue; the proxy already spreads requests over the replicas by their queue lengths.
Measured on 2 cores with 100 concurrent clients (``bench/http_load.py``): 46.8 against 33.4 photos per second
at 64x64, 30.2 against 26.8 on LFW photos.

:mod:`serve_app.app` uses this with ``ingress: in_recognizer`` only. It is not the default: a replica that dies
takes the HTTP requests it holds with it (Serve's proxy does not send them again), where a separate ingress
resends them to another replica. It is refused where the queue-depth controller may scale the Recognizer to zero
(an HTTP route needs a replica that is always up, and the controller learns HTTP demand from the ingress) and in
queue mode (the ingress talks to the queues, not to a model).

The replica keeps the Recognizer's handle API (``recognize``, ``detect``, ``embed``, ``enrol``, ``info``), so the
SQS bridge and the tests call it by the same deployment name either way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

import numpy as np
from ray.serve.handle import DeploymentHandle

from serve_app.deployments.ingress import AccessWiring, IngressDeployment, IngressLimits
from serve_app.deployments.recognizer import RecognizerDeployment, RecognizerOptions
from serve_app.jobs import Detections, DetectJob, EmbedJob, EnrolJob, JobError, RecognizeJob
from serve_app.model.enrollment import EnrolmentPhoto
from serve_app.model.recognizer import ImageResult

R = TypeVar("R")


class LocalMethod(Generic[R]):
    """``.remote(...)`` on this replica's own Recognizer: what a handle's method offers, without the hop."""

    def __init__(self, method: Callable[..., Awaitable[R]]) -> None:
        self._method = method

    def remote(self, *args: Any, **kwargs: Any) -> Awaitable[R]:
        return self._method(*args, **kwargs)


class LocalRecognizer:
    """The Recognizer methods the ingress calls, on the Recognizer in the same process."""

    def __init__(self, recognizer: RecognizerDeployment) -> None:
        self.recognize = LocalMethod(recognizer.recognize)
        self.detect = LocalMethod(recognizer.detect)
        self.embed = LocalMethod(recognizer.embed)
        self.enrol = LocalMethod(recognizer.enrol)

        async def info() -> dict[str, Any]:
            return recognizer.info()

        self.info = LocalMethod(info)


class ServingRecognizer(IngressDeployment):
    """The HTTP routes of :class:`IngressDeployment` over a :class:`RecognizerDeployment` in the same replica."""

    async def __init__(  # type: ignore[misc]  # serve.ingress makes the parent's __init__ a coroutine
        self,
        options: RecognizerOptions,
        writer: DeploymentHandle[Any],
        limits: IngressLimits,
        model_id: str,
        threshold: float,
        bridge_app: str | None = None,
        access: AccessWiring | None = None,
    ) -> None:
        self._model = RecognizerDeployment(options, writer)
        local = cast(DeploymentHandle[Any], LocalRecognizer(self._model))
        await super().__init__(  # type: ignore[misc]
            local, writer, limits, model_id, threshold, bridge_app=bridge_app, access=access
        )

    # --- the Recognizer's handle API (the SQS bridge, /healthz of a separate ingress, tests) ---------------
    async def recognize(self, job: RecognizeJob) -> ImageResult | JobError:
        return await self._model.recognize(job)

    async def detect(self, job: DetectJob) -> Detections | JobError:
        return await self._model.detect(job)

    async def embed(self, job: EmbedJob) -> np.ndarray | JobError | None:
        return await self._model.embed(job)

    async def enrol(self, job: EnrolJob) -> list[EnrolmentPhoto]:
        return await self._model.enrol(job)

    def info(self) -> dict[str, Any]:
        return self._model.info()

    # --- supervision: both halves' background loops ------------------------------------------------------
    def check_health(self) -> None:
        self._model.check_health()
        super().check_health()

    def background_tasks(self) -> list[str]:
        return [*self._model.background_tasks(), *super().background_tasks()]

    def kill_background_task(self, name: str) -> None:
        if name in self._model.background_tasks():
            self._model.kill_background_task(name)
        else:
            super().kill_background_task(name)


__all__ = ["LocalRecognizer", "ServingRecognizer"]
