"""Every route behind a scoped key, on a real Serve application whose gallery store holds keys.

The table test walks every operation of ``/openapi.json``: no key 401, a key of the wrong scope 403, the right
scope answers as before. An operation the table here does not know fails the test, as does one the service's own
table (``serve_app/access/policy.py``) leaves undecided: nothing in the API escapes a decision. Then: the legacy
route as the operator chooses it, revocation reaching every ingress replica, the per-key rate and the per-address
limit on refused keys answering 429 and recovering, and no key in any log or answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from serve_app.access.keys import KeyRing
from serve_app.access.policy import ROUTE_ACCESS
from serve_app.gallery_store import open_gallery_store
from tests.serve_fixtures import ServeCluster, healthy
from tests.waiting import wait_until

from .conftest import SCENES

pytestmark = pytest.mark.serve

KNN = SCENES / "knn"
OBAMA = KNN / "train" / "obama" / "obama.jpg"
BIDEN = KNN / "train" / "biden" / "biden.jpg"
CACHE_S = 1.0
RATE = {"rate_per_s": 5.0, "burst": 40}
FAILURES = {"max_failures": 4, "failure_window_s": 3.0}


@dataclass
class Keys:
    recognize: str
    manage: str
    both: str
    ring: KeyRing


@dataclass
class Service:
    url: str
    keys: Keys
    deploy: Callable[[str], None]


def photo(path: Path, part: str = "image") -> dict[str, Any]:
    return {part: (path.name, path.read_bytes(), "image/jpeg")}


@pytest.fixture(scope="module")
def service(serve_cluster: ServeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from ray import serve

    from serve_app.app import AppArgs, build_app
    from serve_app.settings import RecognitionSettings

    gallery = tmp_path_factory.mktemp("guarded-gallery")
    ring = KeyRing(open_gallery_store(str(gallery)))
    keys = Keys(
        recognize=ring.create("booth", ["recognize"])[0],
        manage=ring.create("ops", ["manage"])[0],
        both=ring.create("admin", ["manage", "recognize"])[0],
        ring=ring,
    )

    def deploy(legacy_route: str) -> None:
        app = build_app(
            AppArgs.model_validate(
                {
                    "gallery_uri": str(gallery),
                    "recognition": RecognitionSettings().model_dump(),
                    "gallery_refresh_s": 0.5,
                    "recognizer": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1.0},
                    "ingress_replicas": 2,
                    "access": {"legacy_route": legacy_route, "cache_s": CACHE_S, **RATE, **FAILURES},
                }
            )
        )
        serve.run(app, name="guarded", route_prefix="/", blocking=False)
        wait_until(lambda: healthy(serve_cluster.url), 240, "the application did not become healthy")

    deploy("open")
    yield Service(serve_cluster.url, keys, deploy)
    serve.delete("guarded")


def enrol(service: Service, name: str) -> str:
    response = requests.post(
        f"{service.url}/v1/people/{name}/faces",
        files=[("images", (OBAMA.name, OBAMA.read_bytes(), "image/jpeg"))],
        headers={"X-API-Key": service.keys.manage},
        timeout=120,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["enrolled"][0]["face_id"])


Call = Callable[[Service, dict[str, str]], requests.Response]


def _table() -> dict[tuple[str, str], tuple[Call, int]]:
    """Each operation: how to call it well, and what it answers then (as it did before keys)."""

    def post(path: str, **kwargs: Any) -> Call:
        return lambda s, h: requests.post(f"{s.url}{path}", headers=h, timeout=120, **kwargs)

    def get(path: str) -> Call:
        return lambda s, h: requests.get(f"{s.url}{path}", headers=h, timeout=120)

    def with_face(make: Callable[[Service, str, str, dict[str, str]], requests.Response]) -> Call:
        def call(s: Service, h: dict[str, str]) -> requests.Response:
            name = f"table-{time.monotonic_ns()}"
            return make(s, name, enrol(s, name), h)

        return call

    return {
        ("POST", "/"): (post("/", files=photo(BIDEN, "inputFile")), 200),
        ("GET", "/healthz"): (get("/healthz"), 200),
        ("GET", "/v1/status"): (get("/v1/status"), 200),
        ("POST", "/v1/recognize"): (post("/v1/recognize", files=photo(BIDEN)), 200),
        ("POST", "/v1/detect"): (post("/v1/detect", files=photo(BIDEN)), 200),
        ("POST", "/v1/verify"): (post("/v1/verify", files={**photo(BIDEN, "image1"), **photo(OBAMA, "image2")}), 200),
        ("GET", "/v1/people"): (get("/v1/people"), 200),
        ("GET", "/v1/gallery"): (get("/v1/gallery"), 200),
        ("POST", "/v1/gallery/reembed"): (post("/v1/gallery/reembed", json={"checkpoint": "no-such-model"}), 400),
        ("POST", "/v1/people/{name}/faces"): (
            lambda s, h: requests.post(
                f"{s.url}/v1/people/table-enrolled/faces",
                files=[("images", (OBAMA.name, OBAMA.read_bytes(), "image/jpeg"))],
                headers=h,
                timeout=120,
            ),
            201,
        ),
        ("GET", "/v1/people/{name}"): (
            with_face(lambda s, n, f, h: requests.get(f"{s.url}/v1/people/{n}", headers=h, timeout=60)),
            200,
        ),
        ("DELETE", "/v1/people/{name}"): (
            with_face(lambda s, n, f, h: requests.delete(f"{s.url}/v1/people/{n}", headers=h, timeout=60)),
            200,
        ),
        ("GET", "/v1/people/{name}/faces/{face_id}/image"): (
            with_face(lambda s, n, f, h: requests.get(f"{s.url}/v1/people/{n}/faces/{f}/image", headers=h, timeout=60)),
            200,
        ),
        ("DELETE", "/v1/people/{name}/faces/{face_id}"): (
            with_face(lambda s, n, f, h: requests.delete(f"{s.url}/v1/people/{n}/faces/{f}", headers=h, timeout=60)),
            200,
        ),
    }


def test_every_operation_needs_its_key(service: Service) -> None:
    spec = requests.get(f"{service.url}/openapi.json", timeout=60).json()
    operations = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    table = _table()
    assert operations - set(table) == set(), "an operation this test does not know: add it to the table"
    assert operations - set(ROUTE_ACCESS) == set(), "an operation without an access decision in policy.py"
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": spec["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    keys = service.keys
    wrong_for = {"recognize": keys.manage, "manage": keys.recognize}
    right_for = {"recognize": keys.recognize, "manage": keys.manage, "any key": keys.recognize}
    for operation in sorted(operations):
        call, expected = table[operation]
        access = ROUTE_ACCESS[operation]
        if access in ("open", "legacy"):  # legacy: open in this deployment (the legacy test covers `key`)
            assert call(service, {}).status_code == expected, operation
            continue
        assert "ApiKey" in str(spec["paths"][operation[1]][operation[0].lower()]["security"]), operation
        refused = call(service, {})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized", operation
        if access in wrong_for:
            wrong = call(service, {"X-API-Key": wrong_for[access]})
            assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden", operation
        answered = call(service, {"X-API-Key": right_for[access]})
        assert answered.status_code == expected, (operation, answered.text)
        assert call(service, {"X-API-Key": keys.both}).status_code == expected, operation


def test_the_legacy_route_is_open_or_needs_a_key_as_the_operator_chooses(service: Service) -> None:
    data = BIDEN.read_bytes()
    open_answer = requests.post(f"{service.url}/", files={"inputFile": ("biden.jpg", data)}, timeout=120)
    assert open_answer.status_code == 200 and open_answer.content == b"biden:Unknown"  # nobody enrolled as biden
    service.deploy("key")
    try:
        wait_until(
            lambda: (
                requests.post(f"{service.url}/", files={"inputFile": ("biden.jpg", data)}, timeout=60).status_code
                == 401
            ),
            120,
            "the legacy route did not start needing a key",
        )
        keyed = requests.post(
            f"{service.url}/",
            files={"inputFile": ("biden.jpg", data)},
            headers={"X-API-Key": service.keys.recognize},
            timeout=120,
        )
        assert keyed.status_code == 200 and keyed.content == b"biden:Unknown"
        manage_only = requests.post(
            f"{service.url}/", files={"inputFile": ("biden.jpg", data)}, headers={"X-API-Key": service.keys.manage}
        )
        assert manage_only.status_code == 403
    finally:
        service.deploy("open")


def test_a_revoked_key_stops_working_on_every_replica(service: Service) -> None:
    key, record = service.keys.ring.create("short-lived", ["recognize"])
    status = f"{service.url}/v1/status"
    assert all(requests.get(status, headers={"X-API-Key": key}, timeout=60).ok for _ in range(20))
    service.keys.ring.revoke(record.id)
    revoked_at = time.monotonic()

    def refused_everywhere() -> bool:
        # 401, or 429 once this address has presented the revoked key too often (the limit on refused keys).
        answers = [requests.get(status, headers={"X-API-Key": key}, timeout=60) for _ in range(20)]
        return all(a.status_code == 401 or _blocked(a) for a in answers)

    wait_until(refused_everywhere, 30, "a revoked key still worked")
    # Within the stated time (the cache), with room for the requests themselves on a slow machine.
    assert time.monotonic() - revoked_at < CACHE_S + 10
    _let_go(service)


def _blocked(answer: requests.Response) -> bool:
    return answer.status_code == 429 and answer.json()["error"]["code"] == "too_many_failures"


def _let_go(service: Service) -> None:
    """Wait until this address may present keys again (after the window on refused keys)."""
    wait_until(
        lambda: requests.get(f"{service.url}/v1/status", headers={"X-API-Key": service.keys.both}, timeout=60).ok,
        30,
        "this address stayed blocked",
    )


def let_go(status: str, key: str) -> None:
    """Wait until this address is not blocked by an earlier test's refused keys (its failure window passed)."""
    wait_until(
        lambda: requests.get(status, headers={"X-API-Key": key}, timeout=60).status_code == 200,
        30,
        "this address stayed blocked",
    )


