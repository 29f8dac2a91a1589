"""Two Recognizer replicas share one gallery in S3 (the moto server): changes reach both, and survive restarts."""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
import requests
from PIL import Image

from tests.serve_fixtures import API_KEY, ServeCluster
from tests.tcp_proxy import cuttable_proxy
from tests.waiting import wait_until

from .conftest import LFW, SCENES

pytestmark = [pytest.mark.serve, pytest.mark.aws]

KNN = SCENES / "knn"
APP = "shared"
BUCKET = "facerec-test-gallery"
#: gallery_refresh_s in this app; the README promises "within gallery_refresh_s plus one snapshot read".
REFRESH_S = 0.5


def _build(recognition: dict[str, object]):  # type: ignore[no-untyped-def]
    from serve_app.app import AppArgs, build_app

    return build_app(
        AppArgs.model_validate(
            {
                "gallery_uri": f"s3://{BUCKET}/gallery",
                "gallery_refresh_s": REFRESH_S,
                "recognition": recognition,
                "recognizer": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 1.0},
            }
        )
    )


@pytest.fixture(scope="module")
def shared(serve_cluster: ServeCluster, moto_endpoint: str) -> Iterator[str]:
    from ray import serve

    from serve_app.settings import RecognitionSettings

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    recognition = RecognitionSettings().model_dump()
    serve.run(_build(recognition), name=APP, route_prefix="/", blocking=False)
    url = serve_cluster.url
    wait_until(lambda: _health(url) is not None, 240, "the two-replica application did not become healthy")
    yield url
    serve.delete(APP)


def _health(url: str) -> dict[str, object] | None:
    try:
        response = requests.get(f"{url}/healthz", timeout=10)
    except requests.ConnectionError:
        return None
    return dict(response.json()) if response.status_code == 200 else None


def replica_states(url: str, calls: int = 40) -> dict[str, dict[str, object]]:
    """What each Recognizer replica reports, keyed by replica id (health checks spread over the replicas)."""
    seen: dict[str, dict[str, object]] = {}
    for _ in range(calls):
        info = _health(url)
        if info is not None:
            seen[str(info["replica"])] = info
    return seen


def recognize_name(url: str) -> str:
    data = (KNN / "test" / "obama1.jpg").read_bytes()
    return requests.post(f"{url}/", files={"inputFile": ("q.jpg", data)}, timeout=120).text


def test_both_replicas_follow_an_enrolment(shared: str) -> None:
    wait_until(lambda: len(replica_states(shared)) == 2, 120, "two replicas never answered")
    photos = [("images", (p.name, p.read_bytes())) for p in sorted((KNN / "train" / "obama").iterdir())]
    response = requests.post(
        f"{shared}/v1/people/obama/faces", files=photos, headers={"X-API-Key": API_KEY}, timeout=120
    )
    assert response.status_code == 201, response.text
    revision = int(response.json()["revision"])

    def both_current() -> bool:
        states = replica_states(shared)
        return len(states) == 2 and all(int(s["gallery_revision"]) >= revision for s in states.values())  # type: ignore[call-overload]

    wait_until(both_current, 10 * REFRESH_S + 10, "a replica did not pick up the enrolment")
    assert all(recognize_name(shared) == "q:obama" for _ in range(6))
    # In S3, where any later replica will find it: the model's base snapshot and the one change that enrolled the
    # two faces (README, The shared gallery), beside the chips of its two faces.
    listed = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]]
    keys = [key for key in listed if not key.startswith("gallery/access/")]  # the audit trail, beside the gallery
    chips = sorted(f"gallery/chips/{face['face_id']}.jpg" for face in response.json()["enrolled"])
    from serve_app.settings import RecognitionSettings

    model_id = RecognitionSettings().model_id
    change = f"gallery/models/{model_id}.changes/{revision:012d}.npz"
    assert keys == [*chips, change, f"gallery/models/{model_id}.npz"]


