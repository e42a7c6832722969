"""Event -> ClickHouse row, and dead letter -> row. Pure functions with golden tests.

Column lists here must match ``schemas/clickhouse``; the integration tests insert through them.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from operator import itemgetter
from typing import Any

from pipeline.events import Cost, Decision, Drift, Eval, Event, Interaction, InvalidEvent


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a message was read from: the coordinates offsets and dedup tokens are built on."""

    topic: str
    partition: int
    offset: int
    index: int | None = None  # the event's place in an EventBatch message; None: not in one


AUDIT_COLUMNS = (
    "event_id",
    "kind",
    "ts",
    "tenant_id",
    "environment",
    "agent_id",
    "trace_id",
    "span_id",
    "session_id",
    "unit_type",
    "unit_id",
    "actor_user_id",
    "actor_role",
    "attributes",
    "provider",
    "model",
    "operation",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "latency_ms",
    "status",
    "error_type",
    "finish_reason",
    "tool_name",
    "input_text",
    "output_text",
    "reported_cost_usd",
    "amount",
    "currency",
    "category",
    "description",
    "metric",
    "value",
    "score",
    "threshold",
    "dataset",
    "subject_event_id",
    "decision",
    "reviewer_id",
    "reason",
    "source_topic",
    "source_partition",
    "source_offset",
    "ingested_at",
    "redactions",
    "cost_usd",
    "cost_status",
    "price_version",
    "owner",
    "team",
    "agent_registered",
)

_EMPTY_ROW: dict[str, Any] = {
    name: None
    for name in (
        "latency_ms",
        "input_text",
        "output_text",
        "reported_cost_usd",
        "amount",
        "description",
        "value",
        "score",
        "threshold",
        "reason",
    )
}
_NUMERIC_ZERO = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)
# a column's value where the event sets none: None where nullable, 0 for token counts, else ""
_DEFAULT_ROW: dict[str, Any] = {
    **dict.fromkeys(AUDIT_COLUMNS, ""),
    **_EMPTY_ROW,
    **dict.fromkeys(_NUMERIC_ZERO, 0),
}
_IN_COLUMN_ORDER = itemgetter(*AUDIT_COLUMNS)


_NINE_PLACES = Decimal("1e-9")
_ZERO = Decimal(0).quantize(_NINE_PLACES)
# The ledger's money columns are Decimal(18, 9): nine digits before the point. A larger amount
# fails the whole batch's insert (clickhouse-connect cannot write it), so validation rejects it
# (``validate.check_event``) and a row is never made of one.
_MONEY_LIMIT = 10**9


def money(value: float | str | Decimal, where: str) -> Decimal:
    """``value`` (the field ``where``) as a money column stores it; InvalidEvent if the
    column cannot hold it."""
    # via str so 0.1 is stored as 0.1, not as the binary float's 0.1000000000000000055...;
    # at the column's scale, so the value hashed is exactly the value stored
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:  # a string that is no number: only from an event not validated
        raise InvalidEvent("bad_value", f"{where}: {value!r} is not a number") from None
    if not amount.is_finite() or abs(amount) >= _MONEY_LIMIT:
        raise InvalidEvent(
            "out_of_range",
            f"{where}: {value} is not below {_MONEY_LIMIT:,}, the most the ledger's "
            "Decimal(18, 9) columns hold",
        )
    stored = amount.quantize(_NINE_PLACES)
    # a negative zero (a refund rounded to nothing: round(-0.0001, 2)) is stored as 0: hashed
    # as "-0E-9", the row read back no longer matched its hash, a tampering verify reported
    return _ZERO if stored.is_zero() else stored


def _money(value: float | str | None, where: str) -> Decimal | None:
    return None if value is None else money(value, where)


# The ledger's columns that only an event which skipped validation can overflow: token counts
# (UInt64: a negative one failed the whole batch's insert, retried for ever) and measures
# (Float64, but NaN or an infinity has no canonical JSON for the row's hash: a ValueError out of
# the ledger, which stopped the worker at each restart). ``validate.check_event`` refuses both.
_FINITE = ("latency_ms", "value", "score", "threshold")
_UINT64 = 2**64


def _storable(row: dict[str, Any], event: Event) -> None:
    """Raises InvalidEvent for a count or a measure of ``row`` its column or hash cannot hold."""
    for name in _NUMERIC_ZERO:
        if not 0 <= row[name] < _UINT64:
            raise InvalidEvent("out_of_range", f"{name}: {row[name]} is not a count the "
                                               "ledger's UInt64 column holds")  # fmt: skip
    for name in _FINITE:
        if row[name] is not None and not math.isfinite(row[name]):
            raise InvalidEvent("not_finite", f"{name}: {row[name]} is not a finite number")
    for r in event.redactions:
        if not 0 <= r.count < 2**32:
            raise InvalidEvent("out_of_range", f"redactions: a count of {r.count} is not one "
                                               "the ledger's UInt32 holds")  # fmt: skip


