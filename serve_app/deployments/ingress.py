"""The HTTP ingress: the legacy ``POST /`` contract and the JSON API, in front of the Recognizer.

Bad input never becomes a 500: a missing part is 400, a body over the limit 413, bytes that are not an image
415, an image that cannot be decoded or has absurd dimensions 422, each with a JSON body that says what is
wrong. Once API keys exist, every route but ``/healthz`` needs one of the right scope in ``X-API-Key``
(:mod:`serve_app.deployments.access_control`, :mod:`serve_app.access.policy`).
"""

import asyncio
import inspect
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, File, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from aws_stack.stack import StackConfig
from serve_app.access.audit import FLUSH_S as AUDIT_FLUSH_S
from serve_app.access.audit import AuditTrail
from serve_app.access.guard import AccessGuard, Principal
from serve_app.access.keys import KeyRing
from serve_app.access.settings import AccessConfig
from serve_app.api_models import (
    Detection,
    Enrolment,
    Error,
    FaceForgotten,
    GalleryInfo,
    Health,
    People,
    Person,
    PersonForgotten,
    Recognition,
    Reembedding,
    ReembedRequest,
    ServiceStatus,
    Verification,
)
from serve_app.deployments.access_control import AccessControl, document_access, undecided_operations
from serve_app.deployments.http_limits import LimitsAndMetrics
from serve_app.deployments.replica_calls import REPLICA_LOST, idempotent
from serve_app.deployments.supervision import BackgroundTasks, Supervised
from serve_app.gallery_store import GalleryStore, GalleryStoreError, open_gallery_store
from serve_app.jobs import DetectJob, EmbedJob, EnrolJob, JobError, RecognizeJob
from serve_app.metrics import metrics
from serve_app.model.gallery import GalleryError, ModelMismatchError
from serve_app.model.recognizer import ImageResult
from serve_app.queue_mode.answer_inbox import inbox_name
from serve_app.queue_mode.queue_client import QueueClient, QueueTimeoutError, QueueUnavailableError
from serve_app.results import detection_to_dict, image_result_to_dict
from serve_app.upload_names import safe_filename, safe_stem

log = logging.getLogger(f"ray.serve.{__name__}")

API_KEY_ENV = "FACEREC_API_KEY"
NAME_PATTERN = re.compile(r"^[\w][\w .'\-]{0,99}$")

# InvalidImageError.reason -> HTTP status.
STATUS_FOR_REASON = {"empty": 400, "not_an_image": 415, "truncated": 422, "bad_size": 422, "too_large": 422}

app = FastAPI(
    title="facerec",
    version="0.1.0",
    description="Face recognition: the legacy `POST /` contract and a JSON API for recognition and the gallery.",
)


