"""The bridge as a Serve application: consumers that live in the cluster, supervised (restarted) by Serve.

Each replica runs one :class:`RequestConsumer` loop in the background and sends photos to the ``Recognizer``
deployment of the recognition application through a handle, so queue traffic is batched together with HTTP
traffic. On shutdown Serve calls ``__del__``: the loop stops receiving and finishes the messages it holds.
"""

from __future__ import annotations

import asyncio
import logging

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, queue_counts, queue_urls
from serve_app.deployments.supervision import BackgroundTasks, Supervised
from serve_app.jobs import JobError, RecognizeJob
from serve_app.metrics import bridge_metrics
from sqs_bridge.consumer import ConsumerConfig, RequestConsumer
from sqs_bridge.processor import UNKNOWN_NAME, Answer, RequestProcessor, UnusableInputError

log = logging.getLogger(f"ray.serve.{__name__}")


class BridgeArgs(BaseModel):
    """Application arguments of the bridge."""

    stack: StackConfig = Field(default_factory=StackConfig)
    consumers: int = Field(1, ge=1, le=64, description="bridge replicas, each one consumer loop")
    max_in_flight: int = Field(32, ge=1, le=1000, description="messages one consumer holds at once")
    wait_time_s: int = Field(5, ge=0, le=20, description="long-poll wait")
    recognition_app: str = Field("facerec", description="the Serve application that has the Recognizer")
    max_input_bytes: int = Field(10 * 1024 * 1024, ge=1, description="larger input objects get an Error answer")


class SqsBridgeDeployment(Supervised):
    def __init__(self, args: BridgeArgs) -> None:
        clients = AwsClients.for_stack(args.stack)
        urls = queue_urls(args.stack, clients)
        # A Recognizer on this consumer's own node when there is one: on the cluster every worker node runs one
        # consumer beside its Recognizer, so a photo crosses no network between them (Serve falls back to any).
        self._recognizer = serve.get_deployment_handle("Recognizer", app_name=args.recognition_app)
        self._recognizer._init(_prefer_local_routing=True)  # type: ignore[no-untyped-call]
        self._processor = processor = RequestProcessor(
            s3=clients.s3,
            sqs=clients.sqs,
            in_bucket=args.stack.in_bucket,
            out_bucket=args.stack.out_bucket,
            response_queue_url=urls.responses,
            recognize=self._recognize,
            max_input_bytes=args.max_input_bytes,
            io_threads=args.max_in_flight,
        )
        self._consumer = RequestConsumer(
            clients.sqs,
            urls.requests,
            processor,
            ConsumerConfig(
                max_in_flight=args.max_in_flight,
                wait_time_s=args.wait_time_s,
                visibility_timeout_s=args.stack.visibility_timeout_s,
            ),
        )
        self._sqs, self._urls = clients.sqs, urls
        self._metrics = bridge_metrics()
        self._stop = asyncio.Event()
        self._background = BackgroundTasks()
        self._loop = self._background.start("consumer", self._consumer.run(self._stop))
        self._background.start("metrics reporter", self._report())
        log.info("SQS bridge consuming %s", urls.requests)

    async def _recognize(self, data: bytes) -> Answer:
        result = await self._recognizer.recognize.remote(RecognizeJob(data))
        if isinstance(result, JobError):
            raise UnusableInputError(result.reason, result.message)
        return Answer(result.main_name or UNKNOWN_NAME)

    async def backlog(self) -> dict[str, int]:
        """The request queue's messages waiting and being worked on, and the dead-letter queue's (the console's
        Status screen shows them)."""
        requests = await asyncio.to_thread(queue_counts, self._sqs, self._urls.requests)
        dead = await asyncio.to_thread(queue_counts, self._sqs, self._urls.dead_letter)
        return {"waiting": requests["visible"], "in_flight": requests["in_flight"], "dead_letters": dead["visible"]}

    async def stats(self) -> dict[str, int]:
        """This replica's message outcomes, messages held, and uncertain response sends (a duplicate's only cause)."""
        return {
            **self._consumer.counts,
            "in_flight": self._consumer.in_flight,
            "uncertain_sends": self._processor.uncertain_sends,
        }

    async def _report(self) -> None:
        reported: dict[str, int] = {}
        rounds = 0
        while True:
            await asyncio.sleep(2.0)
            rounds += 1
            if rounds % 15 == 1:  # every 30 s: what an operator must hear about (an alert rule watches it)
                await self._report_dead_letters()
            self._metrics.in_flight.set(self._consumer.in_flight)
            self._metrics.uncertain_sends.set(self._processor.uncertain_sends)
            for outcome, count in self._consumer.counts.items():
                if count > reported.get(outcome, 0):
                    self._metrics.messages.inc(count - reported.get(outcome, 0), tags={"outcome": outcome})
                    reported[outcome] = count

    async def _report_dead_letters(self) -> None:
        try:
            dead = await asyncio.to_thread(queue_counts, self._sqs, self._urls.dead_letter)
        except (BotoCoreError, ClientError) as exc:
            log.warning("could not count the dead-letter queue: %s", exc)
            return
        self._metrics.dead_letters.set(dead["visible"] + dead["in_flight"])

    async def __del__(self) -> None:
        if not hasattr(self, "_background"):  # __init__ failed before the loops started
            return
        self._background.shutting_down()
        self._stop.set()
        await asyncio.wait([self._loop], timeout=60)
        self._background.stop_all()


def build_bridge(args: dict[str, object] | BridgeArgs) -> Application:
    config = args if isinstance(args, BridgeArgs) else BridgeArgs.model_validate(args)
    deployment = serve.deployment(
        name="SqsBridge",
        num_replicas=config.consumers,
        ray_actor_options={"num_cpus": 0.1},
        graceful_shutdown_timeout_s=90,
    )(SqsBridgeDeployment)
    return deployment.bind(config)
