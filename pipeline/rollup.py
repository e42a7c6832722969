"""One-minute tumbling windows per (tenant, agent, model, unit type), on event time. Pure.

The worker folds every event the ledger stores into the open windows and publishes a window
to the rollups topic once the watermark (the newest event time seen, no later than when it was
stored) has passed its end by ``lateness``. A window is then dropped, and at most ``max_open``
windows are ever kept (the oldest are closed early beyond that), so memory stays bounded
however many keys appear. The stored ``vigil.rollups_1m`` does not depend on this: ClickHouse
keeps it from the ledger's inserts, exactly. This stream is for consumers that want rollups as
they happen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pipeline.events import Event, Interaction

LATENCY_SAMPLE = 1000  # latencies kept per window for the quantiles (a reservoir beyond that)
_TOKEN_KINDS = ("input", "output", "cache_read", "cache_write", "reasoning")


@dataclass
class _Window:
    events: int = 0
    interactions: int = 0
    errors: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TOKEN_KINDS, 0))
    cost_usd: Decimal = Decimal(0)
    latencies: list[float] = field(default_factory=list)
    seen_latencies: int = 0


Key = tuple[str, str, str, str, datetime]  # tenant, agent, model, unit type, window start


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Rollups:
    def __init__(
        self,
        window: timedelta = timedelta(minutes=1),
        lateness: timedelta = timedelta(minutes=1),
        max_open: int = 100_000,
        seed: int = 0,
    ) -> None:
        self.window = window
        self.lateness = lateness
        self.max_open = max_open
        self.open: dict[Key, _Window] = {}
        self.watermark: datetime | None = None
        self._rng = random.Random(seed)
        self._windows = LastWindow(window)

    def add(self, event: Event, stored_at: datetime | None = None) -> None:
        """Count ``event`` in its window. ``stored_at``: when it was stored; the watermark goes
        no further than that, so an event time ahead of it (a producer's clock running fast)
        does not close the windows open now early (``alerts.as_stored``)."""
        start = self._windows.start(event.ts)
        body = event.body
        interaction = body if type(body) is Interaction else None
        unit = event.unit
        key = (event.tenant_id, event.agent_id, interaction.model if interaction else "",
               unit.type if unit else "", start)  # fmt: skip
        w = self.open.get(key)
        if w is None:
            w = self.open[key] = _Window()
        w.events += 1
        if interaction is not None:
            w.interactions += 1
            if interaction.status == "error":
                w.errors += 1
            tokens = w.tokens  # written out: a loop of getattr cost 0.5 us an interaction
            tokens["input"] += interaction.input_tokens
            tokens["output"] += interaction.output_tokens
            tokens["cache_read"] += interaction.cache_read_tokens
            tokens["cache_write"] += interaction.cache_write_tokens
            tokens["reasoning"] += interaction.reasoning_tokens
            if interaction.latency_ms is not None:
                w.seen_latencies += 1
                if len(w.latencies) < LATENCY_SAMPLE:
                    w.latencies.append(interaction.latency_ms)
                else:  # reservoir sampling keeps an even sample in bounded memory
                    j = self._rng.randrange(w.seen_latencies)
                    if j < LATENCY_SAMPLE:
                        w.latencies[j] = interaction.latency_ms
        enrichment = event.enrichment
        if enrichment is not None and enrichment.cost_usd is not None:
            w.cost_usd += Decimal(enrichment.cost_usd)
        seen = event.ts if stored_at is None or event.ts <= stored_at else stored_at
        if self.watermark is None or seen > self.watermark:
            self.watermark = seen

    def close(self) -> list[dict[str, Any]]:
        """The windows the watermark has passed (plus the oldest beyond ``max_open``)."""
        if self.watermark is None:
            return []
        cutoff = self.watermark - self.lateness
        done = [k for k in self.open if k[4] + self.window <= cutoff]
        if len(self.open) - len(done) > self.max_open:
            rest = sorted((k for k in self.open if k[4] + self.window > cutoff), key=lambda k: k[4])
            done += rest[: len(self.open) - len(done) - self.max_open]
        return [self._record(k, self.open.pop(k)) for k in sorted(done, key=lambda k: k[4])]

    def close_all(self) -> list[dict[str, Any]]:
        keys = sorted(self.open, key=lambda k: k[4])
        return [self._record(k, self.open.pop(k)) for k in keys]

    def _record(self, key: Key, w: _Window) -> dict[str, Any]:
        tenant, agent, model, unit_type, start = key
        ordered = sorted(w.latencies)
        return {
            "window_start": start.isoformat(),
            "window_end": (start + self.window).isoformat(),
            "tenant_id": tenant,
            "agent_id": agent,
            "model": model,
            "unit_type": unit_type,
            "events": w.events,
            "interactions": w.interactions,
            "errors": w.errors,
            **{f"{kind}_tokens": n for kind, n in w.tokens.items()},
            "cost_usd": format(w.cost_usd, "f"),
            "latency_ms_p50": _quantile(ordered, 0.5),
            "latency_ms_p95": _quantile(ordered, 0.95),
            "latency_ms_p99": _quantile(ordered, 0.99),
        }


_WINDOWS_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def floor_time(ts: datetime, step: timedelta) -> datetime:
    """The start of the ``step``-long window ``ts`` falls in (windows aligned to 2000-01-01)."""
    return _WINDOWS_EPOCH + ((ts - _WINDOWS_EPOCH) // step) * step


class LastWindow:
    """``floor_time`` for times that mostly fall in the window of the one before (a stream's
    events): the last window is kept, and found again only for a time outside it. Found for
    every event, the window took 40% of ``Rollups.add`` (docs/benchmarks.md)."""

    def __init__(self, step: timedelta) -> None:
        self.step = step
        # an empty window to begin with: the first time finds its own
        self._start, self._end = datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC)

    def start(self, ts: datetime) -> datetime:
        """The start of the ``step``-long window ``ts`` falls in."""
        if not self._start <= ts < self._end:
            self._start = floor_time(ts, self.step)
            self._end = self._start + self.step
        return self._start
