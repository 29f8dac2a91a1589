"""Changing the model live: re-embed, ``serve deploy`` the new checkpoint under load, enrol, roll back.

20 clients send ``POST /`` and ``/v1/recognize`` without pause while the checkpoint is switched from
facenet-keras-128 to casia-webface-512 and back. Counted: requests sent, answered, failed, and answered by which
model; every answer must name the person in the photo (an answer matched against another model's embeddings
could not), and a person enrolled under the new model must be named after the rollback too.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.serve_fixtures import API_KEY, ServeCluster
from tests.waiting import wait_until

from .conftest import SCENES

pytestmark = [pytest.mark.serve]

KNN = SCENES / "knn"
APP = "switch"
KERAS, CASIA = "facenet-keras-ms-celeb-128-v1", "facenet-casia-webface-512-20180408"
CLIENTS = 20


def _build(gallery: Path, checkpoint: str):  # type: ignore[no-untyped-def]
    from serve_app.app import AppArgs, build_app

    return build_app(
        AppArgs.model_validate(
            {
                "gallery_uri": str(gallery),
                "gallery_refresh_s": 1.0,
                "recognition": {"checkpoint": checkpoint},
                "recognizer": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 1.0},
            }
        )
    )


def _models_serving(url: str, calls: int = 30) -> set[str]:
    seen = set()
    for _ in range(calls):
        try:
            response = requests.get(f"{url}/healthz", timeout=10)
        except requests.ConnectionError:
            continue
        if response.status_code == 200:
            seen.add(str(response.json()["model_id"]))
    return seen


def _deploy_and_wait(url: str, gallery: Path, checkpoint: str, model_id: str) -> None:
    from ray import serve

    serve.run(_build(gallery, checkpoint), name=APP, route_prefix="/", blocking=False)

    def switched() -> bool:
        status = serve.status().applications.get(APP)
        return status is not None and status.status == "RUNNING" and _models_serving(url) == {model_id}

    wait_until(switched, 300, f"the replicas did not all switch to {model_id}", interval=1.0)


def _enrol(url: str, person: str) -> None:
    photos = [("images", (p.name, p.read_bytes())) for p in sorted((KNN / "train" / person).iterdir())]
    response = requests.post(
        f"{url}/v1/people/{person}/faces", files=photos, headers={"X-API-Key": API_KEY}, timeout=300
    )
    assert response.status_code == 201, response.text


class Clients:
    """``CLIENTS`` threads, each alternating ``POST /`` and ``POST /v1/recognize`` with a photo of Obama."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.photo = (KNN / "test" / "obama1.jpg").read_bytes()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.wrong: list[str] = []
        self.first_seen: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.slowest_s = 0.0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(300)

    def _run(self, index: int) -> None:
        legacy = index % 2 == 0
        while not self.stop.is_set():
            legacy = not legacy
            sent = time.monotonic()
            outcome, model = self._one(legacy)
            now = time.monotonic()
            with self.lock:
                self.slowest_s = max(self.slowest_s, now - sent)
                self.counts["sent"] += 1
                self.counts[outcome] += 1
                if model:
                    self.by_model[model] += 1
                    self.first_seen.setdefault(model, now)
                    self.last_seen[model] = now

    def _one(self, legacy: bool) -> tuple[str, str | None]:
        try:
            if legacy:
                response = requests.post(f"{self.url}/", files={"inputFile": ("q.jpg", self.photo)}, timeout=300)
            else:
                response = requests.post(
                    f"{self.url}/v1/recognize", files={"image": ("q.jpg", self.photo)}, timeout=300
                )
        except requests.RequestException as exc:
            with self.lock:
                self.wrong.append(f"no answer: {exc}")
            return "failed", None
        if response.status_code != 200:
            with self.lock:
                self.wrong.append(f"{response.status_code}: {response.text[:200]}")
            return "failed", None
        name = response.text.split(":", 1)[1] if legacy else response.json()["name"]
        if name != "obama":
            with self.lock:
                self.wrong.append(f"named {name!r}")
            return "wrong", None if legacy else response.json()["model_id"]
        return "answered", None if legacy else response.json()["model_id"]