def stored_ms(value: datetime) -> datetime:
    """At the column's millisecond precision, so the time hashed is exactly the time stored.
    A time already there (every event time read from Avro) is returned as it is: a replace
    took a tenth of an event's ``audit_row``."""
    below = value.microsecond % 1000
    return value.replace(microsecond=value.microsecond - below) if below else value


def _body_columns(event: Event) -> dict[str, Any]:
    body = event.body
    match body:
        case Interaction():
            return {
                "provider": body.provider,
                "model": body.model,
                "operation": body.operation,
                "input_tokens": body.input_tokens,
                "output_tokens": body.output_tokens,
                "cache_read_tokens": body.cache_read_tokens,
                "cache_write_tokens": body.cache_write_tokens,
                "reasoning_tokens": body.reasoning_tokens,
                "latency_ms": body.latency_ms,
                "status": body.status,
                "error_type": body.error_type or "",
                "finish_reason": body.finish_reason or "",
                "tool_name": body.tool_name or "",
                "input_text": body.input_text,
                "output_text": body.output_text,
                "reported_cost_usd": _money(body.reported_cost_usd, "reported_cost_usd"),
            }
        case Cost():
            return {
                "amount": _money(body.amount, "amount"),
                "currency": body.currency,
                "category": body.category,
                "description": body.description,
            }
        case Drift():
            return {"metric": body.metric, "value": body.value, "category": body.category or ""}
        case Eval():
            return {
                "metric": body.metric,
                "score": body.score,
                "threshold": body.threshold,
                "dataset": body.dataset or "",
                "subject_event_id": body.subject_event_id or "",
            }
        case Decision():
            return {
                "subject_event_id": body.subject_event_id,
                "decision": body.decision,
                "reviewer_id": body.reviewer_id,
                "reason": body.reason,
            }


def audit_row(event: Event, origin: Origin, ingested_at: datetime) -> tuple[Any, ...]:
    """One ``vigil.audit_log`` row, in AUDIT_COLUMNS order. Raises InvalidEvent for an amount,
    a count or a measure its column (or the row's hash) cannot hold."""
    row = _DEFAULT_ROW.copy()
    row.update(
        event_id=event.event_id,
        kind=event.kind,
        ts=stored_ms(event.ts),
        tenant_id=event.tenant_id,
        environment=event.environment,
        agent_id=event.agent_id,
        trace_id=event.trace_id or "",
        span_id=event.span_id or "",
        session_id=event.session_id or "",
        unit_type=event.unit.type if event.unit else "",
        unit_id=event.unit.id if event.unit else "",
        actor_user_id=event.actor.user_id if event.actor else "",
        actor_role=(event.actor.role or "") if event.actor else "",
        attributes=dict(event.attributes),
        source_topic=origin.topic,
        source_partition=origin.partition,
        source_offset=origin.offset,
        ingested_at=stored_ms(ingested_at),
        redactions=[(r.field, r.type, r.count) for r in event.redactions],
    )
    if event.enrichment is not None:
        e = event.enrichment
        row.update(
            cost_usd=_money(e.cost_usd, "cost_usd"),
            cost_status=e.cost_status,
            price_version=e.price_version or "",
            owner=e.owner or "",
            team=e.team or "",
            agent_registered=int(e.registered),
        )
    else:
        row.update(cost_usd=None, agent_registered=0)
    row.update(_body_columns(event))
    _storable(row, event)
    return _IN_COLUMN_ORDER(row)  # type: ignore[no-any-return]


DLQ_COLUMNS = (
    "dlq_id",
    "stage",
    "reason_code",
    "reason",
    "origin_topic",
    "origin_partition",
    "origin_offset",
    "origin_key",
    "tenant_hint",
    "event_id_hint",
    "payload",
    "payload_bytes",
    "received_at",
    "stored_at",
)


def dlq_row(letter: Mapping[str, Any], stored_at: datetime) -> tuple[Any, ...]:
    """A decoded vigil.DeadLetter record -> one ``vigil.dlq`` row, in DLQ_COLUMNS order.

    The key is stored base64 so arbitrary bytes survive every output format.
    """
    key = letter.get("origin_key")
    return (
        letter["dlq_id"],
        letter["stage"],
        letter["reason_code"],
        letter["reason"],
        letter["origin_topic"],
        letter["origin_partition"],
        letter["origin_offset"],
        base64.b64encode(key).decode() if key else "",
        letter.get("tenant_hint") or "",
        letter.get("event_id_hint") or "",
        letter["payload"],
        len(letter["payload"]),
        letter["received_at"],
        stored_at,
    )