def test_a_replica_killed_under_load_costs_no_request_and_its_successor_loads_the_gallery(shared: str) -> None:
    """50 clients post POST / while one of the two Recognizer replicas is killed: the ingress retries elsewhere."""
    import ray

    before = replica_states(shared)
    assert len(before) == 2
    victims = [n for n in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#Recognizer#" in n["name"]]
    assert len(victims) == 2
    data = (KNN / "test" / "obama1.jpg").read_bytes()

    def post(number: int) -> tuple[int, str, str]:
        response = requests.post(f"{shared}/", files={"inputFile": (f"q{number}.jpg", data)}, timeout=300)
        return response.status_code, response.text, f"q{number}:obama"

    with ThreadPoolExecutor(max_workers=50) as clients:
        futures = [clients.submit(post, number) for number in range(300)]
        wait_until(lambda: sum(f.done() for f in futures) >= 30, 600, "no answers before the kill")
        ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
        results = [future.result() for future in futures]
    failed = [(code, body) for code, body, _ in results if code != 200]
    wrong = [(body, expected) for code, body, expected in results if code == 200 and body != expected]
    print(f"\nRecognizer replica killed under load: 300 sent, {300 - len(failed)} answered, {len(failed)} failed")
    assert failed == [] and wrong == []

    def replaced() -> bool:
        states = replica_states(shared)
        fresh = set(states) - set(before)
        return len(states) == 2 and bool(fresh) and all(states[r]["gallery_faces"] == 2 for r in fresh)

    wait_until(replaced, 240, "the killed replica was not replaced by one that loaded the gallery")
    assert recognize_name(shared) == "q:obama"


def test_the_gallery_writer_killed_during_enrolments_loses_no_acknowledged_face(shared: str) -> None:
    """50 concurrent enrolments, the GalleryWriter killed among them: every 201 is in the gallery, the rest
    got a 503 and succeed when sent again, and the snapshot in the store is whole."""
    import ray

    people = sorted(p for p in (LFW / "images").iterdir() if p.is_dir())[:50]

    def enrol(person: Path) -> tuple[str, int, str]:
        photo = sorted(person.glob("*.jpg"))[0]
        response = requests.post(
            f"{shared}/v1/people/{person.name}/faces",
            files={"images": (photo.name, photo.read_bytes())},
            headers={"X-API-Key": API_KEY},
            timeout=300,
        )
        return person.name, response.status_code, response.text

    writers = [n for n in ray.util.list_named_actors(all_namespaces=True) if f"{APP}#GalleryWriter#" in n["name"]]
    assert len(writers) == 1
    with ThreadPoolExecutor(max_workers=50) as clients:
        futures = [clients.submit(enrol, person) for person in people]
        wait_until(lambda: sum(f.done() for f in futures) >= 5, 600, "no enrolment finished before the kill")
        ray.kill(ray.get_actor(writers[0]["name"], namespace=writers[0]["namespace"]), no_restart=True)
        results = [future.result() for future in futures]
    codes = Counter(code for _, code, _ in results)
    print(f"\nGalleryWriter killed during 50 enrolments: {dict(codes)}")
    assert set(codes) <= {201, 422, 503}, results  # 422: a photo the service refuses (no face, several faces)
    unavailable = [name for name, code, _ in results if code == 503]
    assert all("try again" in body for _, code, body in results if code == 503)
    retried = [enrol(LFW / "images" / name) for name in unavailable]
    assert [code for _, code, _ in retried] == [201] * len(unavailable)
    enrolled = {name for name, code, _ in [*results, *retried] if code == 201}
    listed = {p["name"] for p in requests.get(f"{shared}/v1/people", timeout=30).json()["people"]}
    assert enrolled <= listed
    for name in enrolled:  # leave the gallery as the other tests expect it
        assert requests.delete(f"{shared}/v1/people/{name}", headers={"X-API-Key": API_KEY}, timeout=60).ok


def test_gallery_survives_an_application_restart(serve_cluster: ServeCluster, shared: str) -> None:
    from ray import serve

    from serve_app.settings import RecognitionSettings

    serve.delete(APP)
    serve.run(_build(RecognitionSettings().model_dump()), name=APP, route_prefix="/", blocking=False)
    wait_until(lambda: _health(shared) is not None, 240, "the application did not come back")
    people = requests.get(f"{shared}/v1/people", timeout=30).json()["people"]
    assert people == [{"name": "obama", "faces": 2}]
    assert recognize_name(shared) == "q:obama"


def test_metrics_reach_the_metrics_endpoint(serve_cluster: ServeCluster, shared: str) -> None:
    recognize_name(shared)

    def exported() -> bool:
        text = requests.get(f"http://127.0.0.1:{serve_cluster.metrics_port}/metrics", timeout=10).text
        names = ("facerec_requests", "facerec_stage_latency_ms", "facerec_batch_size", "facerec_gallery_faces")
        # Decoding is timed like every other stage: its latency histogram has a positive sum.
        decode = re.findall(r'facerec_stage_latency_ms_sum\{[^}]*stage="decode"[^}]*\} ([0-9.eE+-]+)', text)
        return all(name in text for name in names) and any(float(value) > 0 for value in decode)

    wait_until(exported, 90, "facerec metrics (decode time included) never reached the endpoint", interval=2.0)


def test_the_gallery_store_unreachable_recognition_goes_on_and_enrolment_says_503(
    serve_cluster: ServeCluster, shared: str, moto_endpoint: str
) -> None:
    """The gallery bucket reached through a proxy that is cut: answers from the snapshot in memory, enrolment
    refused with a reason, and both back to normal once the store returns."""
    from ray import serve

    from serve_app.app import AppArgs, build_app
    from serve_app.settings import RecognitionSettings

    with cuttable_proxy(int(moto_endpoint.rsplit(":", 1)[1])) as proxy:
        args = {
            "gallery_uri": f"s3://{BUCKET}/gallery",
            "gallery_endpoint": proxy.url,
            "gallery_refresh_s": REFRESH_S,
            "recognition": RecognitionSettings().model_dump(),
            "recognizer": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1.0},
        }
        serve.run(build_app(AppArgs.model_validate(args)), name=APP, route_prefix="/", blocking=False)
        wait_until(lambda: _health(shared) is not None, 240, "the application did not come back")
        wait_until(lambda: recognize_name(shared) == "q:obama", 60, "the gallery was not loaded through the proxy")
        photo = (KNN / "train" / "biden" / "biden.jpg").read_bytes()

        def enrol() -> requests.Response:
            return requests.post(
                f"{shared}/v1/people/biden/faces",
                files={"images": ("biden.jpg", photo)},
                headers={"X-API-Key": API_KEY},
                timeout=120,
            )

        proxy.cut()
        try:
            answers = [recognize_name(shared) for _ in range(5)]
            refused = enrol()
        finally:
            proxy.restore()
        print(f"\ngallery store cut: recognitions {answers}, enrolment {refused.status_code}")
        assert answers == ["q:obama"] * 5
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "gallery_unavailable"
        assert "Retry-After" in refused.headers
        wait_until(lambda: enrol().status_code == 201, 120, "enrolment did not recover with the store")
        people = {p["name"] for p in requests.get(f"{shared}/v1/people", timeout=30).json()["people"]}
        assert people == {"obama", "biden"}
        assert recognize_name(shared) == "q:obama"
        assert requests.delete(f"{shared}/v1/people/biden", headers={"X-API-Key": API_KEY}, timeout=60).ok
        serve.run(_build(RecognitionSettings().model_dump()), name=APP, route_prefix="/", blocking=False)
        wait_until(lambda: _health(shared) is not None, 240, "the application did not come back without the proxy")


