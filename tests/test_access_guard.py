"""A replica's key check (``AccessGuard``): scopes, the single FACEREC_API_KEY, revocation within the cache time,
the per-key rate and the per-address limit on refused keys. The clock is the test's, so nothing here waits."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.access.guard import CACHED_KEYS, AccessGuard, AccessLimits, Principal, Refusal
from serve_app.access.keys import KeyRing
from serve_app.access.policy import ROUTE_ACCESS, scopes_for
from serve_app.gallery_store import open_gallery_store

RECOGNIZE = frozenset({"recognize"})
MANAGE = frozenset({"manage"})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard_for(ring: KeyRing | None, env_key: str | None = None, **limits: float) -> tuple[AccessGuard, Clock]:
    clock = Clock()
    return AccessGuard(ring, env_key, AccessLimits(**limits), clock=clock), clock  # type: ignore[arg-type]


def ask(guard: AccessGuard, needed: frozenset[str] | None, key: str | None, client: str = "127.0.0.1") -> object:
    if guard.needs_store(key):
        guard.refresh(key)
    return guard.decide(needed, key, client)


def status(decision: object) -> int:
    return decision.status if isinstance(decision, Refusal) else 200


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing(open_gallery_store(str(tmp_path / "gallery")))


def test_without_keys_everything_is_open(ring: KeyRing) -> None:
    guard, _ = guard_for(ring)
    guard.refresh(None)
    assert not guard.keys_required() and not guard.needs_store(None)
    assert ask(guard, MANAGE, None) is None and ask(guard, RECOGNIZE, "anything") is None


def test_scopes_decide_and_the_old_single_key_is_a_manage_key(ring: KeyRing) -> None:
    recognize, _ = ring.create("booth", ["recognize"])
    manage, _ = ring.create("ops", ["manage"])
    both, _ = ring.create("admin", ["manage", "recognize"])
    guard, _ = guard_for(ring, env_key="old-single-key")
    assert status(ask(guard, RECOGNIZE, None)) == 401
    assert status(ask(guard, RECOGNIZE, "frk_garbage")) == 401
    assert status(ask(guard, RECOGNIZE, recognize)) == 200 and status(ask(guard, MANAGE, recognize)) == 403
    assert status(ask(guard, MANAGE, manage)) == 200 and status(ask(guard, RECOGNIZE, manage)) == 403
    assert status(ask(guard, MANAGE, both)) == 200 and status(ask(guard, RECOGNIZE, both)) == 200
    who = ask(guard, MANAGE, "old-single-key")
    assert isinstance(who, Principal) and who.name == "FACEREC_API_KEY" and who.scopes == MANAGE
    assert status(ask(guard, RECOGNIZE, "old-single-key")) == 403
    assert ask(guard, None, None) is None  # an open route stays open


def test_the_single_key_alone_makes_keys_required(tmp_path: Path) -> None:
    guard, _ = guard_for(None, env_key="old-single-key")
    assert guard.keys_required() and status(ask(guard, MANAGE, None)) == 401
    assert status(ask(guard, MANAGE, "old-single-key")) == 200


def test_a_revoked_key_stops_working_within_the_cache_time(ring: KeyRing) -> None:
    key, record = ring.create("booth", ["recognize"])
    guard, clock = guard_for(ring, cache_s=5.0)
    assert status(ask(guard, RECOGNIZE, key)) == 200
    ring.revoke(record.id)
    clock.now += 4.0
    assert status(ask(guard, RECOGNIZE, key)) == 200  # still cached: within the stated time
    clock.now += 1.5
    assert status(ask(guard, RECOGNIZE, key)) == 401
    assert status(ask(guard, RECOGNIZE, None)) == 401  # the last key revoked: closed, not open to everyone


def test_the_first_key_closes_an_open_service_within_the_cache_time(ring: KeyRing) -> None:
    guard, clock = guard_for(ring, cache_s=5.0)
    assert ask(guard, MANAGE, None) is None
    key, _ = ring.create("ops", ["manage"])
    clock.now += 5.5
    assert status(ask(guard, MANAGE, None)) == 401 and status(ask(guard, MANAGE, key)) == 200


def test_a_key_over_its_rate_gets_429_and_recovers(ring: KeyRing) -> None:
    key, _ = ring.create("booth", ["recognize"])
    other, _ = ring.create("kiosk", ["recognize"])
    guard, clock = guard_for(ring, rate_per_s=2.0, burst=5, cache_s=3600)
    assert [status(ask(guard, RECOGNIZE, key)) for _ in range(5)] == [200] * 5
    refused = ask(guard, RECOGNIZE, key)
    assert isinstance(refused, Refusal) and refused.status == 429 and refused.retry_after_s == 1
    assert status(ask(guard, RECOGNIZE, other)) == 200  # per key
    clock.now += 1.0
    assert [status(ask(guard, RECOGNIZE, key)) for _ in range(3)] == [200, 200, 429]


def test_an_address_guessing_keys_is_stopped_and_let_go_after_the_window(ring: KeyRing) -> None:
    key, _ = ring.create("booth", ["recognize"])
    guard, clock = guard_for(ring, max_failures=3, failure_window_s=60.0, cache_s=3600)
    guesses = [f"frk_{i:016x}_{'A' * 43}" for i in range(3)]
    assert [status(ask(guard, RECOGNIZE, g, "127.0.0.9")) for g in guesses] == [401, 401, 401]
    blocked = ask(guard, RECOGNIZE, key, "127.0.0.9")  # even a good key, from that address
    assert isinstance(blocked, Refusal) and blocked.status == 429 and 0 < (blocked.retry_after_s or 0) <= 60
    assert status(ask(guard, RECOGNIZE, key, "127.0.0.10")) == 200  # others are not affected
    clock.now += 61
    assert status(ask(guard, RECOGNIZE, key, "127.0.0.9")) == 200


def test_made_up_keys_do_not_grow_the_cache(ring: KeyRing) -> None:
    ring.create("booth", ["recognize"])
    guard, _ = guard_for(ring, max_failures=10**9)
    for i in range(CACHED_KEYS + 500):
        ask(guard, RECOGNIZE, f"made-up-{i}")
    assert len(guard._known) == CACHED_KEYS


def test_every_route_has_a_decision_and_the_legacy_route_is_the_operators_choice() -> None:
    assert scopes_for(ROUTE_ACCESS[("POST", "/")], "open") is None
    assert scopes_for(ROUTE_ACCESS[("POST", "/")], "key") == RECOGNIZE
    assert scopes_for(ROUTE_ACCESS[("GET", "/healthz")], "key") is None
    assert scopes_for(ROUTE_ACCESS[("GET", "/v1/people/{name}/faces/{face_id}/image")], "open") == MANAGE
