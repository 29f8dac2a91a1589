"""The JSON API's response bodies as pydantic models: what ``/docs`` and ``/openapi.json`` show for every route.

The ingress builds these at the edge from the typed results the Recognizer returns (:mod:`serve_app.results`
turns a result into the same plain JSON the command line prints). Field names and shapes are the API's contract.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Candidate(BaseModel):
    name: str
    similarity: float = Field(description="cosine similarity to the person's closest enrolled face")
    face_id: str = Field(description="that closest face (its chip: GET /v1/people/{name}/faces/{face_id}/image)")


class Face(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in the photo's pixels (EXIF orientation applied)")
    detection_score: float = Field(description="MTCNN's face probability")
    landmarks: list[list[float]] = Field(description="eyes, nose, mouth corners: five [x, y]")


class RecognizedFace(Face):
    name: str | None = Field(description="the enrolled person, or null (Unknown)")
    similarity: float
    margin: float = Field(description="lead of the best person over the second-best (cosine)")
    candidates: list[Candidate]


class Threshold(BaseModel):
    value: float = Field(description="the similarity a face needed to be named")
    source: Literal["fixed", "false_accept_rate", "request"]
    false_accept_rate: float | None = None
    gallery_people: int | None = None
    min_margin: float = 0.0


class Timings(BaseModel):
    decode: float
    detect: float
    embed: float
    match: float
    batch_size: int = Field(description="photos in the Recognizer batch this one ran in")


class Recognition(BaseModel):
    """``POST /v1/recognize``."""

    filename: str
    width: int
    height: int
    model_id: str
    main_face: int | None = Field(description="index in `faces` of the photo's main face (the legacy answer's)")
    name: str | None = Field(description="the main face's name: what the legacy `POST /` answers")
    faces: list[RecognizedFace]
    best_guess: RecognizedFace | None = Field(
        description="where no face reached the detection threshold: the weaker candidate `name` comes from"
    )
    threshold: Threshold | None
    timings_ms: Timings


class Detection(BaseModel):
    """``POST /v1/detect``."""

    filename: str
    width: int
    height: int
    faces: list[Face]


class Verification(BaseModel):
    """``POST /v1/verify``."""

    same_person: bool
    similarity: float
    threshold: float
    model_id: str


class PersonFaces(BaseModel):
    name: str
    faces: int


class Snapshot(BaseModel):
    """One model's gallery snapshot in the store (a store keeps one per embedding model)."""

    model_id: str
    faces: int
    people: int
    revision: int
    active: bool = Field(description="the snapshot enrolments go to (the GalleryWriter's model)")


class People(BaseModel):
    """``GET /v1/people``."""

    people: list[PersonFaces]
    revision: int
    model_id: str = Field(description="the model of the snapshot listed (the one enrolments go to)")
    snapshots: list[Snapshot] = Field(description="every model's snapshot the writer has seen, the active first")


class ReembedRequest(BaseModel):
    """``POST /v1/gallery/reembed``: embed every face again with another checkpoint, beside the current snapshot."""

    checkpoint: str = Field(
        min_length=1,
        max_length=512,
        description="a registry name, e.g. casia-webface-512",
        examples=["casia-webface-512", "vggface2-512"],
    )
    flip: bool = False


class Reembedding(BaseModel):
    """A re-embedding's progress."""

    target_model: str
    total: int = Field(description="faces to embed")
    done: int
    state: Literal["running", "done", "failed"]
    report: dict[str, Any] | None = Field(None, description="what it did, once done (faces without chips listed)")
    error: str | None = None
    started_at: float


class GalleryInfo(BaseModel):
    """``GET /v1/gallery``: the snapshots, and the last re-embedding started."""

    model_id: str
    snapshots: list[Snapshot]
    reembedding: Reembedding | None = None


class EnrolledFace(BaseModel):
    face_id: str
    image: str | None = Field(description="the URL path of the face's chip (null: enrolled without one)")


class Person(BaseModel):
    """``GET /v1/people/{name}``."""

    name: str
    face_ids: list[str]
    faces: int
    face_list: list[EnrolledFace] = Field(description="each face with the path of its chip")
    revision: int


class EnrolledPhoto(BaseModel):
    photo: str
    face_id: str


class RefusedPhoto(BaseModel):
    photo: str
    reason: str


class Enrolment(BaseModel):
    """``POST /v1/people/{name}/faces`` (201; 422 with ``enrolled`` empty when every photo was refused)."""

    name: str
    enrolled: list[EnrolledPhoto]
    refused: list[RefusedPhoto]
    revision: int | None


class PersonForgotten(BaseModel):
    """``DELETE /v1/people/{name}``."""

    name: str
    removed_faces: int
    revision: int


class FaceForgotten(BaseModel):
    """``DELETE /v1/people/{name}/faces/{face_id}``."""

    name: str
    removed_face: str
    revision: int


class Health(BaseModel):
    """``GET /healthz``: 200 with the model and gallery once a Recognizer replica answers, else 503."""

    status: Literal["ok", "starting"]
    detail: str | None = None
    replica: str | None = None
    model_id: str | None = None
    threshold: Threshold | None = None
    gallery_revision: int | None = None
    gallery_faces: int | None = None
    gallery_people: int | None = None
    api_key_required: bool | None = Field(
        None, description="whether the API needs X-API-Key (once keys exist; the gallery's figures are then omitted)"
    )


class QueueBacklog(BaseModel):
    waiting: int = Field(description="requests on the request queue, not yet received")
    in_flight: int = Field(description="requests received by the bridge and not yet answered")
    dead_letters: int = Field(description="requests on the dead-letter queue")


class CallerKey(BaseModel):
    name: str = Field(description="the key's name (never the key)")
    scopes: list[str] = Field(description="recognize, manage")


class ServiceStatus(Health):
    """``GET /v1/status``: what the console's Status screen shows."""

    key: CallerKey | None = Field(None, description="the key this request came with (null: no key needed)")

    replicas_ready: int | None = Field(None, description="Recognizer replicas running (null: Serve did not say)")
    api_key_required: bool = Field(description="whether the API needs X-API-Key (every route but /healthz)")
    queue: QueueBacklog | None = Field(None, description="the SQS bridge's queues (null: no bridge runs here)")


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable: missing_part, body_too_large, not_an_image, ...")
    message: str


class Error(BaseModel):
    """Every 4xx/5xx answer of the JSON API."""

    error: ErrorDetail
