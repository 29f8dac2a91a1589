"""Background loops are supervised: a replica whose loop has died reports unhealthy, and Serve replaces it.

The unit tests check :class:`BackgroundTasks` itself; the Serve test kills each loop of a running queue-mode
application (gallery refresh, in-flight reporter, bridge consumer, scaling controller) and waits
for Serve to put a new replica, with the loop running again, in place of the old one; the service answers through
the queue after.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from aws_stack.clients import AwsClients
from aws_stack.stack import StackConfig, provision
from serve_app.deployments.supervision import BackgroundTaskError, BackgroundTasks
from tests.queue_helpers import enrol, pool
from tests.serve_fixtures import ServeCluster, free_port, healthy
from tests.waiting import wait_until, wait_until_async


# --- the supervisor ------------------------------------------------------------------------------------------
def _fails(tasks: BackgroundTasks) -> bool:
    try:
        tasks.check()
    except BackgroundTaskError:
        return True
    return False


def test_running_tasks_are_healthy_and_an_ended_one_is_not() -> None:
    async def scenario() -> None:
        tasks = BackgroundTasks()
        forever = asyncio.Event()
        tasks.start("waits", forever.wait())

        async def crashes() -> None:
            await asyncio.sleep(0)
            raise ConnectionError("the queue went away")

        tasks.start("crashes", crashes())
        await wait_until_async(lambda: _fails(tasks), 5, "the crash was not noticed")
        with pytest.raises(BackgroundTaskError, match=r"'crashes' has ended \(ConnectionError"):
            tasks.check()
        assert tasks.names == ["waits", "crashes"]
        tasks.stop_all()  # a replica that is shutting down is not unhealthy
        await asyncio.sleep(0)
        tasks.check()

    asyncio.run(scenario())


def test_a_killed_or_finished_task_fails_the_check() -> None:
    async def scenario() -> None:
        tasks = BackgroundTasks()
        tasks.start("loop", asyncio.Event().wait())
        tasks.check()
        tasks.kill("loop")
        await asyncio.sleep(0)
        with pytest.raises(BackgroundTaskError, match="cancelled"):
            tasks.check()
        with pytest.raises(KeyError, match="no background task 'other'"):
            tasks.kill("other")

        finished = BackgroundTasks()
        finished.start("returns", asyncio.sleep(0))
        await wait_until_async(lambda: _fails(finished), 5, "the return was not noticed")
        with pytest.raises(BackgroundTaskError, match="returned"):
            finished.check()
        with pytest.raises(ValueError, match="already running"):
            finished.start("returns", asyncio.sleep(0))

    asyncio.run(scenario())


# --- Serve replaces the replica ------------------------------------------------------------------------------
APP, BRIDGE, CONTROLLER = "supervised", "supervised-bridge", "supervised-controller"


@pytest.fixture(scope="module")
def queue_app(serve_cluster: ServeCluster, moto_endpoint: str) -> Iterator[str]:
    from ray import serve

    from cluster.controller import build_controller
    from serve_app.app import AppArgs, build_app
    from serve_app.settings import RecognitionSettings
    from sqs_bridge.deployment import build_bridge

    stack = StackConfig(prefix=f"s{uuid.uuid4().hex[:8]}", endpoint=moto_endpoint, visibility_timeout_s=20)
    provision(stack, AwsClients.for_stack(stack))
    args = AppArgs.model_validate(
        {
            "gallery_uri": stack.gallery_uri,
            "recognition": RecognitionSettings().model_dump(),
            "recognizer": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1.0},
            "queue_mode": True,
            "stack": stack.model_dump(),
            "controller_app": CONTROLLER,
        }
    )
    # The queue-depth controller, with nothing to act on: no worker nodes allowed, and Serve's scaling API
    # (the dashboard) at a port nothing listens on, so each step's attempt fails, is logged, and the loop goes on.
    controller = {
        "stack": stack.model_dump(),
        "recognition_app": APP,
        "policy": {"max_nodes": 0, "max_replicas": 1, "min_replicas": 1},
        "period_s": 1.0,
        "dashboard_url": f"http://127.0.0.1:{free_port()}",
    }
    serve.run(build_controller(controller), name=CONTROLLER, route_prefix=None)
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    wait_until(lambda: healthy(serve_cluster.url), 240, "the queue-mode app did not start")
    serve.run(
        build_bridge({"stack": stack.model_dump(), "wait_time_s": 1, "recognition_app": APP}),
        name=BRIDGE,
        route_prefix=None,
    )
    enrol(serve_cluster.url)
    yield serve_cluster.url
    serve.delete(BRIDGE)
    serve.delete(CONTROLLER)
    serve.delete(APP)


def _replica(handle: Any) -> str | None:
    try:
        return str(handle.replica.remote().result(timeout_s=10))
    except Exception:  # the replica is being replaced: any failure to answer means "not yet"
        return None


@pytest.mark.serve
@pytest.mark.parametrize(
    ("app", "deployment", "task"),
    [
        (APP, "Recognizer", "gallery refresh"),
        (APP, "Recognizer", "batching"),
        (APP, "Ingress", "in-flight reporter"),
        (BRIDGE, "SqsBridge", "consumer"),
        (CONTROLLER, "QueueController", "controller loop"),
    ],
)
def test_a_replica_whose_loop_died_is_replaced(queue_app: str, app: str, deployment: str, task: str) -> None:
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    before = _replica(handle)
    assert before is not None
    assert task in handle.background_tasks.remote().result(timeout_s=30)
    handle.kill_background_task.remote(task).result(timeout_s=30)

    def replaced() -> bool:
        now = _replica(handle)
        return now is not None and now != before

    # Serve checks health every 10 s and replaces a failing replica; the Recognizer then reloads its models.
    wait_until(replaced, 180, f"{deployment} still runs without its {task!r}", interval=2.0)
    assert task in handle.background_tasks.remote().result(timeout_s=30)

    # The whole path works again: HTTP -> S3 + SQS -> bridge -> Recognizer -> response queue -> HTTP.
    data, expected = pool()[0]
    wait_until(lambda: healthy(queue_app), 240, "the application did not become healthy again")
    answer = requests.post(f"{queue_app}/", files={"inputFile": ("check_000.jpg", data)}, timeout=240)
    assert answer.status_code == 200, answer.text
    assert answer.text == f"check_000:{expected}"
