"""OTLP request bodies (OTLP/HTTP's; OTLP/gRPC's are its protobuf) -> the views
``pipeline.otel_mapping`` maps. Pure.

Both encodings of the OTLP specification: protobuf (``application/x-protobuf``) and JSON
(``application/json``), where trace and span ids are hex strings, 64-bit integers may be
strings and field names are lowerCamelCase. Anything that does not decode raises OtlpError
with a message that says where.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor
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

from pipeline.events import object_once_hook
from pipeline.otel_mapping import LogView, SpanView

STATUS_CODE_ERROR = 2
_View = TypeVar("_View", SpanView, LogView)


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


# (request field, scope field, item field) and their OTLP/JSON names, per signal
_SPANS = (("resource_spans", "scope_spans", "spans"), ("resourceSpans", "scopeSpans", "spans"))
_LOGS = (("resource_logs", "scope_logs", "log_records"),
         ("resourceLogs", "scopeLogs", "logRecords"))  # fmt: skip


def _proto_items(
    request: Any, fields: tuple[tuple[str, str, str], tuple[str, str, str]]
) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(where, resource attributes, item) for every span or log record of a request."""
    (top, scopes, items), (top_j, scopes_j, items_j) = fields
    for r, res in enumerate(getattr(request, top)):
        resource = _attrs(res.resource.attributes)
        for s, scope in enumerate(getattr(res, scopes)):
            for i, item in enumerate(getattr(scope, items)):
                yield f"{top_j}[{r}].{scopes_j}[{s}].{items_j}[{i}]", resource, item


def _parse(message: Any, body: bytes) -> Any:
    try:
        return message.FromString(body)
    except (DecodeError, ValueError) as exc:
        raise OtlpError(f"not an OTLP {message.__name__} in protobuf ({exc})") from None


def spans_from_protobuf(body: bytes) -> list[SpanView]:
    return [
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
        for where, resource, span in _proto_items(_parse(ExportTraceServiceRequest, body), _SPANS)
    ]


def logs_from_protobuf(body: bytes) -> list[LogView]:
    views = []
    for where, resource, record in _proto_items(_parse(ExportLogsServiceRequest, body), _LOGS):
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
    if len(value) > 1:  # protobuf's reader refuses a oneof set twice: which one was meant?
        raise OtlpError(f"{where}: {len(value)} kinds of value given; an AnyValue holds one")
    ((kind, inner),) = value.items()
    if inner is None and kind in _SCALARS:  # null: the field's default, so no value is set
        return None
    if kind == "stringValue":
        if not isinstance(inner, str):
            raise OtlpError(f"{where}.stringValue: expected a string, got {_kind(inner)}")
        return inner
    if kind == "boolValue":
        if not isinstance(inner, bool):  # bool("false") is True
            raise OtlpError(f"{where}.boolValue: expected true or false, got {_kind(inner)}")
        return inner
    if kind == "intValue":
        try:
            return int(inner)
        except (TypeError, ValueError):
            raise OtlpError(f"{where}.intValue: expected an integer, got {_kind(inner)}") from None
    if kind == "doubleValue":
        try:  # a number, or a string of one ("NaN" and "Infinity" too), as proto3 JSON writes
            return float(inner)
        except (TypeError, ValueError):
            raise OtlpError(f"{where}.doubleValue: expected a number, got {_kind(inner)}") from None
    if kind == "arrayValue":
        values = _values(inner, f"{where}.arrayValue")
        if not isinstance(values, list):
            raise OtlpError(f"{where}.arrayValue.values: expected a list")
        return [_json_any(v, f"{where}[]") for v in values]
    if kind == "kvlistValue":
        return _json_attrs(_values(inner, f"{where}.kvlistValue"), where)
    if kind == "bytesValue":  # base64 in JSON (either alphabet, padded or not); hex, as protobuf's
        try:
            text = str(inner).replace("-", "+").replace("_", "/")
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True).hex()
        except ValueError:  # binascii.Error is one
            raise OtlpError(f"{where}.bytesValue: not base64") from None
    raise OtlpError(f"{where}: unknown AnyValue field {kind!r}")


def _kind(value: Any) -> str:
    """What a client's value is, for a 400's message: its type, and for a string its length,
    never the value itself (it may be anything a client wrote: the reply may be logged on the
    way back)."""
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return type(value).__name__


_SCALARS = frozenset({"stringValue", "boolValue", "intValue", "doubleValue", "bytesValue"})


def _values(inner: Any, where: str) -> Any:
    """The ``values`` of an ArrayValue or KeyValueList (None or {} as none)."""
    if inner is None:
        return []
    if not isinstance(inner, Mapping):
        raise OtlpError(f"{where}: expected an object with a 'values' list")
    return inner.get("values", [])


