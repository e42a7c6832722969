"""The event model: the contract between emitters and the pipeline.

Events are frozen dataclasses. Their JSON form (CLI, examples, tests) is one flat object:
envelope fields plus the kind's fields, timestamps as RFC 3339 UTC strings. Their Avro form
nests the kind's fields under ``body`` (see ``schemas/avro/vigil.Event.avsc``).

Content fields (prompts, outputs, reasons) are left out of reprs so they never reach logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import types
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar, cast


class InvalidEvent(ValueError):
    """An input that cannot become a valid event. ``code`` is stable and machine-readable
    (it is the DLQ ``reason_code``); the message says what is wrong and where."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Unit:
    type: str
    id: str


@dataclass(frozen=True, slots=True)
class Actor:
    user_id: str
    role: str | None = None


@dataclass(frozen=True, slots=True)
class Redaction:
    """What the redact stage found in one field: type and count, never the value."""

    field: str
    type: str
    count: int


@dataclass(frozen=True, slots=True)
class Enrichment:
    """What the enrich stage adds: the cost (exact decimal text, or None with the reason in
    ``cost_status``), the catalog version it was priced with, and the agent's owner and team."""

    cost_status: str
    cost_usd: str | None = None
    price_version: str | None = None
    owner: str | None = None
    team: str | None = None
    registered: bool = False


@dataclass(frozen=True, slots=True)
class Interaction:
    provider: str
    model: str
    operation: str = "chat"
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    latency_ms: float | None = None
    status: str = "ok"
    error_type: str | None = None
    finish_reason: str | None = None
    tool_name: str | None = None
    input_text: str | None = field(default=None, repr=False)
    output_text: str | None = field(default=None, repr=False)
    reported_cost_usd: float | None = None


@dataclass(frozen=True, slots=True)
class Cost:
    amount: float
    currency: str = "USD"
    category: str = "other"
    description: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Drift:
    metric: str
    value: float | None = None
    category: str | None = None


@dataclass(frozen=True, slots=True)
class Eval:
    metric: str
    score: float
    threshold: float | None = None
    dataset: str | None = None
    subject_event_id: str | None = None


DECISIONS = ("approved", "rejected", "corrected", "escalated", "held")


@dataclass(frozen=True, slots=True)
class Decision:
    subject_event_id: str
    decision: str
    reviewer_id: str
    reason: str | None = field(default=None, repr=False)


Body = Interaction | Cost | Drift | Eval | Decision
BODY_TYPES: dict[str, type[Body]] = {
    "interaction": Interaction,
    "cost": Cost,
    "drift": Drift,
    "eval": Eval,
    "decision": Decision,
}
KINDS = tuple(BODY_TYPES)
_AVRO_NAME = {kind: f"vigil.{cls.__name__}" for kind, cls in BODY_TYPES.items()}
_KIND_OF_AVRO_NAME = {name: kind for kind, name in _AVRO_NAME.items()}


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    kind: str
    ts: datetime
    tenant_id: str
    agent_id: str
    body: Body
    environment: str = "prod"
    trace_id: str | None = None
    span_id: str | None = None
    session_id: str | None = None
    unit: Unit | None = None
    actor: Actor | None = None
    attributes: Mapping[str, str] = field(default_factory=dict, repr=False)
    redactions: tuple[Redaction, ...] = ()
    enrichment: Enrichment | None = None


_ENVELOPE_OPTIONAL = ("environment", "trace_id", "span_id", "session_id")


# --- JSON form -------------------------------------------------------------------------


# epoch seconds from 2001 to 5138: as milliseconds, a time in January 1970 to March 1973, which
# no agent sends; as seconds, what a client that forgot the unit sends. A smaller number is no
# event's time in either unit
_EPOCH_SECONDS = (1e9, 1e11)


