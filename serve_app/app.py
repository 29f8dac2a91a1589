"""The Serve application: ``Ingress.bind(Recognizer.bind(...), GalleryWriter.bind(...))``, or with
``ingress: in_recognizer`` ``Recognizer.bind(GalleryWriter.bind(...))`` serving HTTP itself.

``serve run serve_app.app:build_app`` or ``serve deploy serve_app/config.yaml``; every setting is an
application argument (see :class:`AppArgs`), validated before anything starts.
"""

# No postponed annotations here: Serve reads build_app's annotation at run time to validate the config's `args`
# into AppArgs, and a string annotation would hand build_app an unvalidated dict.

import math
import os
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from aws_stack.stack import StackConfig
from serve_app.access.settings import AccessConfig
from serve_app.deployments.gallery_writer import GalleryWriterDeployment
from serve_app.deployments.ingress import AccessWiring, IngressDeployment, IngressLimits, QueueSettings
from serve_app.deployments.recognizer import RecognizerDeployment, RecognizerOptions
from serve_app.deployments.serving_recognizer import ServingRecognizer
from serve_app.model.images import DEFAULT_MAX_PIXELS
from serve_app.settings import RecognitionConfig

#: A setting sized from the machine that builds the application (see :func:`size_recognizer`).
Auto = Literal["auto"]


