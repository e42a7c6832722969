"""OTLP/HTTP request bodies -> the views ``pipeline.otel_mapping`` maps. Pure.

Both encodings of the OTLP specification: protobuf (``application/x-protobuf``) and JSON
(``application/json``), where trace and span ids are hex strings, 64-bit integers may be
strings and field names are lowerCamelCase. Anything that does not decode raises OtlpError
with a message that says where.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from pipeline.otel_mapping import LogView, SpanView

STATUS_CODE_ERROR = 2


class OtlpError(ValueError):
    """The body is not an OTLP export request in the encoding it claims."""


# --- protobuf --------------------------------------------------------------------------


def _any(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def _attrs(kvs: Sequence[Any]) -> dict[str, Any]:
    return {kv.key: _any(kv.value) for kv in kvs}


def _id(raw: bytes, size: int, where: str) -> int:
    if raw and len(raw) != size:
        raise OtlpError(f"{where}: expected {size} bytes, got {len(raw)}")
    return int.from_bytes(raw, "big") if raw else 0


def spans_from_protobuf(body: bytes) -> list[SpanView]:
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except (DecodeError, ValueError) as exc:
        raise OtlpError(f"not an OTLP ExportTraceServiceRequest in protobuf ({exc})") from None
    views = []
    for r, rs in enumerate(request.resource_spans):
        resource = _attrs(rs.resource.attributes)
        for s, ss in enumerate(rs.scope_spans):
            for i, span in enumerate(ss.spans):
                where = f"resourceSpans[{r}].scopeSpans[{s}].spans[{i}]"
                views.append(
                    SpanView(
                        name=span.name,
                        trace_id=_id(span.trace_id, 16, f"{where}.traceId"),
                        span_id=_id(span.span_id, 8, f"{where}.spanId"),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attrs(span.attributes),
                        resource=resource,
                        is_error=span.status.code == STATUS_CODE_ERROR,
                        status_message=span.status.message or None,
                    )
                )
    return views


def logs_from_protobuf(body: bytes) -> list[LogView]:
    try:
        request = ExportLogsServiceRequest.FromString(body)
    except (DecodeError, ValueError) as exc:
        raise OtlpError(f"not an OTLP ExportLogsServiceRequest in protobuf ({exc})") from None
    views = []
    for r, rl in enumerate(request.resource_logs):
        resource = _attrs(rl.resource.attributes)
        for s, sl in enumerate(rl.scope_logs):
            for i, record in enumerate(sl.log_records):
                where = f"resourceLogs[{r}].scopeLogs[{s}].logRecords[{i}]"
                attributes = _attrs(record.attributes)
                views.append(
                    LogView(
                        event_name=record.event_name or str(attributes.get("event.name", "")),
                        time_ns=record.time_unix_nano or record.observed_time_unix_nano,
                        trace_id=_id(record.trace_id, 16, f"{where}.traceId"),
                        span_id=_id(record.span_id, 8, f"{where}.spanId"),
                        attributes=attributes,
                        resource=resource,
                        body=_any(record.body) if record.HasField("body") else None,
                    )
                )
    return views


# --- JSON ------------------------------------------------------------------------------


def _json_any(value: Any, where: str) -> Any:
    if not isinstance(value, Mapping) or not value:
        return None
    (kind, inner), *_ = value.items()
    if kind == "stringValue":
        return str(inner)
    if kind == "boolValue":
        return bool(inner)
    if kind == "intValue":
        try:
            return int(inner)
        except (TypeError, ValueError):
            raise OtlpError(f"{where}.intValue: {inner!r} is not an integer") from None
    if kind == "doubleValue":
        return float(inner)
    if kind == "arrayValue":
        return [_json_any(v, f"{where}[]") for v in (inner or {}).get("values", [])]
    if kind == "kvlistValue":
        return _json_attrs((inner or {}).get("values", []), where)
    if kind == "bytesValue":
        return str(inner)
    raise OtlpError(f"{where}: unknown AnyValue field {kind!r}")


def _json_attrs(kvs: Any, where: str) -> dict[str, Any]:
    if not isinstance(kvs, list):
        raise OtlpError(f"{where}.attributes: expected a list of key/value objects")
    out = {}
    for i, kv in enumerate(kvs):
        if not isinstance(kv, Mapping) or not isinstance(kv.get("key"), str):
            raise OtlpError(f"{where}.attributes[{i}]: expected {{key, value}}")
        out[kv["key"]] = _json_any(kv.get("value"), f"{where}.attributes[{i}].value")
    return out


def _json_id(value: Any, size: int, where: str) -> int:
    if value in (None, ""):
        return 0
    try:
        raw = bytes.fromhex(str(value))
    except ValueError:
        raise OtlpError(f"{where}: {value!r} is not hex (OTLP/JSON ids are hex strings)") from None
    if len(raw) != size:
        raise OtlpError(f"{where}: expected {size * 2} hex digits, got {len(str(value))}")
    return int.from_bytes(raw, "big")


def _json_int(value: Any, where: str) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        raise OtlpError(f"{where}: {value!r} is not an integer") from None


def _json_body(body: bytes, top: str) -> list[Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OtlpError(f"not JSON ({exc})") from None
    except RecursionError:
        raise OtlpError("the JSON is nested too deeply to be an OTLP request") from None
    if not isinstance(data, Mapping) or not isinstance(data.get(top, []), list):
        raise OtlpError(f"expected an object with a {top!r} list")
    return list(data.get(top, []))


def _list(obj: Any, key: str, where: str) -> list[Any]:
    value = obj.get(key, []) if isinstance(obj, Mapping) else None
    if not isinstance(value, list):
        raise OtlpError(f"{where}.{key}: expected a list")
    return value


def spans_from_json(body: bytes) -> list[SpanView]:
    try:
        return _spans_from_json(body)
    except RecursionError:
        raise OtlpError("attributes are nested too deeply") from None


def _spans_from_json(body: bytes) -> list[SpanView]:
    views = []
    for r, rs in enumerate(_json_body(body, "resourceSpans")):
        where_r = f"resourceSpans[{r}]"
        resource = _json_attrs((rs.get("resource") or {}).get("attributes", []), where_r)
        for s, ss in enumerate(_list(rs, "scopeSpans", where_r)):
            for i, span in enumerate(_list(ss, "spans", f"{where_r}.scopeSpans[{s}]")):
                where = f"{where_r}.scopeSpans[{s}].spans[{i}]"
                if not isinstance(span, Mapping):
                    raise OtlpError(f"{where}: expected an object")
                status = span.get("status") or {}
                views.append(
                    SpanView(
                        name=str(span.get("name", "")),
                        trace_id=_json_id(span.get("traceId"), 16, f"{where}.traceId"),
                        span_id=_json_id(span.get("spanId"), 8, f"{where}.spanId"),
                        start_ns=_json_int(span.get("startTimeUnixNano"), f"{where}.start"),
                        end_ns=_json_int(span.get("endTimeUnixNano"), f"{where}.end"),
                        attributes=_json_attrs(span.get("attributes", []), where),
                        resource=resource,
                        is_error=status.get("code") in (STATUS_CODE_ERROR, "STATUS_CODE_ERROR"),
                        status_message=status.get("message") or None,
                    )
                )  # fmt: skip
    return views


def logs_from_json(body: bytes) -> list[LogView]:
    try:
        return _logs_from_json(body)
    except RecursionError:
        raise OtlpError("attributes or body are nested too deeply") from None


def _logs_from_json(body: bytes) -> list[LogView]:
    views = []
    for r, rl in enumerate(_json_body(body, "resourceLogs")):
        where_r = f"resourceLogs[{r}]"
        resource = _json_attrs((rl.get("resource") or {}).get("attributes", []), where_r)
        for s, sl in enumerate(_list(rl, "scopeLogs", where_r)):
            for i, rec in enumerate(_list(sl, "logRecords", f"{where_r}.scopeLogs[{s}]")):
                where = f"{where_r}.scopeLogs[{s}].logRecords[{i}]"
                if not isinstance(rec, Mapping):
                    raise OtlpError(f"{where}: expected an object")
                attributes = _json_attrs(rec.get("attributes", []), where)
                time_ns = rec.get("timeUnixNano") or rec.get("observedTimeUnixNano")
                views.append(
                    LogView(
                        event_name=str(rec.get("eventName") or attributes.get("event.name", "")),
                        time_ns=_json_int(time_ns, f"{where}.timeUnixNano"),
                        trace_id=_json_id(rec.get("traceId"), 16, f"{where}.traceId"),
                        span_id=_json_id(rec.get("spanId"), 8, f"{where}.spanId"),
                        attributes=attributes,
                        resource=resource,
                        body=_json_any(rec.get("body"), f"{where}.body"),
                    )
                )
    return views


# --- responses -------------------------------------------------------------------------


def response(signal: str, rejected: int, message: str, *, as_json: bool) -> bytes:
    """The Export*ServiceResponse for ``signal`` (traces or logs), with partial_success
    when something was rejected, in the request's encoding."""
    count_field = "rejected_spans" if signal == "traces" else "rejected_log_records"
    if as_json:
        if not rejected:
            return b"{}"
        camel = "rejectedSpans" if signal == "traces" else "rejectedLogRecords"
        return json.dumps(
            {"partialSuccess": {camel: str(rejected), "errorMessage": message}}
        ).encode()
    reply = ExportTraceServiceResponse() if signal == "traces" else ExportLogsServiceResponse()
    if rejected:
        setattr(reply.partial_success, count_field, rejected)
        reply.partial_success.error_message = message
    return bytes(reply.SerializeToString())
