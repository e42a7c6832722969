"""GenAI span -> interaction event, for current and legacy semantic-convention names, and the
exporter driven by a real OpenTelemetry TracerProvider."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.trace import Status, StatusCode

from connectors.otel import VigilSpanExporter
from pipeline.codec import UNENCODABLE_MARK
from pipeline.events import Event, Interaction, InvalidEvent, event_to_json
from pipeline.otel_mapping import LogView, SpanView, log_to_event, span_to_event

START = 1_795_000_000_000_000_000


def _view(attrs: dict[str, Any], **kw: Any) -> SpanView:
    return SpanView(
        name="chat",
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0xF067AA0BA902B7,
        start_ns=START,
        end_ns=START + 842_500_000,
        attributes=attrs,
        resource=kw.pop("resource", {}),
        **kw,
    )


CURRENT = {
    "gen_ai.provider.name": "openai",
    "gen_ai.request.model": "gpt-4o",
    "gen_ai.response.model": "gpt-4o-2024-08-06",
    "gen_ai.operation.name": "chat",
    "gen_ai.usage.input_tokens": 1200,
    "gen_ai.usage.output_tokens": 310,
    "gen_ai.usage.cache_read.input_tokens": 1024,
    "gen_ai.usage.reasoning.output_tokens": 64,
    "gen_ai.response.finish_reasons": ("stop",),
    "gen_ai.conversation.id": "conv-88",
    "gen_ai.agent.id": "support-bot",
    "vigil.tenant_id": "acme",
    "vigil.unit.type": "ticket",
    "vigil.unit.id": "T-123",
    "enduser.id": "u-42",
    "gen_ai.request.temperature": 0.2,
}

GOLDEN_CURRENT = {
    "event_id": "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    "kind": "interaction",
    "ts": datetime.fromtimestamp(START / 1e9, tz=UTC)
    .isoformat(timespec="milliseconds")
    .replace("+00:00", "Z"),
    "tenant_id": "acme",
    "environment": "prod",
    "agent_id": "support-bot",
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "span_id": "00f067aa0ba902b7",
    "session_id": "conv-88",
    "unit": {"type": "ticket", "id": "T-123"},
    "actor": {"user_id": "u-42", "role": None},
    "attributes": {"gen_ai.request.temperature": "0.2"},
    "redactions": [],
    "enrichment": None,
    "provider": "openai",
    "model": "gpt-4o-2024-08-06",
    "operation": "chat",
    "input_tokens": 1200,
    "output_tokens": 310,
    "cache_read_tokens": 1024,
    "cache_write_tokens": 0,
    "reasoning_tokens": 64,
    "latency_ms": 842.5,
    "status": "ok",
    "error_type": None,
    "finish_reason": "stop",
    "tool_name": None,
    "input_text": None,
    "output_text": None,
    "reported_cost_usd": None,
}


def test_current_names_map_to_the_golden_event() -> None:
    event = span_to_event(_view(CURRENT))
    assert event is not None
    assert event_to_json(event) == GOLDEN_CURRENT


def test_legacy_names_give_the_same_event() -> None:
    legacy = {
        "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.prompt_tokens": 1200,
        "gen_ai.usage.completion_tokens": 310,
        "gen_ai.usage.cache_read_input_tokens": 1024,
        "gen_ai.usage.reasoning_tokens": 64,
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.conversation.id": "conv-88",
        "gen_ai.agent.id": "support-bot",
        "vigil.tenant_id": "acme",
        "vigil.unit.type": "ticket",
        "vigil.unit.id": "T-123",
        "user.id": "u-42",
        "gen_ai.request.temperature": 0.2,
    }
    event = span_to_event(_view(legacy))
    assert event is not None and event_to_json(event) == GOLDEN_CURRENT


def test_anthropic_style_usage_is_summed_into_input_tokens() -> None:
    attrs = {
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-3-5-sonnet-20241022",
        "gen_ai.usage.input_tokens": 100,
        "gen_ai.usage.cache_read.input_tokens": 900,
        "gen_ai.usage.cache_creation.input_tokens": 50,
        "gen_ai.usage.output_tokens": 10,
        "vigil.tenant_id": "acme",
    }
    event = span_to_event(_view(attrs))
    assert isinstance(event.body, Interaction)  # type: ignore[union-attr]
    assert (
        event.body.input_tokens,
        event.body.cache_read_tokens,
        event.body.cache_write_tokens,
    ) == (1050, 900, 50)  # type: ignore[union-attr]


def test_non_genai_spans_are_not_mapped() -> None:
    assert span_to_event(_view({"http.method": "GET"})) is None


def test_error_status_and_tenant_precedence() -> None:
    event = span_to_event(_view({**CURRENT, "error.type": "rate_limit"}), tenant_id="from-key")
    assert event is not None and event.tenant_id == "from-key"
    assert event.body.status == "error" and event.body.error_type == "rate_limit"  # type: ignore[union-attr]
    no_tenant = {k: v for k, v in CURRENT.items() if k != "vigil.tenant_id"}
    assert span_to_event(_view(no_tenant)).tenant_id == ""  # type: ignore[union-attr]
    assert span_to_event(_view(no_tenant), default_tenant="dflt").tenant_id == "dflt"  # type: ignore[union-attr]
    from_resource = span_to_event(
        _view(no_tenant, resource={"vigil.tenant_id": "res"}), default_tenant="dflt"
    )
    assert from_resource.tenant_id == "res"  # type: ignore[union-attr]
    failed = span_to_event(_view(CURRENT, is_error=True))
    assert failed.body.status == "error" and failed.body.error_type == "error"  # type: ignore[union-attr]


def test_a_span_no_event_can_hold_is_invalid_not_a_crash() -> None:
    for start, end, where in [
        (10**30, 10**30, "startTimeUnixNano: 1000000000000000000000000000000 ns since 1970"),
        (START, 10**400, "endTimeUnixNano: "),  # OverflowError in latency_ms
    ]:
        with pytest.raises(InvalidEvent, match=where) as caught:
            span_to_event(replace(_view(CURRENT), start_ns=start, end_ns=end))
        assert caught.value.code == "bad_timestamp"
    with pytest.raises(InvalidEvent, match=r"vigil\.reported_cost_usd: too large") as caught:
        span_to_event(_view({**CURRENT, "vigil.reported_cost_usd": 10**400}))
    assert caught.value.code == "out_of_range"
    # a count that is not a whole number was taken as 0 (the call costed as if it used no
    # tokens); one int() did not read (a superscript digit, past 4,300 digits) was a ValueError
    for tokens in ("\u00b2", "9" * 5000, 12.5, "12 tokens", float("nan"), True, ["12"]):
        with pytest.raises(
            InvalidEvent, match=r"gen_ai\.usage\.input_tokens: .* is not a whole nu"
        ):
            span_to_event(_view({**CURRENT, "gen_ai.usage.input_tokens": tokens}))
    plain = {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}
    # a reported cost as a string was dropped: the call unpriced, where no catalog price held
    for cost, read in ((0.05, 0.05), ("0.05", 0.05), (1, 1.0)):
        event = span_to_event(_view({**plain, "vigil.reported_cost_usd": cost}))
        assert event is not None and event.body.reported_cost_usd == read  # type: ignore[union-attr]
    for cost in ("five cents", True, ["0.05"]):
        with pytest.raises(InvalidEvent, match=r"vigil\.reported_cost_usd: .* is not a number"):
            span_to_event(_view({**plain, "vigil.reported_cost_usd": cost}))
    for tokens, read in ((12, 12), (12.0, 12), ("12", 12), ("-3", -3)):  # -3: validation's
        event = span_to_event(_view({**plain, "gen_ai.usage.input_tokens": tokens}))
        assert event is not None and event.body.input_tokens == read  # type: ignore[union-attr]
    log = LogView("vigil.event", 0, 0, START, {}, {}, body="[" * 5000)
    with pytest.raises(InvalidEvent, match="body: nested too deeply"):
        log_to_event(log, tenant_id="acme")


class _Capture:
    """Stands in for the Emitter in this unit test only; the integration tests use Kafka."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.raw: list[tuple[bytes | None, bytes]] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def emit_raw(self, key: bytes | None, value: bytes) -> None:
        self.raw.append((key, value))

    def flush(self, timeout: float = 30) -> int:
        return 0


