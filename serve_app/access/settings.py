"""The ``access:`` application argument: who may call what, and how fast (see :mod:`serve_app.access.policy`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from serve_app.access.guard import AccessLimits
from serve_app.access.policy import LegacyRoute


class AccessConfig(BaseModel):
    """API keys are made with ``facerec keys create``; these settings say how the service applies them."""

    #: The legacy ``POST /`` has no key in its contract: ``open`` keeps existing clients working (a warning at
    #: start says so once keys exist), ``key`` makes it need a ``recognize`` key like ``/v1/recognize``.
    legacy_route: LegacyRoute = "open"
    cache_s: float = Field(5.0, gt=0, le=300, description="a key made or revoked reaches every replica within this")
    rate_per_s: float = Field(50.0, gt=0, description="requests a second per key and ingress replica, on average")
    burst: int = Field(100, ge=1, description="requests a key may make at once before its rate applies")
    max_failures: int = Field(20, ge=1, description="refused keys per client address in failure_window_s")
    failure_window_s: float = Field(60.0, gt=0)

    def limits(self) -> AccessLimits:
        return AccessLimits(
            cache_s=self.cache_s,
            rate_per_s=self.rate_per_s,
            burst=self.burst,
            max_failures=self.max_failures,
            failure_window_s=self.failure_window_s,
        )