def test_every_enrolled_face_keeps_its_chip_in_the_store_until_it_is_removed(shared: str) -> None:
    s3 = boto3.client("s3")

    def chip_keys() -> set[str]:
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="gallery/chips/")
        return {item["Key"] for item in listed.get("Contents", [])}

    before = chip_keys()
    photos = [("images", (p.name, p.read_bytes())) for p in sorted((KNN / "train" / "biden").iterdir())]
    enrolled = requests.post(
        f"{shared}/v1/people/biden/faces", files=photos, headers={"X-API-Key": API_KEY}, timeout=120
    )
    assert enrolled.status_code == 201, enrolled.text
    face_ids = [face["face_id"] for face in enrolled.json()["enrolled"]]
    assert chip_keys() - before == {f"gallery/chips/{face_id}.jpg" for face_id in face_ids}

    person = requests.get(f"{shared}/v1/people/biden", timeout=30).json()
    assert [face["face_id"] for face in person["face_list"]] == face_ids
    for face in person["face_list"]:
        image = requests.get(f"{shared}{face['image']}", timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert "immutable" in image.headers["cache-control"]
        with Image.open(io.BytesIO(image.content)) as chip:
            assert chip.size == (160, 160)
    # A recognition names each candidate's closest face, whose chip the console shows beside it.
    recognized = requests.post(
        f"{shared}/v1/recognize", files={"image": ("b.jpg", photos[0][1][1])}, timeout=120
    ).json()
    best = recognized["faces"][0]["candidates"][0]
    assert best["name"] == "biden" and best["face_id"] in face_ids

    missing = requests.get(f"{shared}/v1/people/biden/faces/0123456789ab/image", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "no_face_image"
    removed = requests.delete(
        f"{shared}/v1/people/biden/faces/{face_ids[0]}", headers={"X-API-Key": API_KEY}, timeout=60
    )
    assert removed.ok
    assert requests.get(f"{shared}/v1/people/biden/faces/{face_ids[0]}/image", timeout=30).status_code == 404
    assert requests.delete(f"{shared}/v1/people/biden", headers={"X-API-Key": API_KEY}, timeout=60).ok
    assert chip_keys() == before
