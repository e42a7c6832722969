"""OTLP bodies -> views: both encodings give the same spans, and bad bodies name the field."""

from __future__ import annotations

import json
import math

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from pipeline.events import InvalidEvent
from pipeline.otel_mapping import CLAIMED_TENANT, log_to_event, span_to_event
from pipeline.otlp import (
    OtlpError,
    logs_from_json,
    logs_from_protobuf,
    response,
    spans_from_json,
    spans_from_protobuf,
)

TRACE, SPAN = 0x5B8EFFF798038103D269B633813FC60C, 0xEEE19B7EC3C1B174


def _protobuf() -> bytes:
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "agent-x"
    span = rs.scope_spans.add().spans.add(
        trace_id=TRACE.to_bytes(16, "big"), span_id=SPAN.to_bytes(8, "big"), name="chat",
        start_time_unix_nano=1_763_632_800_000_000_000, end_time_unix_nano=1_763_632_800_500_000_000,
    )  # fmt: skip
    span.status.code = 2
    span.attributes.add(key="gen_ai.provider.name").value.string_value = "openai"
    span.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = 42
    span.attributes.add(key="vigil.tenant_id").value.string_value = "globex"
    reasons = span.attributes.add(key="gen_ai.response.finish_reasons").value.array_value
    reasons.values.add().string_value = "stop"
    span.attributes.add(key="x.flag").value.bool_value = False
    span.attributes.add(key="x.bytes").value.bytes_value = b"\x00\xfb\xffhi"
    span.attributes.add(key="x.ratio").value.double_value = 0.25
    span.attributes.add(key="x.none")  # an AnyValue with nothing set
    return request.SerializeToString()


def _json() -> bytes:
    return json.dumps(
        {"resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "agent-x"}}]},
            "scopeSpans": [{"spans": [{
                "traceId": f"{TRACE:032x}", "spanId": f"{SPAN:016x}", "name": "chat",
                "startTimeUnixNano": "1763632800000000000", "endTimeUnixNano": 1763632800500000000,
                "status": {"code": 2},
                "attributes": [
                    {"key": "gen_ai.provider.name", "value": {"stringValue": "openai"}},
                    {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "42"}},
                    {"key": "vigil.tenant_id", "value": {"stringValue": "globex"}},
                    {"key": "gen_ai.response.finish_reasons",
                     "value": {"arrayValue": {"values": [{"stringValue": "stop"}]}}},
                    {"key": "x.flag", "value": {"boolValue": False}},
                    {"key": "x.bytes", "value": {"bytesValue": "APv_aGk"}},  # URL-safe, unpadded
                    {"key": "x.ratio", "value": {"doubleValue": 0.25}},
                    {"key": "x.none", "value": {"stringValue": None}},
                ],
            }]}],
        }]}
    ).encode()  # fmt: skip


def test_protobuf_and_json_decode_to_the_same_span_and_event() -> None:
    (a,) = spans_from_protobuf(_protobuf())
    (b,) = spans_from_json(_json())
    assert a == b
    assert (a.trace_id, a.span_id, a.is_error) == (TRACE, SPAN, True)
    extra = {k: v for k, v in a.attributes.items() if k.startswith("x.")}
    assert extra == {"x.flag": False, "x.bytes": "00fbff6869", "x.ratio": 0.25, "x.none": None}
    event = span_to_event(a, tenant_id="acme")
    assert event is not None and event.tenant_id == "acme"
    assert event.attributes[CLAIMED_TENANT] == "globex"
    assert event.trace_id == f"{TRACE:032x}" and event.agent_id == "agent-x"
    assert event.body.input_tokens == 42 and event.body.finish_reason == "stop"  # type: ignore[union-attr]
    assert event.body.latency_ms == 500.0  # type: ignore[union-attr]


def _attr_json(value: str) -> bytes:
    return (
        '{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "k", "value": '
        + value
        + "}]}]}]}]}"
    ).encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2]", "resourceSpans"),
        (b"{not json", "not JSON"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "abc"}]}]}]}', "traceId"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "k", '
            b'"value": {"intValue": "x"}}]}]}]}]}',
            "attributes[0].value.intValue",
        ),
        (b'{"resourceSpans": [{"scopeSpans": {"spans": []}}]}', "scopeSpans: expected a list"),
        # each of these raised ValueError, TypeError or AttributeError: a 500, not a 400
        (
            _attr_json('{"doubleValue": "x"}'),
            "value.doubleValue: expected a number, got a string of 1 char",
        ),
        (_attr_json('{"doubleValue": [1]}'), "value.doubleValue: expected a number, got list"),
        (_attr_json('{"arrayValue": "x"}'), "attributes[0].value.arrayValue: expected an object"),
        (_attr_json('{"arrayValue": {"values": 5}}'), "arrayValue.values: expected a list"),
        (_attr_json('{"kvlistValue": [1]}'), "attributes[0].value.kvlistValue: expected an obj"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"status": 2}]}]}]}',
            "resourceSpans[0].scopeSpans[0].spans[0].status: expected an object",
        ),
        (b'{"resourceSpans": [{"resource": [1]}]}', "resourceSpans[0].resource: expected an obj"),
        # a reader keeps one of a key given twice: the first request's spans were dropped
        (b'{"resourceSpans": [], "resourceSpans": []}', "'resourceSpans' is given twice"),
        (_attr_json('{"stringValue": "a", "stringValue": "b"}'), "'stringValue' is given twice"),
        # a value of two kinds was read as its first; a string "false" as true
        (_attr_json('{"stringValue": "a", "intValue": 1}'), "attributes[0].value: 2 kinds of v"),
        (
            _attr_json('{"boolValue": "false"}'),
            "value.boolValue: expected true or false, got a string of 5",
        ),
        (_attr_json('{"stringValue": 5}'), "value.stringValue: expected a string, got int"),
        (_attr_json('{"bytesValue": "not base64!"}'), "attributes[0].value.bytesValue: not base6"),
    ],
)
def test_bad_json_names_the_field(body: bytes, message: str) -> None:
    with pytest.raises(OtlpError, match=message.replace("[", r"\[").replace("]", r"\]")):
        spans_from_json(body)


