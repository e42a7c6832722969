"""The decode/validate stage: bytes -> Event, or InvalidEvent(code, reason) for the DLQ.

Pure: the caller passes the registry, the limits and the current time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pipeline.codec import DEAD_LETTER_SCHEMA, Registry
from pipeline.detectors import PatternTimeout
from pipeline.dlq import MAX_KEPT_PAYLOAD, dead_letter, kept_key
from pipeline.events import (
    DECISIONS,
    Cost,
    Decision,
    Drift,
    Eval,
    Event,
    Interaction,
    InvalidEvent,
    only_enrichment_added,
)
from pipeline.redact import DEFAULT_POLICY, Policy, redact
from pipeline.rows import Origin, money

# An EventBatch on the clean topic holds at most this many events, and this many bytes of them
# unless one event alone is larger (or less where the clean topic takes less, clean_batch_bytes):
# under Kafka's default message limit, and small enough that a dead letter keeps a whole batch
# (dlq.MAX_KEPT_PAYLOAD, 256 KiB).
BATCH_EVENTS = 500
BATCH_BYTES = 192 * 1024
# what an EventBatch adds for each event it holds: the length before its bytes (a varint)
_EVENT_FRAMING = 4
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


@dataclass(frozen=True)
class Limits:
    """Bounds beyond which an event is rejected rather than stored."""

    max_payload_bytes: int = 1_048_576
    max_clock_skew: timedelta = timedelta(hours=1)
    max_event_age: timedelta = timedelta(days=400)
    max_tokens: int = 50_000_000
    max_attributes: int = 256
    max_id_chars: int = 256


def decode_event(raw: bytes, registry: Registry, limits: Limits, now: datetime) -> Event:
    """Wire bytes -> a valid Event. Raises InvalidEvent; never anything else for bad bytes."""
    if len(raw) > limits.max_payload_bytes:
        raise InvalidEvent(
            "oversized",
            f"payload: {len(raw)} bytes exceeds the limit of {limits.max_payload_bytes}",
        )
    return check_event(registry.read_event(raw), limits, now)


def _finite(value: float | None, where: str, *, non_negative: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value):
        raise InvalidEvent("not_finite", f"{where}: {value} is not a finite number")
    if non_negative and value < 0:
        raise InvalidEvent("negative_value", f"{where}: {value} must not be negative")


def _money(value: float | None, where: str) -> None:
    _finite(value, where, non_negative=True)
    if value is not None:
        money(value, where)  # out_of_range beyond what the ledger's columns hold


def _check_body(event: Event, limits: Limits) -> None:
    body = event.body
    match body:
        case Interaction():
            for name in _TOKEN_FIELDS:
                count = getattr(body, name)
                if count < 0:
                    raise InvalidEvent("negative_value", f"{name}: {count} must not be negative")
                if count > limits.max_tokens:
                    raise InvalidEvent(
                        "out_of_range", f"{name}: {count} exceeds {limits.max_tokens} per call"
                    )
            if body.cache_read_tokens + body.cache_write_tokens > body.input_tokens:
                raise InvalidEvent(
                    "inconsistent_tokens",
                    "cache_read_tokens + cache_write_tokens: exceed input_tokens, which counts "
                    "all prompt tokens (sum Anthropic-style usage before emitting)",
                )
            if body.reasoning_tokens > body.output_tokens:
                raise InvalidEvent(
                    "inconsistent_tokens",
                    "reasoning_tokens: exceed output_tokens, which include them",
                )
            if body.status not in ("ok", "error"):
                raise InvalidEvent("bad_value", f"status: {body.status!r} is not ok or error")
            _finite(body.latency_ms, "latency_ms", non_negative=True)
            _money(body.reported_cost_usd, "reported_cost_usd")
        case Cost():
            _money(body.amount, "amount")
            if not _CURRENCY.match(body.currency):
                raise InvalidEvent("bad_value", f"currency: {body.currency!r} is not ISO 4217")
        case Drift():
            _finite(body.value, "value")
            if body.value is None and body.category is None:
                raise InvalidEvent("missing_field", "value: a drift sample needs value or category")
        case Eval():
            _finite(body.score, "score")
            _finite(body.threshold, "threshold")
        case Decision():
            if body.decision not in DECISIONS:
                raise InvalidEvent(
                    "bad_value", f"decision: {body.decision!r} is not one of {', '.join(DECISIONS)}"
                )


def check_event(event: Event, limits: Limits, now: datetime | None) -> Event:
    """Semantic bounds every event must meet, whatever its source. Returns the event. With
    ``now`` None, its time is not held to the accepted window (a backtest of history)."""
    if not event.tenant_id.strip():
        raise InvalidEvent("missing_tenant", "tenant_id: is empty; every event needs a tenant")
    for name in ("event_id", "agent_id", "environment"):
        value = getattr(event, name)
        if not value.strip():
            raise InvalidEvent("missing_field", f"{name}: is empty")
        if len(value) > limits.max_id_chars:
            raise InvalidEvent("out_of_range", f"{name}: longer than {limits.max_id_chars} chars")
    if now is not None and event.ts > now + limits.max_clock_skew:
        raise InvalidEvent(
            "timestamp_future",
            f"ts: {event.ts.isoformat()} is more than {limits.max_clock_skew} ahead of now",
        )
    if now is not None and event.ts < now - limits.max_event_age:
        raise InvalidEvent(
            "timestamp_past",
            f"ts: {event.ts.isoformat()} is older than {limits.max_event_age.days} days",
        )
    if len(event.attributes) > limits.max_attributes:
        raise InvalidEvent(
            "too_many_attributes",
            f"attributes: {len(event.attributes)} entries exceed {limits.max_attributes}",
        )
    _check_body(event, limits)
    return event


@dataclass(frozen=True, slots=True)
class Routed:
    """Where one raw message goes: ``clean`` (the validated event's wire bytes) or ``dlq`` (a
    dead letter). A clean one also carries the event its bytes encode (``pipeline.handoff``)."""

    target: str
    key: bytes | None
    value: bytes
    reason_code: str | None = None
    event: Event | None = None


def route(
    raw: bytes,
    key: bytes | None,
    origin: Origin,
    registry: Registry,
    limits: Limits,
    now: datetime,
    policy_for: Callable[[str], Policy] = lambda _tenant: DEFAULT_POLICY,
    enrich_with: Callable[[Event], Event] = lambda event: event,
    max_clean_bytes: int | None = None,
    keep: int = MAX_KEPT_PAYLOAD,
    scrub_with: Policy = DEFAULT_POLICY,
) -> Routed:
    """Validate, redact and enrich, as the worker runs them: one raw message -> clean or DLQ.
    With ``max_clean_bytes``, an event whose clean bytes are more is a dead letter
    (``oversized``): the clean topic would refuse it. A dead letter keeps at most ``keep``
    bytes of the message (``dlq.kept_payload``), scrubbed with ``scrub_with`` (``Config.scrub``).

    Never raises for bad input. Fails closed: if redaction raises, for whatever reason, the
    event goes to the DLQ (scrubbed like every dead letter), never on to storage; where the
    tenant's custom patterns ran out of time on it, with reason ``redaction_timeout``.
    """
    try:
        event = decoded = decode_event(raw, registry, limits, now)
        try:
            event = redact(event, policy_for(event.tenant_id))
        except PatternTimeout as exc:
            raise InvalidEvent("redaction_timeout", f"{exc}; the event was not stored") from exc
        except Exception as exc:  # fail closed on anything, by design
            raise InvalidEvent(
                "redaction_failed",
                f"redaction failed ({type(exc).__name__}); the event was not stored",
            ) from exc
        event = enrich_with(event)
        value = clean_value(raw, decoded, event, registry)
        if max_clean_bytes is not None and len(value) > max_clean_bytes:
            raise InvalidEvent(
                "oversized",
                f"the event is {len(value):,} bytes validated and enriched; the clean topic "
                f"takes {max_clean_bytes:,} at most (its max.message.bytes)",
            )
    except InvalidEvent as exc:
        letter = dead_letter(raw, key, origin, exc, stage="validate", received_at=now,
                             keep=keep, scrub_with=scrub_with)  # fmt: skip
        return Routed("dlq", kept_key(key), registry.encode(DEAD_LETTER_SCHEMA, letter), exc.code)
    return Routed("clean", clean_key(event), value, event=event)


def clean_key(event: Event) -> bytes:
    """The key of ``event`` on the clean topic: its tenant. So every event of a tenant is in
    one partition, and the store worker that holds it evaluates the tenant's alerts on all of
    its spend (``alerting.HeldAlerts``); each agent's events stay in their order."""
    return event.tenant_id.encode()