class RecognizerScaling(BaseModel):
    """Recognizer replicas: Serve adds one per ``target_ongoing_requests`` in flight, up to ``max_replicas``.

    ``auto`` (the shipped default) sizes the replicas for the machine that builds the application, which for
    ``make run`` is the machine that runs it: one single-threaded replica per core. On 2 cores that measured
    0.64-0.70 of the in-process floor at 100 concurrent clients, against 0.49 for one 2-thread replica (a torch
    thread per replica never waits for its sibling, and two batches overlap their Python work). A cluster's
    config names its numbers, since there the replicas run on other machines.
    """

    min_replicas: Annotated[int, Field(ge=0)] | Auto = Field("auto", description="auto: one replica per core")
    max_replicas: Annotated[int, Field(ge=1)] | Auto = Field(
        "auto", description="auto: as many as min_replicas (no more cores)"
    )
    initial_replicas: int | None = Field(None, ge=0)
    #: A batch of 16 keeps a replica busy; twice that in flight keeps the next batch queued and ready.
    target_ongoing_requests: float = Field(32, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    num_cpus: Annotated[float, Field(gt=0)] | Auto = Field(
        "auto", description="CPU reserved per replica; auto: the cores left after the other deployments"
    )
    num_gpus: float = Field(0.0, ge=0)
    #: Custom resources each replica needs, e.g. ``{"recognizer": 1}`` to keep replicas on worker nodes.
    resources: dict[str, float] = Field(default_factory=dict)
    #: Replicas are set from outside (the queue-depth controller, through Serve's external scaling API):
    #: Serve's own autoscaling is off and the count starts at ``initial_replicas`` (or ``min_replicas``). The
    #: application must then be deployed with ``external_scaler_enabled: true``.
    external_scaler: bool = False


@dataclass(frozen=True)
class RecognizerSize:
    """Concrete replica counts, CPU reservation and torch threads, ``auto`` resolved."""

    min_replicas: int
    max_replicas: int
    num_cpus: float
    torch_threads: int


#: Logical CPUs left to the deployments beside the Recognizer when sizing ``auto``: the ingress (0.1), the
#: gallery writer (0.05) and the SQS bridge (0.1) reserve 0.25; the other 0.05 is left for the ingress's answer
#: inbox in queue mode (a Ray actor that reserves no CPU).
OTHER_DEPLOYMENTS_CPUS = 0.3


def machine_cores() -> int:
    """Cores this process may run on (the cgroup/affinity view, not the host's count)."""
    return len(os.sched_getaffinity(0))


def size_recognizer(scaling: RecognizerScaling, torch_threads: int | None, cores: int) -> RecognizerSize:
    """Resolve ``auto``: ``cores // threads`` single-model replicas, each reserving an equal share of the cores
    that the other deployments leave (a GPU replica: one, with every core's worth of threads)."""
    numeric_cpus = None if scaling.num_cpus == "auto" else float(scaling.num_cpus)
    if torch_threads is None:
        torch_threads = max(1, math.floor(numeric_cpus)) if numeric_cpus is not None else 1
    per_machine = 1 if scaling.num_gpus > 0 and scaling.min_replicas == "auto" else max(1, cores // torch_threads)
    min_replicas = per_machine if scaling.min_replicas == "auto" else scaling.min_replicas
    max_replicas = max(min_replicas, per_machine) if scaling.max_replicas == "auto" else scaling.max_replicas
    if numeric_cpus is None:
        numeric_cpus = round(max(0.1, (cores - OTHER_DEPLOYMENTS_CPUS) / max(1, min_replicas)), 3)
    return RecognizerSize(min_replicas, max(1, max_replicas), numeric_cpus, torch_threads)


class AppArgs(BaseModel):
    """Application arguments (the ``args:`` of an application in ``serve_app/config.yaml``)."""

    gallery_uri: str = Field("run/gallery", description="s3://bucket/prefix, or a local directory")
    gallery_endpoint: str | None = Field(
        None, description="an S3-compatible endpoint for the gallery bucket (default: boto3's own resolution)"
    )
    gallery_refresh_s: float = Field(1.0, gt=0, description="how often replicas look for gallery changes")
    recognition: RecognitionConfig = Field(default_factory=RecognitionConfig)
    recognizer: RecognizerScaling = Field(default_factory=RecognizerScaling)
    max_batch_size: int = Field(16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    #: Where the HTTP routes run. ``separate`` (the default): an Ingress deployment of its own, which calls the
    #: Recognizer through a handle and sends a request again when the replica holding it dies, so no request is
    #: lost. ``in_recognizer``: in every Recognizer replica, one actor call fewer per request (at 100 concurrent
    #: clients on 2 cores, 46.8 against 33.4 photos/s at 64x64, 30.2 against 26.8 on LFW), but a replica that
    #: dies takes the HTTP requests it holds with it (the clients get a 500). Not in queue mode or under the
    #: queue-depth controller.
    ingress: Literal["separate", "in_recognizer"] = "separate"
    ingress_replicas: int = Field(1, ge=1, description="separate ingress only")
    ingress_num_cpus: float = Field(0.1, gt=0, description="separate ingress only")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_enrol_photos: int = Field(20, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    #: Legacy web-tier mode: POST / uploads to the input bucket, enqueues, and awaits the bridge's answer.
    queue_mode: bool = False
    queue_timeout_s: float = Field(120.0, gt=0, description="POST / answers 504 after this long in queue mode")
    stack: StackConfig | None = Field(None, description="the buckets and queues (required in queue mode)")
    #: The Serve application of the queue-depth controller, told the ingress's in-flight requests (cluster).
    controller_app: str | None = None
    #: The SQS bridge's Serve application, asked for the queues' backlog by ``GET /v1/status`` (if it runs).
    bridge_app: str | None = "bridge"
    #: API keys: how the service applies them (the keys themselves: ``facerec keys create``).
    access: AccessConfig = Field(default_factory=AccessConfig)


def ingress_in_recognizer(config: AppArgs) -> bool:
    """Whether the HTTP routes run inside the Recognizer replicas (see :mod:`serve_app.deployments.serving_recognizer`).

    Only where asked for, and never where something needs the ingress apart: queue mode (it talks to the queues)
    or the queue-depth controller (it may scale the Recognizer to zero, and it reads the ingress's in-flight count).
    """
    if config.ingress == "separate":
        return False
    if config.queue_mode or config.recognizer.external_scaler or config.controller_app:
        raise ValueError("ingress: in_recognizer cannot be used in queue mode or under the queue-depth controller")
    return True


def build_app(args: AppArgs) -> Application:
    """Wire the deployments together (Serve has validated the config's ``args`` into :class:`AppArgs`)."""
    config = args
    config.recognition.resolved_checkpoint()  # an unknown checkpoint fails here, before deploying
    model_id, threshold = config.recognition.model_id, config.recognition.verification_threshold
    scaling = config.recognizer
    size = size_recognizer(scaling, config.recognition.torch_threads, machine_cores())
    torch_threads = size.torch_threads

    actor_options: dict[str, object] = {"num_cpus": size.num_cpus, "num_gpus": scaling.num_gpus}
    if scaling.resources:
        actor_options["resources"] = dict(scaling.resources)
    replica_options: dict[str, object]
    if scaling.external_scaler:
        start = scaling.initial_replicas if scaling.initial_replicas is not None else size.min_replicas
        # Serve refuses to deploy 0 replicas (the decorator and the config schema both); only its scaling API
        # may set 0. So a deployment starts with one, and the controller's first decision takes it to zero.
        replica_options = {"num_replicas": max(1, start)}
    elif size.min_replicas == size.max_replicas and scaling.initial_replicas is None:
        # Nothing to scale (what `auto` gives on one machine): a fixed count spares Serve's controller from
        # collecting autoscaling metrics (up to 0.3 of 2 cores at 100 concurrent clients with min = max = 2).
        replica_options = {"num_replicas": size.min_replicas}
    else:
        replica_options = {
            "autoscaling_config": {
                "min_replicas": size.min_replicas,
                "initial_replicas": scaling.initial_replicas,
                "max_replicas": size.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
                "upscale_delay_s": scaling.upscale_delay_s,
                "downscale_delay_s": scaling.downscale_delay_s,
            }
        }
    options = RecognizerOptions(
        recognition=config.recognition,
        gallery_uri=config.gallery_uri,
        gallery_endpoint=config.gallery_endpoint,
        gallery_refresh_s=config.gallery_refresh_s,
        max_batch_size=config.max_batch_size,
        batch_wait_timeout_s=config.batch_wait_timeout_s,
        max_pixels=config.max_pixels,
        torch_threads=torch_threads,
    )
    # Every Recognizer replica holds one long poll of its revision open here, beside the gallery changes.
    writer = serve.deployment(
        name="GalleryWriter", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.05}
    )(GalleryWriterDeployment).bind(config.gallery_uri, config.recognition, config.gallery_endpoint)
    limits = IngressLimits(
        max_upload_bytes=config.max_upload_bytes,
        # multipart framing on top of the largest allowed set of files
        max_body_bytes=config.max_upload_bytes * config.max_enrol_photos + 64 * 1024,
        max_enrol_photos=config.max_enrol_photos,
    )
    access = AccessWiring(config.access, config.gallery_uri, config.gallery_endpoint)
    recognizer_deployment = serve.deployment(
        name="Recognizer",
        ray_actor_options=actor_options,
        max_ongoing_requests=scaling.max_ongoing_requests,
        **replica_options,  # type: ignore[arg-type]
    )
    if ingress_in_recognizer(config):
        return recognizer_deployment(ServingRecognizer).bind(
            options, writer, limits, model_id, threshold, config.bridge_app, access
        )
    recognizer = recognizer_deployment(RecognizerDeployment).bind(options, writer)
    queue = None
    if config.queue_mode:
        if config.stack is None:
            raise ValueError("queue_mode needs `stack` (the buckets and queues)")
        queue = QueueSettings(config.stack, config.queue_timeout_s)
    ingress = serve.deployment(
        name="Ingress",
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        max_ongoing_requests=1000,
    )(IngressDeployment)
    return ingress.bind(
        recognizer, writer, limits, model_id, threshold, queue, config.controller_app, config.bridge_app, access
    )