class APIError(Exception):
    """An error answer with a JSON body ``{"error": {"code": ..., "message": ...}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@app.exception_handler(APIError)
async def _problem(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own parameter checks (a query value out of range, a malformed body) answer in the same shape as
    # every other error, so clients and the schema see one error format.
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
        for error in exc.errors()
    )
    return JSONResponse({"error": {"code": "bad_request", "message": problems or "invalid request"}}, status_code=422)


#: Codes for the web framework's own refusals (a body it cannot parse, an unknown route or method).
FRAMEWORK_ERROR_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


@app.exception_handler(StarletteHTTPException)
async def _framework_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # The framework refuses some requests itself (a multipart body without headers is "Invalid multipart data.",
    # an unknown route 404): the same error shape as every other answer, same status and headers.
    code = FRAMEWORK_ERROR_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return JSONResponse(
        {"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code, headers=exc.headers
    )


async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    # Every retry met a lost or overloaded replica: the client may try again shortly, and it is not a bug (500).
    log.warning("answering 503: %s", exc)
    return JSONResponse(
        {"error": {"code": "unavailable", "message": "no replica could take the request; try again shortly"}},
        status_code=503,
        headers={"Retry-After": "2"},
    )


async def _ray_error(request: Request, exc: Exception) -> Response:
    # An error raised inside another deployment arrives as a RayTaskError that is also an instance of its cause
    # (Ray builds the class from both), and RayError comes first in that class's MRO: the handler is looked up
    # here by the cause (a gallery store out of reach is "gallery_unavailable", an APIError its own answer).
    cause = exc.cause if isinstance(exc, RayTaskError) else None
    if isinstance(cause, Exception) and not isinstance(cause, RayError):
        for klass in type(cause).__mro__:
            handler = app.exception_handlers.get(klass)
            if handler is not None:
                answer = handler(request, cause)
                return await answer if inspect.isawaitable(answer) else answer
        raise cause  # a bug in the deployment that raised it: a 500, as it would be in the ingress itself
    return await _unavailable(request, exc)


for _lost in REPLICA_LOST:
    app.add_exception_handler(_lost, _ray_error)
# Any other failure of Ray itself (an actor that could not be placed on a node going away, a lost object) is the
# cluster's, not the request's: the client may send it again (503 with Retry-After), never a bare 500.
app.add_exception_handler(RayError, _ray_error)


@app.exception_handler(GalleryStoreError)
async def _gallery_unavailable(_: Request, exc: GalleryStoreError) -> JSONResponse:
    # The GalleryWriter could not read or write the snapshot (the store is unreachable); its memory is unchanged.
    log.warning("answering 503: gallery store unavailable: %s", exc)
    return JSONResponse(
        {
            "error": {
                "code": "gallery_unavailable",
                "message": "the gallery store cannot be reached; try again shortly",
            }
        },
        status_code=503,
        headers={"Retry-After": "5"},
    )


@app.exception_handler(ModelMismatchError)
async def _model_switching(_: Request, exc: ModelMismatchError) -> JSONResponse:
    # An enrolment embedded by a replica of the model being switched from (or to), without chips to embed again.
    log.warning("answering 503: %s", exc)
    return JSONResponse(
        {"error": {"code": "model_switching", "message": f"the model is being switched; try again shortly ({exc})"}},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def _recognizers_running() -> int | None:
    """How many Recognizer replicas of this application Serve reports running (``None`` if it cannot say)."""
    try:
        application = serve.status().applications[serve.get_replica_context().app_name]
        deployment = application.deployments["Recognizer"]
    except (RayServeException, RayError, KeyError) as exc:
        log.warning("could not read the Recognizer's replicas from Serve: %s", exc)
        return None
    return sum(count for state, count in deployment.replica_states.items() if str(state).endswith("RUNNING"))


#: The console's static files (plain HTML, CSS and JavaScript modules; no build step).
CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
app.mount("/ui", StaticFiles(directory=CONSOLE_DIR, html=True), name="console")


def chip_path(name: str, face_id: str) -> str:
    """The URL path of a face's chip."""
    return f"/v1/people/{quote(name, safe='')}/faces/{face_id}/image"


def _observe(route: str, status: int, seconds: float) -> None:
    metrics().requests.inc(tags={"route": route, "status": str(status)})
    metrics().request_latency_ms.observe(seconds * 1000.0, tags={"route": route})


# Added first, so it runs inside the limits and metrics: a refused key is counted like any other answer.
app.add_middleware(AccessControl, state=app.state)
document_access(app)
app.add_middleware(LimitsAndMetrics, state=app.state, observe=_observe)


@dataclass(frozen=True)
class IngressLimits:
    max_upload_bytes: int
    max_body_bytes: int
    max_enrol_photos: int


@dataclass(frozen=True)
class AccessWiring:
    """Where the keys are (the gallery store) and how they are applied."""

    config: AccessConfig
    gallery_uri: str
    gallery_endpoint: str | None = None


@dataclass(frozen=True)
class QueueSettings:
    stack: StackConfig
    timeout_s: float


FileParam = Annotated[UploadFile | None, File()]

#: The error answers a route can give, for /docs: every one has the body of :class:`Error`.
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "content": {"application/json": {}}} for code in (400, 413, 415, 422, 503)
}
GALLERY_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Error} for code in (401, 404, 422)}

#: OpenAPI links: what an enrolment's answer (and a person's) lets a client do next, by the names and face ids it
#: holds. Clients and stateful fuzzing (``tests/test_api_fuzz.py``) follow them.
_FIRST_FACE = "$response.body#/enrolled/0/face_id"
ENROLMENT_LINKS = {
    "GetPerson": {"operationId": "get_person", "parameters": {"name": "$response.body#/name"}},
    "GetFaceImage": {
        "operationId": "get_face_image",
        "parameters": {"name": "$response.body#/name", "face_id": _FIRST_FACE},
    },
    "ForgetFace": {
        "operationId": "forget_face",
        "parameters": {"name": "$response.body#/name", "face_id": _FIRST_FACE},
    },
    "ForgetPerson": {"operationId": "forget_person", "parameters": {"name": "$response.body#/name"}},
}
PERSON_LINKS = {
    "GetFaceImage": {
        "operationId": "get_face_image",
        "parameters": {"name": "$response.body#/name", "face_id": "$response.body#/face_ids/0"},
    },
    "ForgetPerson": {"operationId": "forget_person", "parameters": {"name": "$response.body#/name"}},
}


