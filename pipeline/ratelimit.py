"""Per-tenant rate limits at the OTLP gateway: a token bucket of events for each tenant.

``tenants: {acme: {rate_limit: {events_per_second: 2000, burst: 20000}}}`` lets acme send
2,000 spans and log records a second on average, and up to ``burst`` (default: one second's
worth) at once. A request takes as many tokens as it holds spans or records, valid or not. One
that finds too few is refused whole, with 429 and the seconds until there are enough
(``Retry-After``), so that a client's retry sends it again and nothing is half-taken. A full
bucket lets any request through, even one larger than ``burst``, and is then in debt: such a
request is never refused for its size, and the rate holds on average.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.settings import ConfigError, mapping_of


@dataclass(frozen=True)
class RateLimit:
    events_per_second: float
    burst: float


def parse_rate_limit(spec: Any, where: str) -> RateLimit:
    """``{events_per_second: N, burst: M}`` (``burst`` optional) at ``where``."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected {{events_per_second: N, burst: M}}")
    mapping_of(spec, ("events_per_second", "burst"), where)
    values = {}
    for name in ("events_per_second", "burst"):
        value = spec.get(name)
        if value is None and name == "burst":
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"{where}.{name}: expected a positive number, got {value!r}")
        values[name] = float(value)
    rate = values["events_per_second"]
    return RateLimit(rate, values.get("burst", rate))


class TokenBuckets:
    """One bucket per tenant of ``limits``; tenants without a limit are never refused."""

    def __init__(
        self, limits: Mapping[str, RateLimit], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = dict(limits)
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._buckets = {tenant: (limit.burst, now) for tenant, limit in self.limits.items()}

    def take(self, tenant: str, events: int) -> float:
        """Take ``events`` tokens of ``tenant``'s bucket: 0.0 if taken, else the seconds until
        they can be (nothing is taken then)."""
        limit = self.limits.get(tenant)
        if limit is None or events <= 0:
            return 0.0
        with self._lock:
            tokens, then = self._buckets[tenant]
            now = self._clock()
            tokens = min(limit.burst, tokens + (now - then) * limit.events_per_second)
            if tokens >= min(events, limit.burst):
                self._buckets[tenant] = (tokens - events, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (min(events, limit.burst) - tokens) / limit.events_per_second

    def with_limits(self, limits: Mapping[str, RateLimit]) -> TokenBuckets:
        """Buckets for ``limits`` (a policy read again), each tenant's tokens carried over, at
        most its new burst: reading the policy again gives no tenant a fresh burst."""
        out = TokenBuckets(limits, self._clock)
        with self._lock:
            for tenant, (tokens, then) in self._buckets.items():
                if tenant in out.limits:
                    out._buckets[tenant] = (min(tokens, out.limits[tenant].burst), then)
        return out

    def give_back(self, tenant: str, events: int) -> None:
        """Return tokens taken for a request that was then not accepted (Kafka refused it)."""
        limit = self.limits.get(tenant)
        if limit is None:
            return
        with self._lock:
            tokens, then = self._buckets[tenant]
            self._buckets[tenant] = (min(limit.burst, tokens + events), then)


def retry_after(seconds: float) -> str:
    """A Retry-After header's whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