def test_exporter_maps_spans_from_a_real_tracer_provider() -> None:
    capture = _Capture()
    provider = TracerProvider(resource=Resource.create({"service.name": "billing-agent"}))
    exporter = VigilSpanExporter(capture, tenant_id="acme")  # type: ignore[arg-type]
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(
        "chat gpt-4o",
        attributes={
            "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.prompt_tokens": 7,
        },
    ) as span:
        span.set_status(Status(StatusCode.ERROR, "boom"))
        context = span.get_span_context()
    with tracer.start_as_current_span("GET /health"):
        pass
    provider.shutdown()
    assert len(capture.events) == 1
    event = capture.events[0]
    assert event.event_id == f"{context.trace_id:032x}-{context.span_id:016x}"
    assert (event.tenant_id, event.agent_id) == ("acme", "billing-agent")
    assert event.body.input_tokens == 7 and event.body.status == "error"  # type: ignore[union-attr]


def test_the_exporter_sends_a_span_no_event_holds_for_the_dlq_and_keeps_the_rest() -> None:
    # the mapping's error ended the export: the batch's good spans went with it
    capture = _Capture()
    exporter = VigilSpanExporter(capture, tenant_id="acme", agent_id="bot")  # type: ignore[arg-type]
    tracer = TracerProvider().get_tracer("test")  # its spans given to the exporter below
    good = {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}
    spans = []
    for cost in (0.5, 10**400, 0.25):
        span = tracer.start_span("chat", attributes={**good, "vigil.reported_cost_usd": cost})
        span.end()
        spans.append(span)
    assert exporter.export(spans) == SpanExportResult.SUCCESS  # type: ignore[arg-type]
    assert [e.body.reported_cost_usd for e in capture.events] == [0.5, 0.25]  # type: ignore[union-attr]
    [(key, value)] = capture.raw
    assert key == b"acme/bot" and value.startswith(UNENCODABLE_MARK)
    assert (
        "InvalidEvent: vigil.reported_cost_usd: too large" in json.loads(value)["vigil_unencodable"]
    )