@pytest.mark.parametrize(
    "value",
    [
        '{"intValue": "jane@example.com"}',
        '{"doubleValue": "jane@example.com"}',
        '{"boolValue": "jane@example.com"}',
        '{"stringValue": ["jane@example.com"]}',
    ],
)
def test_a_bad_value_is_named_by_its_type_not_echoed(value: str) -> None:
    """The 400's message names what is wrong and where, not the client's value, which may be
    anything (a reply may be logged on its way back)."""
    with pytest.raises(OtlpError, match=r"attributes\[0\]\.value\.\w+: expected") as caught:
        spans_from_json(_attr_json(value))
    assert "jane" not in str(caught.value)


def test_a_bad_id_or_time_is_named_by_its_type_not_echoed() -> None:
    spans = [{"traceId": "jane@example.com"}, {"startTimeUnixNano": "jane@example.com"}]
    for span, field in zip(spans, ("traceId", "startTimeUnixNano"), strict=True):
        body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()
        with pytest.raises(OtlpError, match=f"{field}: expected .* a string of 16 ch") as caught:
            spans_from_json(body)
        assert "jane" not in str(caught.value)


def test_a_key_given_twice_is_named_only_if_it_is_an_otlp_field() -> None:
    """A repeated key that is no field of OTLP's messages is the client's text, which may be
    anything (the gateway's reply carries the message)."""
    spans = b'{"spans": [{"name": "a"}, {"name": "b"}]}'
    (one, two) = spans_from_json(b'{"resourceSpans": [{"scopeSpans": [' + spans + b"]}]}")
    assert (one.name, two.name) == ("a", "b")
    with pytest.raises(OtlpError, match=r"^a key is given twice in one object$"):
        spans_from_json(b'{"resourceSpans": [], "jane@example.com": 1, "jane@example.com": 2}')
    with pytest.raises(OtlpError, match="'logRecords' is given twice"):
        logs_from_json(b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [], "logRecords": []}]}]}')


def test_bad_protobuf_is_refused() -> None:
    with pytest.raises(OtlpError, match="protobuf"):
        spans_from_protobuf(b"\x0a\xff\xff\xff")


def test_logs_carry_vigil_events_under_the_keys_tenant() -> None:
    request = ExportLogsServiceRequest()
    record = (
        request.resource_logs.add()
        .scope_logs.add()
        .log_records.add(event_name="vigil.event", time_unix_nano=1)
    )
    record.body.string_value = json.dumps({
        "event_id": "e-1", "kind": "decision", "ts": "2026-11-20T10:00:00Z", "tenant_id": "x",
        "agent_id": "bot", "subject_event_id": "e-0", "decision": "rejected", "reviewer_id": "r",
    })  # fmt: skip
    (view,) = logs_from_protobuf(request.SerializeToString())
    event = log_to_event(view, tenant_id="acme")
    assert (
        event is not None and event.tenant_id == "acme" and event.attributes[CLAIMED_TENANT] == "x"
    )
    (json_view,) = logs_from_json(
        json.dumps({"resourceLogs": [{"scopeLogs": [{"logRecords": [
            {"eventName": "vigil.event", "body": {"stringValue": "{oops"}}]}]}]}).encode()
    )  # fmt: skip
    with pytest.raises(InvalidEvent, match="not a JSON Vigil event"):
        log_to_event(json_view, tenant_id="acme")


def test_responses_carry_partial_success() -> None:
    reply = ExportTraceServiceResponse.FromString(response("traces", 3, "why", as_json=False))
    assert (reply.partial_success.rejected_spans, reply.partial_success.error_message) == (3, "why")
    assert json.loads(response("logs", 2, "m", as_json=True)) == {
        "partialSuccess": {"rejectedLogRecords": "2", "errorMessage": "m"}
    }
    assert response("traces", 0, "", as_json=True) == b"{}"


def test_deeply_nested_json_is_refused_not_crashed() -> None:
    deep = '{"kvlistValue": {"values": [{"key": "k", "value": ' * 3000
    deep += '{"stringValue": "x"}' + "}]}}" * 3000
    body = (
        '{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "a", "value": '
        + deep
        + "}]}]}]}]}"
    ).encode()
    with pytest.raises(OtlpError, match="nested too deeply"):
        spans_from_json(body)
    with pytest.raises(OtlpError, match="nested too deeply"):
        spans_from_json(b"[" * 100_000 + b"]" * 100_000)


def test_doubles_written_as_proto3_json_strings_are_read() -> None:
    (view,) = spans_from_json(_attr_json('{"doubleValue": "NaN"}'))
    assert math.isnan(view.attributes["k"])
    (view,) = spans_from_json(_attr_json('{"doubleValue": "2.5"}'))
    assert view.attributes["k"] == 2.5