def _object(obj: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    """``obj[key]``, an object that may be absent (or null)."""
    value = obj.get(key) or {}
    if not isinstance(value, Mapping):
        raise OtlpError(f"{where}.{key}: expected an object")
    return value


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
        raise OtlpError(
            f"{where}: expected hex digits (OTLP/JSON ids are hex), got {_kind(value)}"
        ) from None
    if len(raw) != size:
        raise OtlpError(f"{where}: expected {size * 2} hex digits, got {len(str(value))}")
    return int.from_bytes(raw, "big")


def _json_int(value: Any, where: str) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        raise OtlpError(f"{where}: expected an integer, got {_kind(value)}") from None


def _json_items(
    body: bytes, fields: tuple[tuple[str, str, str], tuple[str, str, str]]
) -> Iterator[tuple[str, dict[str, Any], Mapping[str, Any]]]:
    """(where, resource attributes, item) for every span or log record of a JSON request."""
    _, (top, scopes, items) = fields
    try:
        data = json.loads(body, object_pairs_hook=_object_once)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OtlpError(f"not JSON ({exc})") from None
    if not isinstance(data, Mapping) or not isinstance(data.get(top, []), list):
        raise OtlpError(f"expected an object with a {top!r} list")
    for r, res in enumerate(data.get(top, [])):
        where_r = f"{top}[{r}]"
        if not isinstance(res, Mapping):
            raise OtlpError(f"{where_r}: expected an object")
        resource = _json_attrs(_object(res, "resource", where_r).get("attributes", []),
                               f"{where_r}.resource")  # fmt: skip
        for s, scope in enumerate(_list(res, scopes, where_r)):
            for i, item in enumerate(_list(scope, items, f"{where_r}.{scopes}[{s}]")):
                where = f"{where_r}.{scopes}[{s}].{items}[{i}]"
                if not isinstance(item, Mapping):
                    raise OtlpError(f"{where}: expected an object")
                yield where, resource, item


def _field_names(*messages: Descriptor) -> frozenset[str]:
    """The field names, as protobuf and as JSON spells them, of ``messages`` and of every
    message within them."""
    names: set[str] = set()
    todo, done = list(messages), set()
    while todo:
        message = todo.pop()
        if message.full_name in done:
            continue
        done.add(message.full_name)
        for field in message.fields:
            names.update((field.name, field.json_name))
            if field.message_type is not None:
                todo.append(field.message_type)
    return frozenset(names)


# A key given twice in one object is refused, as protobuf's own JSON reader refuses it: a reader
# keeps one of the two, so a request giving ``resourceSpans`` twice had the first's spans dropped
# and was answered as accepted. It is named if it is a field of OTLP's messages.
_object_once = object_once_hook(
    _field_names(ExportTraceServiceRequest.DESCRIPTOR, ExportLogsServiceRequest.DESCRIPTOR),
    OtlpError,
)


def _list(obj: Any, key: str, where: str) -> list[Any]:
    value = obj.get(key, []) if isinstance(obj, Mapping) else None
    if not isinstance(value, list):
        raise OtlpError(f"{where}.{key}: expected a list")
    return value


def _no_deeper_than_python(
    decode: Callable[[bytes], list[_View]],
) -> Callable[[bytes], list[_View]]:
    """JSON (or attributes in it) nested past Python's recursion limit is a bad request."""

    @functools.wraps(decode)
    def guarded(body: bytes) -> list[_View]:
        try:
            return decode(body)
        except RecursionError:
            raise OtlpError("the JSON is nested too deeply to be an OTLP request") from None

    return guarded


@_no_deeper_than_python
def spans_from_json(body: bytes) -> list[SpanView]:
    views = []
    for where, resource, span in _json_items(body, _SPANS):
        status = _object(span, "status", where)
        views.append(
            SpanView(
                name=str(span.get("name", "")),
                trace_id=_json_id(span.get("traceId"), 16, f"{where}.traceId"),
                span_id=_json_id(span.get("spanId"), 8, f"{where}.spanId"),
                start_ns=_json_int(span.get("startTimeUnixNano"), f"{where}.startTimeUnixNano"),
                end_ns=_json_int(span.get("endTimeUnixNano"), f"{where}.endTimeUnixNano"),
                attributes=_json_attrs(span.get("attributes", []), where),
                resource=resource,
                is_error=status.get("code") in (STATUS_CODE_ERROR, "STATUS_CODE_ERROR"),
                status_message=status.get("message") or None,
            )
        )
    return views


@_no_deeper_than_python
def logs_from_json(body: bytes) -> list[LogView]:
    views = []
    for where, resource, rec in _json_items(body, _LOGS):
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