def clean_value(raw: bytes, decoded: Event, event: Event, registry: Registry) -> bytes:
    """The clean topic's bytes for ``event``, which validate made of ``decoded``, read from
    ``raw``. Where it only added the enrichment (nothing to redact), they are ``raw`` with the
    enrichment written in place of its null (``Registry.with_enrichment``): encoding the event
    whole cost about as much as decoding it (docs/benchmarks.md, "The hand-off and the clean
    encode")."""
    if event.enrichment is not None and only_enrichment_added(decoded, event):
        value = registry.with_enrichment(raw, event.enrichment)
        if value is not None:
            return value
    return registry.encode_event(event)


def clean_batch_bytes(max_clean_bytes: int) -> int:
    """How many bytes of events an EventBatch holds (``clean_batches``): BATCH_BYTES, or less
    where a clean topic's message holds less than that of events (``max_clean_bytes``, as
    ``route`` takes it), less what the batch adds for each. A clean topic taking 100,000 bytes
    refused each batch of 192 KiB of events by itself, and the worker sent it again for ever."""
    return max(1, min(BATCH_BYTES, max_clean_bytes - BATCH_EVENTS * _EVENT_FRAMING))


def clean_batches(
    clean: Iterable[tuple[bytes | None, bytes]],
    registry: Registry,
    max_events: int = BATCH_EVENTS,
    max_bytes: int = BATCH_BYTES,
) -> list[tuple[bytes | None, bytes]]:
    """Clean events (key, wire bytes) -> EventBatch messages (key, batch): one or more per key,
    each key's events in their order. The key decides the partition, so every event lands on
    the partition it would have alone, and in the same order."""
    open_batches: dict[bytes | None, tuple[list[bytes], int]] = {}
    batches = []
    for key, value in clean:
        events, size = open_batches.get(key, ([], 0))
        if events and (len(events) >= max_events or size + len(value) > max_bytes):
            batches.append((key, registry.encode_batch(events)))
            events, size = [], 0
        events.append(value)
        open_batches[key] = (events, size + len(value))
    batches += [(key, registry.encode_batch(events)) for key, (events, _) in open_batches.items()]
    return batches