def parse_ts(value: Any, where: str = "ts") -> datetime:
    """RFC 3339 string (or epoch milliseconds) -> aware UTC datetime."""
    if isinstance(value, bool):
        raise InvalidEvent("bad_type", f"{where}: expected an RFC 3339 timestamp, got a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidEvent("bad_timestamp", f"{where}: timestamp is not a finite number")
        if _EPOCH_SECONDS[0] <= value < _EPOCH_SECONDS[1]:
            raise InvalidEvent(
                "bad_timestamp",
                f"{where}: {value!r} looks like epoch seconds; a number is read as epoch "
                "milliseconds (or send RFC 3339)",
            )
        if value < _EPOCH_SECONDS[0]:  # a count or a clock's reading, not a time: name it
            raise InvalidEvent(
                "bad_timestamp",
                f"{where}: {value!r} as epoch milliseconds is before 1970-01-12, no event's "
                "time; a number is read as epoch milliseconds (or send RFC 3339)",
            )
        try:
            return datetime.fromtimestamp(value / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise InvalidEvent("bad_timestamp", f"{where}: {value!r} is out of range") from exc
    if not isinstance(value, str):
        raise InvalidEvent("bad_type", f"{where}: expected an RFC 3339 timestamp string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise InvalidEvent("bad_timestamp", f"{where}: {value[:40]!r} is not RFC 3339") from exc
    if parsed.tzinfo is None:
        raise InvalidEvent("bad_timestamp", f"{where}: timestamp has no UTC offset")
    return parsed.astimezone(UTC)


def format_ts(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _coerce(value: Any, hint: str, where: str) -> Any:
    """Check one JSON value against a field's annotation; ints are accepted for floats."""
    optional = hint.endswith("| None")
    base = hint.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise InvalidEvent("missing_field", f"{where}: required field is missing or null")
    if base == "str" and isinstance(value, str):
        return value
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # a JSON integer of 309 digits or more
            raise InvalidEvent("out_of_range", f"{where}: too large for a number") from None
    raise InvalidEvent("bad_type", f"{where}: expected {base}, got {type(value).__name__}")


def _build(cls: type[Any], obj: Mapping[str, Any], prefix: str = "") -> Any:
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in obj and obj[f.name] is not None:
            kwargs[f.name] = _coerce(obj[f.name], hints[f.name], f"{prefix}{f.name}")
        elif f.default is dataclasses.MISSING:
            raise InvalidEvent("missing_field", f"{prefix}{f.name}: required field is missing")
    return cls(**kwargs)


def json_line(line: str) -> Any:
    """One line of a JSON-lines input, read as the command line's readers read it (their text
    decoded with ``surrogateescape``). Raises InvalidEvent: ``bad_utf8`` for bytes that are not
    UTF-8, ``bad_json`` for what is not JSON, is nested deeper than it can be read, or gives a
    key twice in one object (JSON readers keep one of them: an event naming two tenants would
    have been stored as the second's, and ``vigil redact`` would have written one back)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:  # an undecodable byte, kept as a lone surrogate
        raise InvalidEvent("bad_utf8", f"not UTF-8 (at character {exc.start})") from None
    try:
        return json.loads(line, object_pairs_hook=_object_once)
    except json.JSONDecodeError as exc:
        raise InvalidEvent("bad_json", str(exc)) from None
    except RecursionError:
        raise InvalidEvent("bad_json", "nested too deeply to be read") from None


def object_once_hook(
    named: Collection[str], error: Callable[[str], Exception]
) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """An ``object_pairs_hook`` for ``json.loads`` that makes each object a dict and raises
    ``error(message)`` for a key given twice in one, which a JSON reader keeps one of. The key
    is named if it is one of ``named``: any other may be a value to keep out of messages (the
    worker redacts attribute keys)."""

    def object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    shown = repr(key) if key in named else "a key"
                    raise error(f"{shown} is given twice in one object")
                seen.add(key)
        return obj

    return object_once


_FIELD_NAMES = frozenset(
    f.name
    for cls in (Event, Unit, Actor, Redaction, Enrichment, *BODY_TYPES.values())
    for f in dataclasses.fields(cls)
)


# an event's field is named; an attribute's key is not
_object_once = object_once_hook(_FIELD_NAMES, partial(InvalidEvent, "bad_json"))


def event_from_json(obj: Any) -> Event:
    """JSON form (a dict) -> Event. Raises InvalidEvent naming the offending field."""
    if not isinstance(obj, Mapping):
        raise InvalidEvent("bad_type", "event: expected a JSON object")
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in BODY_TYPES:  # a list or an object: unhashable
        raise InvalidEvent("unknown_kind", f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    for name in ("event_id", "tenant_id", "agent_id"):
        if not isinstance(obj.get(name), str) or not obj[name]:
            code = "missing_tenant" if name == "tenant_id" else "missing_field"
            raise InvalidEvent(code, f"{name}: required non-empty string is missing")
    if "ts" not in obj:
        raise InvalidEvent("missing_field", "ts: required field is missing")
    attributes = obj.get("attributes") or {}
    if not isinstance(attributes, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise InvalidEvent("bad_type", "attributes: expected an object of string to string")
    # an object each, or absent: a unit given as "T-123" was dropped, and its cost with it
    unit, actor, enrichment = (
        _object_or_none(obj, name) for name in ("unit", "actor", "enrichment")
    )
    optional = {
        name: _coerce(obj.get(name), "str | None", name)
        for name in _ENVELOPE_OPTIONAL
        if obj.get(name) is not None
    }
    return Event(
        event_id=obj["event_id"],
        kind=kind,
        ts=parse_ts(obj["ts"]),
        tenant_id=obj["tenant_id"],
        agent_id=obj["agent_id"],
        body=_build(BODY_TYPES[kind], obj),
        unit=_build(Unit, unit, "unit.") if unit is not None else None,
        actor=_build(Actor, actor, "actor.") if actor is not None else None,
        attributes=dict(attributes),
        redactions=_redactions_from_json(obj.get("redactions")),
        enrichment=_build(Enrichment, enrichment, "enrichment.")
        if enrichment is not None
        else None,
        **optional,
    )


def _redactions_from_json(value: Any) -> tuple[Redaction, ...]:
    if not value:
        return ()
    if not isinstance(value, list):
        raise InvalidEvent("bad_type", "redactions: expected a list")
    for i, r in enumerate(value):
        if not isinstance(r, Mapping):
            raise InvalidEvent("bad_type", f"redactions[{i}]: expected an object")
    return tuple(_build(Redaction, r, f"redactions[{i}].") for i, r in enumerate(value))


def _object_or_none(obj: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    value = obj.get(name)
    if value is None or isinstance(value, Mapping):
        return value
    raise InvalidEvent("bad_type", f"{name}: expected an object, got {type(value).__name__}")


def _fields(obj: Any) -> dict[str, Any]:
    """A flat dataclass -> its fields as a dict. ``dataclasses.asdict`` deep-copies every value
    and cost a third of the validate stage; the values here are all immutable scalars."""
    return {name: getattr(obj, name) for name in obj.__slots__}


def _envelope(event: Event) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "kind": event.kind,
        "ts": event.ts,
        "tenant_id": event.tenant_id,
        "environment": event.environment,
        "agent_id": event.agent_id,
        "trace_id": event.trace_id,
        "span_id": event.span_id,
        "session_id": event.session_id,
        "unit": _fields(event.unit) if event.unit else None,
        "actor": _fields(event.actor) if event.actor else None,
        "attributes": dict(event.attributes),
        "redactions": [_fields(r) for r in event.redactions],
        "enrichment": _fields(event.enrichment) if event.enrichment else None,
    }


def event_to_json(event: Event) -> dict[str, Any]:
    """Event -> flat JSON form (the inverse of event_from_json)."""
    out = _envelope(event)
    out["ts"] = format_ts(event.ts)
    out.update(_fields(event.body))
    return out


# --- Avro form -------------------------------------------------------------------------


def event_to_avro(event: Event) -> dict[str, Any]:
    """Event -> the dict fastavro writes with the vigil.Event schema.

    Every record inside a union is given as (its Avro name, its fields): fastavro then writes
    the branch named, where a plain dict had it test the value against each branch (an enriched
    event took 15.5 µs to encode that way, 11.5 µs this way; the bytes are the same)."""
    out = _envelope(event)
    for name, part in (("unit", event.unit), ("actor", event.actor),
                       ("enrichment", event.enrichment), ("body", event.body)):  # fmt: skip
        if part is not None:
            out[name] = (f"vigil.{type(part).__name__}", _fields(part))
    return out


def enrichment_to_avro(enrichment: Enrichment) -> dict[str, Any]:
    """Enrichment -> the dict fastavro writes with the vigil.Enrichment schema."""
    return _fields(enrichment)


_Frozen = TypeVar("_Frozen")


def filled(cls: type[_Frozen]) -> Callable[..., _Frozen]:
    """A maker of ``cls``, a frozen slotted dataclass, from every one of its fields, in order
    or by name: the object ``cls(...)`` makes, each slot set through its own descriptor. A
    frozen class's ``__init__`` sets each field with a call of ``object.__setattr__``: reading
    an enriched event, which builds up to five such objects, took 16.7 µs that way and 14.2
    this way (docs/benchmarks.md). For callers that give every field (the Avro reader,
    ``event_of``, ``enriched``): the object is as frozen as any other, and a field left out is
    a TypeError, not its default. Raises TypeError for a class that is not a frozen slotted
    dataclass."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__name__} is not a frozen dataclass")
    names = [f.name for f in dataclasses.fields(cast(Any, cls))]
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    lines = [f"def make({', '.join(names)}):", "    made = _new(_cls)"]
    for i, name in enumerate(names):
        slot = cls.__dict__.get(name)
        if not isinstance(slot, types.MemberDescriptorType):
            raise TypeError(f"{cls.__name__}.{name} is not a slot")
        scope[f"_set{i}"] = slot.__set__
        lines.append(f"    _set{i}(made, {name})")
    lines.append("    return made")
    exec("\n".join(lines), scope)
    make: Callable[..., _Frozen] = scope["make"]
    make.__name__ = make.__qualname__ = f"filled_{cls.__name__}"
    return make


_filled_event = filled(Event)

_BESIDES_ENRICHMENT = tuple(name for name in Event.__slots__ if name != "enrichment")
# Event's fields but the enrichment, in the order its constructor takes them: the enrichment is
# its last field (were it not, ``enriched`` would give it twice, and raise TypeError)
_ALL_BUT_ENRICHMENT = operator.attrgetter(*_BESIDES_ENRICHMENT)


def enriched(event: Event, enrichment: Enrichment) -> Event:
    """``event`` with ``enrichment`` set, every other field the very same object: what
    ``dataclasses.replace(event, enrichment=enrichment)`` gives, which looks every field's
    definition up again on each call and took twice as long."""
    return _filled_event(*_ALL_BUT_ENRICHMENT(event), enrichment=enrichment)


def only_enrichment_added(before: Event, after: Event) -> bool:
    """Whether ``after`` is ``before``, which had no enrichment, with every field but the
    enrichment the very same object (as ``dataclasses.replace`` leaves them)."""
    return before.enrichment is None and all(
        map(operator.is_, _ALL_BUT_ENRICHMENT(before), _ALL_BUT_ENRICHMENT(after))
    )


def event_from_avro(record: Mapping[str, Any]) -> Event:
    """A record read by fastavro (``return_record_name=True``) -> Event.

    Raises InvalidEvent when the envelope ``kind`` and the body disagree.
    """
    body_name, body = record["body"]
    body_kind = _KIND_OF_AVRO_NAME.get(body_name)
    if record["kind"] not in BODY_TYPES:
        raise InvalidEvent(
            "unknown_kind", f"kind: {record['kind']!r} is not one of {', '.join(KINDS)}"
        )
    if body_kind is None:
        raise InvalidEvent(
            "kind_mismatch", f"kind: envelope says {record['kind']!r} but body is {body_name}"
        )
    unit = record.get("unit")
    actor = record.get("actor")
    enrichment = record.get("enrichment")
    return event_of(
        event_id=record["event_id"],
        kind=record["kind"],
        ts=record["ts"],
        tenant_id=record["tenant_id"],
        environment=record["environment"],
        agent_id=record["agent_id"],
        trace_id=record.get("trace_id"),
        span_id=record.get("span_id"),
        session_id=record.get("session_id"),
        unit=Unit(**unit) if unit else None,
        actor=Actor(**actor) if actor else None,
        attributes=record.get("attributes"),
        body=BODY_TYPES[body_kind](**body),
        redactions=[Redaction(**r) for r in record.get("redactions") or ()],
        enrichment=Enrichment(**enrichment) if enrichment else None,
    )


def event_of(
    event_id: str,
    kind: str,
    ts: datetime,
    tenant_id: str,
    environment: str,
    agent_id: str,
    trace_id: str | None,
    span_id: str | None,
    session_id: str | None,
    unit: Unit | None,
    actor: Actor | None,
    attributes: Mapping[str, str] | None,
    body: Body,
    redactions: list[Redaction] | tuple[Redaction, ...] | None,
    enrichment: Enrichment | None,
) -> Event:
    """The fields of a vigil.Event record, its unit, actor, body, redactions and enrichment
    already built -> Event. Raises InvalidEvent when the envelope ``kind`` and the body
    disagree."""
    if kind not in BODY_TYPES:
        raise InvalidEvent("unknown_kind", f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if type(body) is not BODY_TYPES[kind]:
        raise InvalidEvent(
            "kind_mismatch", f"kind: envelope says {kind!r} but body is vigil.{type(body).__name__}"
        )
    return _filled_event(
        event_id=event_id,
        kind=kind,
        ts=ts if ts.tzinfo else ts.replace(tzinfo=UTC),
        tenant_id=tenant_id,
        environment=environment,
        agent_id=agent_id,
        trace_id=trace_id,
        span_id=span_id,
        session_id=session_id,
        unit=unit,
        actor=actor,
        attributes=attributes or {},
        body=body,
        redactions=tuple(redactions or ()),
        enrichment=enrichment,
    )


# the class each record of vigil.Event is built as, by its Avro name (``pipeline.avrowrite``)
AVRO_CLASSES: dict[str, Callable[..., Any]] = {
    "vigil.Event": event_of,
    **{f"vigil.{cls.__name__}": cls for cls in (Unit, Actor, Redaction, Enrichment)},
    **{_AVRO_NAME[kind]: cls for kind, cls in BODY_TYPES.items()},
}
# what the reader builds them with, given every field (``pipeline.avroread``)
AVRO_MAKERS: dict[str, Callable[..., Any]] = {
    name: filled(c) if isinstance(c, type) else c for name, c in AVRO_CLASSES.items()
}


__all__ = [
    "AVRO_CLASSES",
    "AVRO_MAKERS",
    "BODY_TYPES",
    "DECISIONS",
    "KINDS",
    "Actor",
    "Body",
    "Cost",
    "Decision",
    "Drift",
    "Enrichment",
    "Eval",
    "Event",
    "Interaction",
    "InvalidEvent",
    "Redaction",
    "Unit",
    "enriched",
    "enrichment_to_avro",
    "event_from_avro",
    "event_from_json",
    "event_of",
    "event_to_avro",
    "event_to_json",
    "filled",
    "format_ts",
    "only_enrichment_added",
    "parse_ts",
]