@pytest.fixture(scope="module")
def switching(serve_cluster: ServeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from ray import serve

    gallery = tmp_path_factory.mktemp("switch-gallery")
    _deploy_and_wait(serve_cluster.url, gallery, "facenet-keras-128", KERAS)
    yield serve_cluster.url, gallery
    serve.delete(APP)


def test_switching_the_model_and_back_under_load_fails_no_request(switching: tuple[str, Path]) -> None:
    url, gallery = switching
    for person in ("obama", "biden", "kit_harington"):
        _enrol(url, person)

    # 1. Re-embed through the running service's gallery writer (what `facerec gallery reembed` does offline).
    started = requests.post(
        f"{url}/v1/gallery/reembed",
        json={"checkpoint": "casia-webface-512"},
        headers={"X-API-Key": API_KEY},
        timeout=60,
    )
    assert started.status_code == 202, started.text
    assert started.json()["target_model"] == CASIA and started.json()["total"] == 6

    def reembedded() -> bool:
        progress = requests.get(f"{url}/v1/gallery", timeout=30).json()["reembedding"]
        assert progress["state"] != "failed", progress
        return bool(progress["state"] == "done")

    wait_until(reembedded, 120, "the re-embedding did not finish")
    refused = requests.post(
        f"{url}/v1/gallery/reembed", json={"checkpoint": "no-such-model"}, headers={"X-API-Key": API_KEY}, timeout=60
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unknown_checkpoint"

    with Clients(url) as clients:
        wait_until(lambda: clients.counts["answered"] >= 20, 120, "the clients got no answers before the switch")
        # 2. Switch: every replica ends on the new model's snapshot.
        switch_started = time.monotonic()
        _deploy_and_wait(url, gallery, "casia-webface-512", CASIA)
        switch_s = time.monotonic() - switch_started
        overlap_first_to_last = clients.last_seen.get(KERAS, 0.0) - clients.first_seen.get(CASIA, 0.0)
        # An enrolment under the new model...
        _enrol(url, "rose_leslie")
        # 3. ...and a rollback: the old model's snapshot catches up with it.
        rollback_started = time.monotonic()
        _deploy_and_wait(url, gallery, "facenet-keras-128", KERAS)
        rollback_s = time.monotonic() - rollback_started
        # The clients go on a little on the rolled-back model before they stop.
        answered = clients.counts["answered"]
        wait_until(lambda: clients.counts["answered"] >= answered + 10, 120, "no answers after the rollback")
    print(
        f"\nmodel switch under {CLIENTS} clients: {dict(clients.counts)}; "
        f"JSON answers by model {dict(clients.by_model)}; "
        f"switch {switch_s:.1f} s (both models answering for {max(0.0, overlap_first_to_last):.1f} s), "
        f"rollback {rollback_s:.1f} s; slowest answer {clients.slowest_s:.1f} s"
    )
    assert clients.counts["failed"] == 0 and clients.counts["wrong"] == 0, clients.wrong[:5]
    assert clients.by_model[KERAS] > 0 and clients.by_model[CASIA] > 0

    people = requests.get(f"{url}/v1/people", timeout=30).json()
    assert people["model_id"] == KERAS
    assert {p["name"] for p in people["people"]} == {"obama", "biden", "kit_harington", "rose_leslie"}
    snapshots = {s["model_id"]: s["faces"] for s in people["snapshots"]}
    assert snapshots == {KERAS: 8, CASIA: 8}  # 3 people of 2 photos, then Rose's 2 under the new model

    def both_named() -> bool:
        answer = requests.post(
            f"{url}/v1/recognize",
            files={"image": ("kr.jpg", (KNN / "test" / "kit_with_rose.jpg").read_bytes())},
            timeout=120,
        ).json()
        return sorted(str(face["name"]) for face in answer["faces"]) == ["kit_harington", "rose_leslie"]

    wait_until(both_named, 60, "the person enrolled under the new model is not named after the rollback")