def test_a_key_over_its_rate_gets_429_and_recovers(service: Service) -> None:
    key, _ = service.keys.ring.create("busy", ["recognize"])
    status = f"{service.url}/v1/status"
    let_go(status, key)
    # 32 clients at once, so that the key spends its tokens faster than they come back however slow this machine
    # is (one client at a time, a request slower than 1 / rate never empties the bucket); 400 requests are over
    # both replicas' bursts plus their refill at any pace above 15 a second.
    with ThreadPoolExecutor(max_workers=32) as clients:
        answers = list(clients.map(lambda _: requests.get(status, headers={"X-API-Key": key}, timeout=120), range(400)))
    limited = [a for a in answers if a.status_code == 429 and a.json()["error"]["code"] == "rate_limited"]
    assert limited, "no request was limited"
    assert {a.status_code for a in answers} == {200, 429}
    assert int(limited[0].headers["Retry-After"]) >= 1
    wait_until(
        lambda: requests.get(status, headers={"X-API-Key": key}, timeout=60).status_code == 200,
        30,
        "the key did not recover",
    )


def test_guessing_keys_is_stopped_then_let_go(service: Service) -> None:
    status = f"{service.url}/v1/status"
    let_go(status, service.keys.recognize)
    # 20 guessers at once: the failures land inside the window however slow this machine answers a 401.
    with ThreadPoolExecutor(max_workers=20) as guessers:
        guesses = list(
            guessers.map(
                lambda i: requests.get(status, headers={"X-API-Key": f"frk_{i:016x}_{'A' * 43}"}, timeout=120),
                range(40),
            )
        )
    codes = [g.status_code for g in guesses]
    assert set(codes) == {401, 429} and codes.count(401) >= FAILURES["max_failures"]  # each replica counts its own
    blocked = next(g for g in guesses if g.status_code == 429)
    assert blocked.json()["error"]["code"] == "too_many_failures" and int(blocked.headers["Retry-After"]) >= 1
    wait_until(
        lambda: all(
            requests.get(status, headers={"X-API-Key": service.keys.recognize}, timeout=60).ok for _ in range(10)
        ),
        30,
        "the address was not let go after the window",
    )


