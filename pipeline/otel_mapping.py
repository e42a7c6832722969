"""OpenTelemetry GenAI span -> Vigil interaction event. Pure; shared by the exporter and the
OTLP gateway so there is one mapping, not two.

Both current and legacy GenAI semantic-convention names are accepted. Token accounting follows
the design: ``input_tokens`` counts all prompt tokens. Anthropic-style usage (cache reads and
writes reported apart from input) is summed on the way in: when the provider is anthropic,
when ``vigil.usage.style`` says ``separate``, or when the cache counts exceed the input count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from pipeline.events import Actor, Event, Interaction, InvalidEvent, Unit, event_from_json

AttrValue = object  # whatever an attribute holds: str, bool, int, float or a sequence of them


@dataclass(frozen=True)
class SpanView:
    """The parts of a span the mapping reads, whatever carried it (SDK span or OTLP proto)."""

    name: str
    trace_id: int
    span_id: int
    start_ns: int
    end_ns: int
    attributes: Mapping[str, AttrValue]
    resource: Mapping[str, AttrValue]
    is_error: bool = False
    status_message: str | None = None


@dataclass(frozen=True)
class LogView:
    """The parts of an OTLP log record the mapping reads."""

    event_name: str
    time_ns: int
    trace_id: int
    span_id: int
    attributes: Mapping[str, AttrValue]
    resource: Mapping[str, AttrValue]
    body: object = None


def _first(attrs: Mapping[str, AttrValue], *names: str) -> AttrValue | None:
    for name in names:
        value = attrs.get(name)
        if value is not None and value != "":
            return value
    return None


def _int(attrs: Mapping[str, AttrValue], *names: str) -> int:
    """A token count: 0 when absent. InvalidEvent when it is there and not a whole number (a
    count of 12.5, "12 tokens", a superscript digit, past the 4,300 digits Python reads): it
    was taken as 0, and the call costed as if it had used no tokens, without a word."""
    for name in names:
        value = attrs.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.lstrip("-").isdigit() and value.isascii():
            with suppress(ValueError):
                return int(value)
        raise InvalidEvent(
            "bad_type", f"{name}: {str(value)[:40]!r} is not a whole number of tokens"
        )
    return 0


def _time(ns: int, where: str) -> datetime:
    """A time given in nanoseconds since the epoch; InvalidEvent for one no date can hold."""
    try:
        return datetime.fromtimestamp(ns / 1e9, tz=UTC)
    except (OverflowError, ValueError, OSError):
        raise InvalidEvent("bad_timestamp", f"{where}: {ns} ns since 1970 is not a time") from None


def _reported(value: AttrValue | None) -> float | None:
    """``vigil.reported_cost_usd`` as a float (validation judges its range); None if absent.
    InvalidEvent for one that is not a number: a string was dropped, and the call left
    unpriced where the model was not in the catalog, without a word."""
    if value is None:
        return None
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer past a float's range
            raise InvalidEvent("out_of_range", "vigil.reported_cost_usd: too large") from None
        except ValueError:
            pass
    said = repr(str(value)[:40])
    raise InvalidEvent("bad_type", f"vigil.reported_cost_usd: {said} is not a number of USD")


def _str(attrs: Mapping[str, AttrValue], *names: str) -> str | None:
    value = _first(attrs, *names)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return json.dumps(list(value))
    return str(value)


_PROVIDER = ("gen_ai.provider.name", "gen_ai.system")
_MODEL = ("gen_ai.response.model", "gen_ai.request.model")
_INPUT = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
_OUTPUT = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
_CACHE_READ = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens")
_CACHE_WRITE = (
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.cache_creation_input_tokens",
)
_REASONING = ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens")
_INPUT_TEXT = ("gen_ai.input.messages", "gen_ai.prompt")
_OUTPUT_TEXT = ("gen_ai.output.messages", "gen_ai.completion")
_SEPARATE_USAGE_PROVIDERS = frozenset({"anthropic"})
_AGENT = ("gen_ai.agent.id", "vigil.agent_id", "gen_ai.agent.name")
_ENVIRONMENT = ("deployment.environment.name", "deployment.environment", "vigil.environment")

# attributes the mapping consumes; everything else is kept in ``attributes`` as strings
_CONSUMED = frozenset(
    {
        *_PROVIDER,
        *_MODEL,
        *_INPUT,
        *_OUTPUT,
        *_CACHE_READ,
        *_CACHE_WRITE,
        *_REASONING,
        *_INPUT_TEXT,
        *_OUTPUT_TEXT,
        *_AGENT,
        *_ENVIRONMENT,
        "gen_ai.operation.name",
        "gen_ai.response.finish_reasons",
        "gen_ai.tool.name",
        "gen_ai.conversation.id",
        "vigil.tenant_id",
        "vigil.unit.type",
        "vigil.unit.id",
        "vigil.event_id",
        "vigil.usage.style",
        "vigil.actor.role",
        "enduser.id",
        "user.id",
        "error.type",
        "vigil.reported_cost_usd",
    }
)


def _service(resource: Mapping[str, AttrValue]) -> str | None:
    # the SDK's placeholder when no service name was configured says nothing about the agent
    name = _str(resource, "service.name")
    return None if name is None or name.startswith("unknown_service") else name


def is_genai(span: SpanView) -> bool:
    """A span Vigil maps: it names a GenAI provider or operation."""
    return _first(span.attributes, *_PROVIDER, "gen_ai.operation.name") is not None


def span_to_event(
    span: SpanView,
    *,
    tenant_id: str | None = None,
    default_tenant: str | None = None,
    default_agent: str | None = None,
    environment: str | None = None,
) -> Event | None:
    """Map one span; None for spans that are not GenAI.

    ``tenant_id`` wins over any tenant the span claims (the gateway passes the API key's);
    ``default_*`` fill in what the span and its resource do not say. A missing tenant is left
    empty so validation rejects the event with its reason instead of guessing."""
    if not is_genai(span):
        return None
    attrs = span.attributes
    res = span.resource
    provider = _str(attrs, *_PROVIDER) or "unknown"
    input_tokens = _int(attrs, *_INPUT)
    cache_read = _int(attrs, *_CACHE_READ)
    cache_write = _int(attrs, *_CACHE_WRITE)
    separate = (
        _str(attrs, "vigil.usage.style") == "separate"
        or provider.lower() in _SEPARATE_USAGE_PROVIDERS
        or cache_read + cache_write > input_tokens
    )
    if separate:
        input_tokens += cache_read + cache_write
    finish = attrs.get("gen_ai.response.finish_reasons")
    if isinstance(finish, Sequence) and not isinstance(finish, str):
        finish = str(finish[0]) if finish else None
    error_type = _str(attrs, "error.type")
    is_error = span.is_error or error_type is not None
    unit_type, unit_id = _str(attrs, "vigil.unit.type"), _str(attrs, "vigil.unit.id")
    user = _str(attrs, "enduser.id", "user.id")
    reported = _first(attrs, "vigil.reported_cost_usd")
    ts = _time(span.start_ns, "startTimeUnixNano")
    _time(span.end_ns, "endTimeUnixNano")
    trace_hex, span_hex = f"{span.trace_id:032x}", f"{span.span_id:016x}"
    claimed = _str(attrs, "vigil.tenant_id") or _str(res, "vigil.tenant_id")
    extra = {CLAIMED_TENANT: claimed} if tenant_id and claimed and claimed != tenant_id else {}
    body = Interaction(
        provider=provider,
        model=_str(attrs, *_MODEL) or "unknown",
        operation=_str(attrs, "gen_ai.operation.name") or "chat",
        input_tokens=input_tokens,
        output_tokens=_int(attrs, *_OUTPUT),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=_int(attrs, *_REASONING),
        latency_ms=max(span.end_ns - span.start_ns, 0) / 1e6,
        status="error" if is_error else "ok",
        error_type=error_type or ("error" if is_error else None),
        finish_reason=finish if isinstance(finish, str) else None,
        tool_name=_str(attrs, "gen_ai.tool.name"),
        input_text=_str(attrs, *_INPUT_TEXT),
        output_text=_str(attrs, *_OUTPUT_TEXT),
        reported_cost_usd=_reported(reported),
    )
    return Event(
        event_id=_str(attrs, "vigil.event_id") or f"{trace_hex}-{span_hex}",
        kind="interaction",
        ts=ts,
        tenant_id=tenant_id
        or _str(attrs, "vigil.tenant_id")
        or _str(res, "vigil.tenant_id")
        or default_tenant
        or "",
        environment=environment or _str(attrs, *_ENVIRONMENT) or _str(res, *_ENVIRONMENT) or "prod",
        agent_id=_str(attrs, *_AGENT) or _service(res) or default_agent or "unknown",
        trace_id=trace_hex,
        span_id=span_hex,
        session_id=_str(attrs, "gen_ai.conversation.id"),
        unit=Unit(unit_type, unit_id) if unit_type and unit_id else None,
        actor=Actor(user, _str(attrs, "vigil.actor.role")) if user else None,
        attributes={k: _str(attrs, k) or "" for k in attrs if k not in _CONSUMED} | extra,
        body=body,
    )


CLAIMED_TENANT = "vigil.claimed_tenant"
GENAI_LOG_EVENT = "gen_ai.client.inference.operation.details"
VIGIL_LOG_EVENT = "vigil.event"


def log_to_event(log: LogView, *, tenant_id: str) -> Event | None:
    """Map one OTLP log event under ``tenant_id``; None for log records Vigil does not read.

    ``gen_ai.client.inference.operation.details`` events carry the same attributes as a GenAI
    span and map like one. ``vigil.event`` events carry a Vigil event (any kind) in their body,
    as a map or a JSON string, so agents in any language can send evaluations, costs and
    decisions. Raises InvalidEvent for a ``vigil.event`` whose body is not an event."""
    if log.event_name == GENAI_LOG_EVENT:
        view = SpanView(
            log.event_name, log.trace_id, log.span_id, log.time_ns, log.time_ns,
            log.attributes, log.resource,
        )  # fmt: skip
        event = span_to_event(view, tenant_id=tenant_id)
        if event is not None and not log.trace_id:  # no ids to derive a stable event_id from
            digest = hashlib.sha256(
                json.dumps([log.time_ns, sorted(map(str, log.attributes.items()))]).encode()
            ).hexdigest()
            event = replace(event, event_id=f"log-{digest[:32]}", trace_id=None, span_id=None)
        return event
    if log.event_name != VIGIL_LOG_EVENT:
        return None
    obj = log.body
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as exc:
            raise InvalidEvent("bad_json", f"body: not a JSON Vigil event ({exc})") from None
        except RecursionError:
            raise InvalidEvent("bad_json", "body: nested too deeply to be read") from None
    event = event_from_json(obj)
    if event.tenant_id != tenant_id:
        claimed = {CLAIMED_TENANT: event.tenant_id} if event.tenant_id else {}
        event = replace(event, tenant_id=tenant_id, attributes={**event.attributes, **claimed})
    return event
