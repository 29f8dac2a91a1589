"""``ingress: in_recognizer``: the HTTP routes served by the Recognizer replicas themselves (no separate ingress)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serve_app.access.keys import KeyRing
from serve_app.gallery_store import open_gallery_store
from tests.serve_fixtures import ServeCluster
from tests.waiting import wait_until

from .conftest import SCENES

pytestmark = [pytest.mark.serve]

KNN = SCENES / "knn"
APP = "serving"
#: A key of both scopes, made in the gallery store before the application starts (so every route but the
#: legacy one, open by default, needs it here too).
KEY: dict[str, str] = {}


@pytest.fixture(scope="module")
def serving(serve_cluster: ServeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.app import AppArgs, build_app

    gallery = tmp_path_factory.mktemp("gallery")
    KEY["X-API-Key"] = KeyRing(open_gallery_store(str(gallery))).create("tests", ["manage", "recognize"])[0]
    args = {
        "gallery_uri": str(gallery),
        # Long enough that only the per-batch question to the gallery writer can bring an enrolment to the
        # replica that did not make it, within this test.
        "gallery_refresh_s": 600.0,
        "ingress": "in_recognizer",
        "recognizer": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 1.0},
    }
    serve.run(build_app(AppArgs.model_validate(args)), name=APP, route_prefix="/", blocking=False)
    url = serve_cluster.url
    wait_until(lambda: len(_replicas(url, calls=10)) == 2, 240, "the two serving replicas did not both answer")
    yield url
    serve.delete(APP)


def _replicas(url: str, calls: int = 40) -> dict[str, dict[str, object]]:
    """What each replica reports on /v1/status, keyed by replica id (the proxy spreads the calls over them)."""
    seen: dict[str, dict[str, object]] = {}
    for _ in range(calls):
        try:
            response = requests.get(f"{url}/v1/status", headers=KEY, timeout=10)
        except requests.ConnectionError:
            continue
        if response.status_code == 200:
            seen[str(response.json()["replica"])] = response.json()
    return seen


def test_a_face_enrolled_through_one_replica_is_named_by_both_at_once(serving: str) -> None:
    from ray import serve

    photos = [("images", (p.name, p.read_bytes())) for p in sorted((KNN / "train" / "obama").iterdir())]
    enrolled = requests.post(f"{serving}/v1/people/obama/faces", files=photos, headers=KEY, timeout=120)
    assert enrolled.status_code == 201, enrolled.text
    revision = enrolled.json()["revision"]
    data = (KNN / "test" / "obama1.jpg").read_bytes()

    def post(number: int) -> str:
        return requests.post(f"{serving}/", files={"inputFile": (f"q{number}.jpg", data)}, timeout=120).text

    # Sent at once, so that both replicas get some: every answer names the face enrolled a moment ago, although
    # neither replica's periodic refresh has run.
    with ThreadPoolExecutor(max_workers=40) as clients:
        answers = list(clients.map(post, range(80)))
    assert answers == [f"q{number}:obama" for number in range(80)]
    states = _replicas(serving)
    assert len(states) == 2
    assert all(int(str(state["gallery_revision"])) >= revision for state in states.values()), states

    # The JSON API runs in the same replicas.
    recognized = requests.post(
        f"{serving}/v1/recognize", files={"image": ("q.jpg", data)}, headers=KEY, timeout=120
    ).json()
    assert [face["name"] for face in recognized["faces"]] == ["obama"]

    # The Recognizer's handle API (what the SQS bridge calls) still answers, and both halves' loops are watched.
    from serve_app.jobs import RecognizeJob

    handle = serve.get_deployment_handle("Recognizer", app_name=APP)
    result = handle.recognize.remote(RecognizeJob(data)).result(timeout_s=120)
    assert result.main_name == "obama"
    assert {"batching", "gallery refresh"} <= set(handle.background_tasks.remote().result(timeout_s=30))


def test_bad_input_gets_the_same_answers_as_through_a_separate_ingress(serving: str) -> None:
    missing = requests.post(f"{serving}/", files={"other": ("q.jpg", b"x")}, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_part"
    not_image = requests.post(f"{serving}/", files={"inputFile": ("q.jpg", b"not a photo")}, timeout=60)
    assert not_image.status_code == 415 and not_image.json()["error"]["code"] == "not_an_image"
    unauthorized = requests.delete(f"{serving}/v1/people/obama", timeout=60)
    assert unauthorized.status_code == 401