def test_the_audit_trail_records_reads_changes_and_refused_keys_and_never_a_key(service: Service) -> None:
    from serve_app.access.audit import read_events

    store = service.keys.ring.store
    manage = {"X-API-Key": service.keys.manage}
    name = f"audited-{time.monotonic_ns()}"
    face_id = enrol(service, name)
    assert requests.get(f"{service.url}/v1/people/{name}/faces/{face_id}/image", headers=manage, timeout=60).ok
    assert requests.get(f"{service.url}/v1/people", headers=manage, timeout=60).ok
    assert requests.delete(f"{service.url}/v1/people/{name}", headers=manage, timeout=60).ok
    wrong = f"frk_{'0' * 16}_{'B' * 43}"
    assert requests.get(f"{service.url}/v1/people", headers={"X-API-Key": wrong}, timeout=60).status_code == 401

    def recorded() -> list[tuple[str, int, str | None, tuple[str, ...]]]:
        return [(e.action, e.status, e.key, e.face_ids) for e in read_events(store, person=name)]

    expected = [
        ("faces.enrol", 201, "ops", (face_id,)),
        ("chip.read", 200, "ops", (face_id,)),
        ("person.forget", 200, "ops", ()),
    ]
    wait_until(lambda: recorded() == expected, 30, "the trail does not hold the enrolment, chip read and removal")
    events = list(read_events(store))
    assert any(e.action == "people.list" and e.key == "ops" and e.client for e in events)
    assert any(e.action == "key.refused" and e.status == 401 and e.key is None for e in events)
    # Every change and chip read of the table test is there too, each with the key that made it.
    assert {e.action for e in events} >= {"faces.enrol", "chip.read", "person.forget", "face.forget", "key.forbidden"}
    # No key, no secret, in any object of the trail.
    trail = b"".join(store.read_audit(k) or b"" for day in store.audit_days() for k in store.audit_objects(day))
    keys = [service.keys.recognize, service.keys.manage, service.keys.both, wrong]
    assert not [k for k in keys if k.encode() in trail or k.rsplit("_", 1)[1].encode() in trail]
    _let_go(service)


def test_no_key_reaches_a_log_or_an_answer(service: Service) -> None:
    import ray

    refused = requests.get(f"{service.url}/v1/people", headers={"X-API-Key": "frk_not-a-key"}, timeout=60)
    assert refused.status_code in (401, 429) and "frk_not-a-key" not in refused.text
    keys = [service.keys.recognize, service.keys.manage, service.keys.both]
    for key in keys:
        assert service.keys.recognize not in requests.get(f"{service.url}/v1/status", headers={"X-API-Key": key}).text
    node = ray._private.worker.global_worker.node
    assert node is not None
    files = [path for path in Path(node.get_logs_dir_path()).rglob("*") if path.is_file()]
    assert len(files) > 10  # the replicas' logs are there to be searched
    secrets = [key.encode() for key in keys] + [key.rsplit("_", 1)[1].encode() for key in keys]
    assert [path.name for path in files if any(s in path.read_bytes() for s in secrets)] == []
