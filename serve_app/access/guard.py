"""The check each request passes: is a key needed, is this one valid and of the right scope, and is it within
its limits.

Keys live in the gallery store (:mod:`serve_app.access.keys`), which every replica reads; each replica keeps what
it read for :attr:`AccessLimits.cache_s` seconds, so a key made or revoked takes effect on every replica within
that time (default 5 s), and a request costs no store read while the cache is fresh. ``FACEREC_API_KEY``, where
set, is one more key, of scope ``manage`` (the single key of earlier versions guarded gallery changes).

Limits, per replica (with ``R`` ingress replicas a client may get up to ``R`` times as much):

* each key may make ``rate_per_s`` requests a second on average, in bursts of up to ``burst`` (a token bucket);
  past that it is answered 429 with ``Retry-After``;
* each client address may present ``max_failures`` refused keys in ``failure_window_s``; past that, every request
  from that address is answered 429 until the window has passed, whatever key it carries. A key has 256 random
  bits, so guessing one is hopeless anyway: this stops a client from trying at speed, and keeps its refusals
  from filling the audit trail.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.access.keys import KeyRecord, KeyRing, digest

#: The name ``FACEREC_API_KEY`` is known by in answers and the audit trail (never the key).
ENV_KEY_NAME = "FACEREC_API_KEY"
#: Distinct keys remembered per replica (a flood of made-up keys evicts the oldest, it does not grow memory).
CACHED_KEYS = 4096
#: Client addresses whose failures are counted at once (the oldest forgotten first).
TRACKED_CLIENTS = 65_536


@dataclass(frozen=True)
class AccessLimits:
    cache_s: float = 5.0
    rate_per_s: float = 50.0
    burst: int = 100
    max_failures: int = 20
    failure_window_s: float = 60.0


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the key's name and id (never the key) and its scopes."""

    name: str
    key_id: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    retry_after_s: int | None = None
    #: The key's owner where the key itself was valid (a missing scope, a rate exceeded).
    who: Principal | None = None


class AccessGuard:
    """One replica's view of the keys, and the limits it keeps."""

    def __init__(
        self,
        keyring: KeyRing | None,
        env_key: str | None,
        limits: AccessLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keyring = keyring
        self._env_key = env_key or None
        self.limits = limits or AccessLimits()
        self._clock = clock
        self._keys_exist: tuple[float, bool] | None = None  # (read at, any key ever made in the store)
        self._known: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()  # digest -> (read at, who)
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # client address -> failure times
        self._reading = threading.Lock()

    # --- reading the store (blocking: the ingress calls these in a thread when the cache is stale) -----------
    def needs_store(self, key: str | None) -> bool:
        """Whether :meth:`decide` for this key would read the store (call :meth:`refresh` first, off the loop)."""
        now = self._clock()
        if self._keys_exist is None or now - self._keys_exist[0] > self.limits.cache_s:
            return self._keyring is not None
        if key is None or self._keyring is None:
            return False
        known = self._known.get(digest(key))
        return known is None or now - known[0] > self.limits.cache_s

    def refresh(self, key: str | None) -> None:
        """Read what :meth:`needs_store` said is stale. Requests that find the cache stale at once read the store
        once between them: the others wait for that read and find it fresh."""
        with self._reading:
            if self.needs_store(key):
                self._read(key)

    def _read(self, key: str | None) -> None:
        now = self._clock()
        if self._keys_exist is None or now - self._keys_exist[0] > self.limits.cache_s:
            # Any key ever made, revoked ones too: revoking the last key must not open the gallery to everyone.
            made = self._keyring is not None and bool(self._keyring.store.key_ids())
            self._keys_exist = (now, made)
        if key is not None and self._keyring is not None:
            record = self._keyring.authenticate(key)
            self._remember(digest(key), now, _principal(record) if record is not None else None)

    def _remember(self, hashed: str, now: float, principal: Principal | None) -> None:
        self._known[hashed] = (now, principal)
        self._known.move_to_end(hashed)
        while len(self._known) > CACHED_KEYS:
            self._known.popitem(last=False)

    # --- the decision ---------------------------------------------------------------------------------------
    def keys_required(self) -> bool:
        return self._env_key is not None or bool(self._keys_exist and self._keys_exist[1])

    def decide(self, needed: frozenset[str] | None, key: str | None, client: str) -> Principal | Refusal | None:
        """``None``: allowed without a key; a :class:`Principal`: allowed as that key; or why it is refused."""
        now = self._clock()
        if needed is None or not self.keys_required():
            return None
        wait = self._blocked_for(client, now)
        if wait is not None:
            return Refusal(429, "too_many_failures", "too many refused keys from this address", wait)
        if not key:
            return Refusal(401, "unauthorized", "this route needs an API key in the X-API-Key header")
        principal = self._principal_of(key)
        if principal is None:
            self._fail(client, now)
            return Refusal(401, "unauthorized", "the API key was refused (unknown, revoked or mistyped)")
        if not principal.scopes & needed:
            needs = ", ".join(sorted(needed))
            return Refusal(
                403,
                "forbidden",
                f"the key {principal.name!r} lacks the scope this route needs ({needs})",
                None,
                principal,
            )
        wait = self._take_token(principal.key_id, now)
        if wait is not None:
            return Refusal(429, "rate_limited", f"the key {principal.name!r} is over its request rate", wait, principal)
        return principal

    def _principal_of(self, key: str) -> Principal | None:
        if self._env_key is not None and hmac.compare_digest(key.encode(), self._env_key.encode()):
            return Principal(ENV_KEY_NAME, "env", frozenset({"manage"}))
        known = self._known.get(digest(key))
        return known[1] if known is not None else None

    def _take_token(self, key_id: str, now: float) -> int | None:
        rate, burst = self.limits.rate_per_s, float(self.limits.burst)
        tokens, at = self._buckets.get(key_id, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[key_id] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / rate))
        self._buckets[key_id] = (tokens - 1.0, now)
        return None

    def _fail(self, client: str, now: float) -> None:
        times = self._failures.setdefault(client, deque())
        self._failures.move_to_end(client)
        times.append(now)
        while len(times) > self.limits.max_failures + 1:
            times.popleft()
        while len(self._failures) > TRACKED_CLIENTS:
            self._failures.popitem(last=False)

    def _blocked_for(self, client: str, now: float) -> int | None:
        times = self._failures.get(client)
        if not times:
            return None
        window = self.limits.failure_window_s
        while times and now - times[0] > window:
            times.popleft()
        if len(times) < self.limits.max_failures:
            return None
        return max(1, math.ceil(window - (now - times[-self.limits.max_failures])))


def _principal(record: KeyRecord) -> Principal:
    return Principal(record.name, record.id, frozenset(record.scopes))