@serve.ingress(app)
class IngressDeployment(Supervised):
    """FastAPI routes; the work is done by the Recognizer and GalleryWriter deployments, through handles."""

    def __init__(
        self,
        recognizer: DeploymentHandle[Any],
        writer: DeploymentHandle[Any],
        limits: IngressLimits,
        model_id: str,
        threshold: float,
        queue: QueueSettings | None = None,
        controller_app: str | None = None,
        bridge_app: str | None = None,
        access: AccessWiring | None = None,
    ) -> None:
        self._recognizer = recognizer
        self._writer = writer
        self._limits = limits
        self._model_id = model_id
        self._threshold = threshold
        # Keys and the audit trail live in the gallery store: one client for both.
        store = open_gallery_store(access.gallery_uri, access.gallery_endpoint) if access is not None else None
        self._access = self._guard(access.config if access is not None else AccessConfig(), store)
        self._audit = self._audit_trail(store)
        self._bridge_app = bridge_app
        app.state.max_body_bytes = limits.max_body_bytes
        self._queue: QueueClient | None = None
        if queue is not None:
            # Queue mode: POST / goes through S3 + SQS like the legacy web tier, answered by the SQS bridge
            # through this replica's own inbox (started here, on this node).
            replica = serve.get_replica_context().replica_id.unique_id
            self._queue = QueueClient.for_stack(queue.stack, inbox_name(replica), queue.timeout_s)
            self._queue.inbox()
        self._background = BackgroundTasks()
        if self._audit is not None:
            self._background.start("audit trail", self._write_audit(self._audit))
        if controller_app is not None:
            # On a cluster the queue-depth controller sizes the Recognizer; it sees HTTP demand only through this.
            self._background.start("in-flight reporter", self._report_in_flight(controller_app))

    async def _report_in_flight(self, controller_app: str, every_s: float = 2.0) -> None:
        source = serve.get_replica_context().replica_id.unique_id
        while True:
            try:
                controller = serve.get_app_handle(controller_app)
                await controller.report.remote(source, int(getattr(app.state, "in_flight", 0)))
            except (RayServeException, RayError) as error:  # the controller may be restarting: the next report retries
                log.warning("could not report in-flight requests to %s: %s", controller_app, error)
            await asyncio.sleep(every_s)

    @staticmethod
    def _audit_trail(store: GalleryStore | None) -> AuditTrail | None:
        """This replica's audit trail (:mod:`serve_app.access.audit`), kept in the gallery store."""
        if store is None:
            return None
        try:
            writer = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # not in a Serve replica (a unit test): a random writer name
            writer = None
        trail = AuditTrail(store, writer)
        app.state.audit_trail = trail
        return trail

    async def _write_audit(self, trail: AuditTrail) -> None:
        while True:
            await asyncio.sleep(AUDIT_FLUSH_S)
            try:
                await asyncio.to_thread(trail.flush)
            except (GalleryStoreError, RuntimeError) as exc:  # kept for the next flush
                log.warning("audit trail not written (%d events kept for the next try): %s", trail.buffered, exc)

    @staticmethod
    def _guard(config: AccessConfig, store: GalleryStore | None) -> AccessGuard:
        """This replica's key check, installed for the middleware (see :mod:`serve_app.access.guard`)."""
        undecided = undecided_operations(app)
        if undecided:  # it would be served without a key check: a bug, caught before serving anything
            raise RuntimeError(f"operations without an access decision in serve_app/access/policy.py: {undecided}")
        keyring = KeyRing(store) if store is not None else None
        # Read here, in the replica, not at bind time: the key arrives through the runtime environment.
        guard = AccessGuard(keyring, os.environ.get(API_KEY_ENV), config.limits())
        guard.refresh(None)
        app.state.access_guard, app.state.legacy_route = guard, config.legacy_route
        if guard.keys_required():
            if config.legacy_route == "open":
                log.warning("API keys are required on every route but the legacy POST /, which stays open")
        else:
            log.warning("no API key exists: every route is open (make one with `facerec keys create`)")
        return guard

    # --- helpers ------------------------------------------------------------------------------------------
    async def _read(self, upload: UploadFile | None, part: str) -> tuple[str, bytes]:
        if upload is None:
            raise APIError(400, "missing_part", f"the multipart part {part!r} is missing")
        data = await upload.read(self._limits.max_upload_bytes + 1)
        if len(data) > self._limits.max_upload_bytes:
            raise APIError(
                413, "file_too_large", f"{part!r} is over the {self._limits.max_upload_bytes}-byte upload limit"
            )
        return upload.filename or part, data

    @staticmethod
    def _raise_for(result: Any, label: str) -> None:
        if isinstance(result, JobError):
            raise APIError(STATUS_FOR_REASON.get(result.reason, 422), result.reason, f"{label}: {result.message}")

    @staticmethod
    def _check_name(name: str) -> str:
        name = name.strip()
        if not NAME_PATTERN.match(name):
            raise APIError(
                422, "bad_name", "a name is 1-100 letters, digits, spaces or . ' - _ and starts with a letter or digit"
            )
        return name

    async def _recognize(
        self, data: bytes, label: str, threshold: float | None = None, top_k: int | None = None
    ) -> ImageResult:
        job = RecognizeJob(data, threshold=threshold, top_k=top_k)
        result: ImageResult | JobError = await idempotent(lambda: self._recognizer.recognize.remote(job), label)
        self._raise_for(result, label)
        assert isinstance(result, ImageResult)
        return result

    # --- the legacy contract ------------------------------------------------------------------------------
    @app.post(
        "/",
        response_class=PlainTextResponse,
        summary="Legacy: the main face's name as `<stem>:<Name>`",
        responses={
            **UPLOAD_ERRORS,
            504: {"model": Error, "content": {"application/json": {}}, "description": "queue mode: no answer in time"},
        },
    )
    async def legacy(self, input_file: Annotated[UploadFile | None, File(alias="inputFile")] = None) -> Response:
        filename, data = await self._read(input_file, "inputFile")
        stem = safe_stem(filename)
        if self._queue is not None:
            try:
                name = await self._queue.recognize(safe_filename(filename), data)
            except QueueTimeoutError as exc:
                raise APIError(504, "queue_timeout", str(exc)) from exc
            except QueueUnavailableError as exc:
                log.warning("queue mode: %s", exc)
                raise APIError(503, "queue_unavailable", "the request queue cannot be reached; try again") from exc
            return PlainTextResponse(f"{stem}:{name}")
        result = await self._recognize(data, filename)
        return PlainTextResponse(f"{stem}:{result.main_name or 'Unknown'}")

    # --- JSON API -----------------------------------------------------------------------------------------
    @app.post(
        "/v1/recognize",
        summary="Every face in the photo: box, landmarks, name or null, similarity",
        responses=UPLOAD_ERRORS,
    )
    async def recognize_photo(
        self,
        image: FileParam = None,
        top_k: Annotated[int | None, Query(ge=1, le=100)] = None,
        threshold: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
    ) -> Recognition:
        filename, data = await self._read(image, "image")
        result = await self._recognize(data, filename, threshold, top_k)
        return Recognition.model_validate({"filename": filename, **image_result_to_dict(result)})

    @app.post("/v1/detect", summary="Faces only: boxes, detection scores and landmarks", responses=UPLOAD_ERRORS)
    async def detect_faces(self, image: FileParam = None) -> Detection:
        filename, data = await self._read(image, "image")
        job = DetectJob(data)
        result = await idempotent(lambda: self._recognizer.detect.remote(job), filename)
        self._raise_for(result, filename)
        return Detection.model_validate(
            {
                "filename": filename,
                "width": result.width,
                "height": result.height,
                "faces": [detection_to_dict(face) for face in result.faces],
            }
        )

    @app.post("/v1/verify", summary="Are the main faces of two photos the same person?", responses=UPLOAD_ERRORS)
    async def verify(self, image1: FileParam = None, image2: FileParam = None) -> Verification:
        (name1, data1), (name2, data2) = await self._read(image1, "image1"), await self._read(image2, "image2")
        first, second = await asyncio.gather(
            idempotent(lambda: self._recognizer.embed.remote(EmbedJob(data1)), name1),
            idempotent(lambda: self._recognizer.embed.remote(EmbedJob(data2)), name2),
        )
        self._raise_for(first, name1)
        self._raise_for(second, name2)
        missing = [n for n, v in ((name1, first), (name2, second)) if v is None]
        if missing:
            raise APIError(422, "no_face", f"no face found in {', '.join(missing)}")
        similarity = float(np.dot(first, second))
        return Verification(
            same_person=similarity >= self._threshold,
            similarity=round(similarity, 4),
            threshold=self._threshold,
            model_id=self._model_id,
        )

    # --- the gallery --------------------------------------------------------------------------------------
    @app.get("/v1/people", summary="Enrolled people and how many faces each has")
    async def people(self) -> People:
        (people, revision), snapshots = await asyncio.gather(
            self._writer.people.remote(), self._writer.snapshots.remote()
        )
        return People.model_validate(
            {
                "people": [{"name": n, "faces": c} for n, c in people.items()],
                "revision": revision,
                "model_id": snapshots[0].model_id,
                "snapshots": [s.__dict__ for s in snapshots],
            }
        )

    @app.get("/v1/gallery", summary="The gallery's snapshots (one per model) and the last re-embedding")
    async def gallery(self) -> GalleryInfo:
        snapshots, progress = await asyncio.gather(
            self._writer.snapshots.remote(), self._writer.reembed_progress.remote()
        )
        return GalleryInfo.model_validate(
            {
                "model_id": snapshots[0].model_id,
                "snapshots": [s.__dict__ for s in snapshots],
                "reembedding": progress,
            }
        )

    @app.post(
        "/v1/gallery/reembed",
        status_code=202,
        summary="Embed every enrolled face again with another checkpoint (beside the current snapshot)",
        responses={code: {"model": Error} for code in (400, 401, 409)},
    )
    async def reembed(self, request: ReembedRequest) -> Reembedding:
        try:
            progress = await self._writer.reembed.remote(request.checkpoint, request.flip)
        except GalleryError as exc:
            raise APIError(409, "conflict", str(exc)) from exc
        except ValueError as exc:
            raise APIError(400, "unknown_checkpoint", str(exc)) from exc
        return Reembedding.model_validate(progress)

    @app.get(
        "/v1/people/{name}",
        operation_id="get_person",
        summary="One enrolled person and their face ids",
        responses={**GALLERY_ERRORS, 200: {"links": PERSON_LINKS}},
    )
    async def person(self, name: str) -> Person:
        faces, revision = await self._writer.person.remote(name)
        if not faces:
            raise APIError(404, "unknown_person", f"nobody called {name!r} is enrolled")
        return Person.model_validate(
            {
                "name": name,
                "face_ids": [face_id for face_id, _ in faces],
                "faces": len(faces),
                "face_list": [
                    {"face_id": face_id, "image": chip_path(name, face_id) if chip else None} for face_id, chip in faces
                ],
                "revision": revision,
            }
        )

    @app.get(
        "/v1/people/{name}/faces/{face_id}/image",
        operation_id="get_face_image",
        summary="The face's chip: the aligned crop it was enrolled from (JPEG)",
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}}, "description": "the chip"},
            404: {"model": Error, "description": "no such face, or a face enrolled without a chip"},
        },
    )
    async def face_image(self, name: str, face_id: str) -> Response:
        chip = await self._writer.chip.remote(name, face_id)
        if chip is None:
            raise APIError(404, "no_face_image", f"{name!r} has no face {face_id!r} with a stored image")
        # A face id names one enrolment forever (a new enrolment gets a new id), so its chip never changes.
        return Response(
            chip,
            media_type="image/jpeg",
            headers={"Cache-Control": "public, max-age=31536000, immutable", "ETag": f'"{face_id}"'},
        )

    @app.post(
        "/v1/people/{name}/faces",
        status_code=201,
        response_model=Enrolment,
        operation_id="enrol_faces",
        summary="Enrol one or more photos of one face each",
        responses={
            201: {"description": "the faces enrolled (and any photo refused)", "links": ENROLMENT_LINKS},
            422: {"model": Enrolment | Error, "description": "every photo refused (Enrolment), or a bad name (Error)"},
            400: {"model": Error},
            401: {"model": Error},
            413: {"model": Error},
        },
    )
    async def enrol_photos(
        self,
        name: str,
        images: Annotated[list[UploadFile] | None, File()] = None,
    ) -> JSONResponse:
        name = self._check_name(name)
        if not images:
            raise APIError(400, "missing_part", "the multipart part 'images' is missing (one or more files)")
        if len(images) > self._limits.max_enrol_photos:
            raise APIError(413, "too_many_files", f"at most {self._limits.max_enrol_photos} photos per request")
        photos = tuple([await self._read(upload, "images") for upload in images])
        job = EnrolJob(photos)
        outcomes = await idempotent(lambda: self._recognizer.enrol.remote(job), f"enrolment of {name}")
        self._raise_for(outcomes, name)
        accepted = [o for o in outcomes if o.embedding is not None]
        refused = [{"photo": o.label, "reason": o.refused} for o in outcomes if o.embedding is None]
        if not accepted:
            body = Enrolment.model_validate({"name": name, "enrolled": [], "refused": refused, "revision": None})
            return JSONResponse(body.model_dump(), status_code=422)
        # The model that embedded them: while the model is switched, it may not be this ingress's.
        model_id = accepted[0].model_id or self._model_id
        face_ids, revision = await self._writer.add_faces.remote(
            name, np.stack([o.embedding for o in accepted]), model_id, [o.chip for o in accepted]
        )
        enrolled = [{"photo": o.label, "face_id": f} for o, f in zip(accepted, face_ids, strict=True)]
        body = Enrolment.model_validate({"name": name, "enrolled": enrolled, "refused": refused, "revision": revision})
        return JSONResponse(body.model_dump(), status_code=201)

    @app.delete(
        "/v1/people/{name}",
        operation_id="forget_person",
        summary="Forget a person and all their faces",
        responses=GALLERY_ERRORS,
    )
    async def forget(self, name: str) -> PersonForgotten:
        removed, revision = await self._writer.remove_person.remote(name)
        if not removed:
            raise APIError(404, "unknown_person", f"nobody called {name!r} is enrolled")
        return PersonForgotten(name=name, removed_faces=removed, revision=revision)

    @app.delete(
        "/v1/people/{name}/faces/{face_id}",
        operation_id="forget_face",
        summary="Forget one enrolled face",
        responses=GALLERY_ERRORS,
    )
    async def forget_face(self, name: str, face_id: str) -> FaceForgotten:
        removed, revision = await self._writer.remove_face.remote(name, face_id)
        if not removed:
            raise APIError(404, "unknown_face", f"{name!r} has no face {face_id!r}")
        return FaceForgotten(name=name, removed_face=face_id, revision=revision)

    # --- the console ----------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def root(self, request: Request) -> Response:
        # A browser opening the service's address gets the console; the legacy contract is POST / only.
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/ui/", status_code=307)
        raise APIError(405, "method_not_allowed", "POST a photo to / as multipart `inputFile`; the console is at /ui/")

    @app.get(
        "/v1/status",
        summary="The service at a glance: health, replicas, gallery, whether keys are needed, the caller's key",
    )
    async def status(self, request: Request) -> ServiceStatus:
        health = await self._health()
        replicas = await asyncio.to_thread(_recognizers_running)
        caller = request.scope.get("state", {}).get("principal")
        key = {"name": caller.name, "scopes": sorted(caller.scopes)} if isinstance(caller, Principal) else None
        return ServiceStatus.model_validate(
            {
                **health.model_dump(),
                "key": key,
                "replicas_ready": replicas,
                "api_key_required": self._access.keys_required(),
                "queue": await self._queue_backlog(),
            }
        )

    async def _queue_backlog(self) -> dict[str, int] | None:
        """The SQS bridge's queues, when a bridge application runs beside this one (else ``None``)."""
        if self._bridge_app is None:
            return None
        try:
            bridge = serve.get_app_handle(self._bridge_app)
            return dict(await asyncio.wait_for(bridge.backlog.remote(), timeout=5.0))
        except (RayServeException, RayError, TimeoutError, AttributeError) as exc:
            log.info("no queue backlog from the %r application: %s", self._bridge_app, exc)
            return None

    # --- operations ---------------------------------------------------------------------------------------
    @app.get(
        "/healthz",
        summary="200 once a Recognizer replica has its models loaded",
        response_model=Health,
        responses={503: {"model": Health, "description": "no Recognizer replica answered yet"}},
    )
    async def healthz(self) -> JSONResponse:
        health = await self._health()
        if self._access.needs_store(None):
            await asyncio.to_thread(self._access.refresh, None)
        required = self._access.keys_required()
        body = health.model_dump(exclude_none=True) | {"api_key_required": required}
        if required:  # open to anyone: once the gallery is guarded, its figures are for keys (GET /v1/status)
            body = {k: v for k, v in body.items() if not k.startswith("gallery_")}
        return JSONResponse(body, status_code=200 if health.status == "ok" else 503)

    async def _health(self) -> Health:
        try:
            info = await asyncio.wait_for(self._recognizer.info.remote(), timeout=5.0)
        except TimeoutError:
            return Health(status="starting", detail="no Recognizer replica answered")
        return Health.model_validate({"status": "ok", **info})
