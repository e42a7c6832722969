"""The OTLP gateway against the real broker and engine, fed by the standard OpenTelemetry
OTLP/HTTP and OTLP/gRPC exporters and by hand-made protobuf and JSON bodies."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from backports import zstd
from google.rpc.error_details_pb2 import RetryInfo
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline.certs import expiries
from pipeline.devkafka import LocalKafka, fetch_jars
from pipeline.gateway import PROTOBUF
from pipeline.services import GatewayProcess, WorkerProcess, free_port
from pipeline.settings import Settings
from pipeline.store import Store
from pipeline.topics import ensure_topics
from tests.conftest import http_get
from tests.integration.conftest import (
    Certificates,
    count,
    events_on,
    make_certificates,
    topic_takes,
    vigil,
    wait_until,
)

pytestmark = pytest.mark.integration
ACME_KEY = "acme-key-0123456789abcdef"
GLOBEX_KEY = "globex-key-0123456789abcdef"
OFF_KEY = "off-key-0123456789abcdef"
SLOW_KEY = "slow-key-0123456789abcdef"
CONFIG = """
tenants:
  acme: {api_keys_env: ACME_KEYS}
  globex: {api_keys_env: GLOBEX_KEYS}
  off: {api_keys_env: OFF_KEYS, disabled: true}
  slow: {api_keys_env: SLOW_KEYS, rate_limit: {events_per_second: 1, burst: 20}}
  later: {api_keys_env: LATER_KEYS}  # not set where the gateway runs
"""


@pytest.fixture
def gateway_env(vigil_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "vigil.yaml"
    config.write_text(CONFIG)
    return {
        **vigil_env,
        "VIGIL_CONFIG": str(config),
        "ACME_KEYS": f"old-key-not-used,{ACME_KEY}",
        "GLOBEX_KEYS": GLOBEX_KEY,
        "OFF_KEYS": OFF_KEY,
        "SLOW_KEYS": SLOW_KEY,
        "VIGIL_GATEWAY_MAX_BYTES": "300000",
        "VIGIL_GATEWAY_BODY_TIMEOUT_SECONDS": "2",
    }


@pytest.fixture
def gateway(gateway_env: dict[str, str]) -> Iterator[GatewayProcess]:
    settings = Settings.from_env(gateway_env)
    ensure_topics(settings)
    proc = GatewayProcess(settings, free_port(), gateway_env, grpc_port=free_port())
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.log_path.read_text()[-2000:]


@pytest.fixture
def running(gateway_env: dict[str, str], gateway: GatewayProcess) -> Iterator[Store]:
    """The worker (for storage) next to the gateway; its store for queries."""
    worker = WorkerProcess(Settings.from_env(gateway_env), gateway_env)
    store = worker.start()
    assert store is not None
    yield store
    assert worker.stop() == 0, worker.tail()


def _post(
    url: str, body: bytes, *, key: str | None = ACME_KEY, content_type: str = "application/json",
    headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    all_headers = {"Content-Type": content_type, **(headers or {})}
    if key is not None:
        all_headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=all_headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _json_span(i: int, *, tokens: int = 12, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    start = int((datetime.now(UTC) - timedelta(seconds=30)).timestamp() * 1e9)
    values = {
        "gen_ai.provider.name": {"stringValue": "openai"},
        "gen_ai.request.model": {"stringValue": "gpt-4o"},
        "gen_ai.operation.name": {"stringValue": "chat"},
        "gen_ai.usage.input_tokens": {"intValue": str(tokens)},
        "gen_ai.usage.output_tokens": {"intValue": 3},
        **(attrs or {}),
    }
    return {
        "traceId": f"{0xABC000 + i:032x}",
        "spanId": f"{0xDEF000 + i:016x}",
        "name": "chat gpt-4o",
        "startTimeUnixNano": str(start),
        "endTimeUnixNano": str(start + 250_000_000),
        "attributes": [{"key": k, "value": v} for k, v in values.items()],
    }


def _json_traces(spans: list[dict[str, Any]], service: str = "json-agent") -> bytes:
    resource = {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]}
    return json.dumps(
        {"resourceSpans": [{"resource": resource, "scopeSpans": [{"spans": spans}]}]}
    ).encode()


def _trace_ids(
    bootstrap: str, topic: str, enough: Callable[[set[str]], bool], timeout: float = 60
) -> list[str]:
    """The trace ids of the events on ``topic`` (each as often as it is there), read until
    those read are ``enough`` (``events_on``)."""
    events = events_on(bootstrap, topic, lambda seen: enough({e.trace_id or "" for e in seen}),
                       timeout)  # fmt: skip
    return [event.trace_id or "" for event in events]


def _export_genai_spans(
    exporter: SpanExporter, service: str, spans: int, tokens: int, text: Callable[[int], str]
) -> set[str]:
    """``spans`` GenAI spans as an agent's SDK makes them (the i-th of ``tokens + i`` input
    tokens, its prompt ``text(i)``), each with a child that is not GenAI, batched through
    ``exporter`` by 64; their trace ids."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=64))
    tracer = provider.get_tracer("test")
    ids = set()
    for i in range(spans):
        with tracer.start_as_current_span("chat gpt-4o") as span:
            span.set_attribute("gen_ai.provider.name", "openai")
            span.set_attribute("gen_ai.request.model", "gpt-4o-mini")
            span.set_attribute("gen_ai.usage.input_tokens", tokens + i)
            span.set_attribute("gen_ai.usage.output_tokens", 7)
            span.set_attribute("gen_ai.input.messages", text(i))
            ids.add(f"{span.get_span_context().trace_id:032x}")
            with tracer.start_as_current_span("db.query"):  # not GenAI: ignored
                pass
    assert provider.force_flush(30_000)
    provider.shutdown()
    return ids


def _stored_once_each(
    store: Store, ids: set[str], owner: tuple[str, str], tokens: int, redacted: str
) -> None:
    """The spans ``_export_genai_spans`` sent (``ids``, ``tokens``) are each stored once, as
    ``owner``'s (tenant, agent), their prompts without ``redacted`` (redacted as usual)."""
    sql = "SELECT count() FROM vigil.audit_log"
    wait_until(lambda: count(store, sql) >= len(ids), 90, f"{len(ids)} spans from the exporter")
    rows = store.query_rows(
        "SELECT trace_id, tenant_id, agent_id, input_tokens, input_text FROM vigil.audit_log"
    )
    assert len(rows) == len(ids) and {r[0] for r in rows} == ids
    assert {(r[1], r[2]) for r in rows} == {owner}
    assert sum(int(r[3]) for r in rows) == sum(tokens + i for i in range(len(ids)))
    assert all(redacted not in r[4] for r in rows)


def test_the_standard_otlp_exporter_sends_spans_that_land_in_clickhouse(
    gateway: GatewayProcess, running: Store
) -> None:
    exporter = OTLPSpanExporter(
        endpoint=f"{gateway.url}/v1/traces",
        headers={"Authorization": f"Bearer {ACME_KEY}"},
        compression=Compression.Gzip,
    )
    ids = _export_genai_spans(exporter, "py-agent", 150, 100,
                              lambda i: f"mail me at user{i}@example.com")  # fmt: skip
    _stored_once_each(running, ids, ("acme", "py-agent"), 100, "@example.com")


TRACES = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
LOGS = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"


def _grpc_export(
    gateway: GatewayProcess, body: bytes, *, key: str | None = ACME_KEY, method: str = TRACES,
    compression: grpc.Compression | None = None, tls: grpc.ChannelCredentials | None = None,
) -> tuple[grpc.StatusCode, bytes, dict[str, Any]]:  # fmt: skip
    """One Export call as an exporter makes it: its code, and the reply's bytes (or the error's
    message) and trailing metadata."""
    target = f"127.0.0.1:{gateway.grpc_port}"
    channel = grpc.insecure_channel(target) if tls is None else grpc.secure_channel(target, tls)
    with channel:
        export = channel.unary_unary(method)  # no (de)serializers: bytes each way
        metadata = [] if key is None else [("authorization", f"Bearer {key}")]
        try:
            reply = export(body, metadata=metadata, timeout=30, compression=compression)
        except grpc.RpcError as err:
            return err.code(), (err.details() or "").encode(), dict(err.trailing_metadata() or ())
        return grpc.StatusCode.OK, reply, {}


def _metric(gateway: GatewayProcess, series: str) -> int:
    """A series' value on the gateway's /metrics, 0 before it has one."""
    _, metrics = http_get(f"{gateway.url}/metrics")
    found = [line.split()[-1] for line in metrics.splitlines() if line.startswith(f"{series} ")]
    return int(float(found[0])) if found else 0


def _health(gateway: GatewayProcess, service: str = "") -> int:
    """What the gRPC port's health check says of ``service`` ("" is the gateway itself)."""
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        status: int = health_pb2_grpc.HealthStub(channel).Check(request, timeout=30).status
        return status


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TRACE_SERVICE = TRACES.split("/")[1]


def _spans(tokens: Sequence[int], first: int = 0xFEED00) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add()
    for i, count_of in enumerate(tokens):
        span = spans.spans.add(
            trace_id=(first + i).to_bytes(16, "big"), span_id=(i + 1).to_bytes(8, "big"),
            name="chat", start_time_unix_nano=time.time_ns() - 10**9, end_time_unix_nano=time.time_ns(),
        )  # fmt: skip
        for key, value in (("gen_ai.provider.name", "openai"), ("gen_ai.request.model", "gpt-4o")):
            span.attributes.add(key=key).value.string_value = value
        span.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = count_of
    return request


def test_the_standard_otlp_grpc_exporter_sends_spans_that_land_in_clickhouse(
    gateway: GatewayProcess, running: Store
) -> None:
    """OTLP's Python exporter over gRPC (what SDKs send where OTLP/HTTP is not set), gzip,
    its API key in the call's metadata: every GenAI span stored once, under the key's tenant,
    redacted; what the gateway answers at the gRPC port is counted in its metrics."""
    exporter = GrpcSpanExporter(endpoint=f"127.0.0.1:{gateway.grpc_port}", insecure=True,
                                headers={"authorization": f"Bearer {GLOBEX_KEY}"},
                                compression=grpc.Compression.Gzip)  # fmt: skip
    ids = _export_genai_spans(exporter, "grpc-agent", 120, 50,
                              lambda i: f"call me on +1 415 555 01{i % 100:02d}")  # fmt: skip
    _stored_once_each(running, ids, ("globex", "grpc-agent"), 50, "555 01")
    _, metrics = http_get(f"{gateway.url}/metrics")
    requests = [
        line
        for line in metrics.splitlines()
        if line.startswith(f'vigil_gateway_requests_total{{path="{TRACES}",code="200"}}')
    ]
    assert len(requests) == 1 and int(requests[0].split()[-1]) >= 2  # 120 spans, 64 a batch
    assert 'vigil_gateway_spans_accepted_total{signal="traces"} 120' in metrics
    # each span's child is not GenAI: answered, not kept, and counted so
    assert 'vigil_gateway_spans_ignored_total{signal="traces"} 120' in metrics


def test_the_grpc_port_answers_each_refusal_with_otlps_code(
    gateway: GatewayProcess, running: Store
) -> None:
    """What OTLP/HTTP answers 401, 403, 400, 413 and 429, gRPC answers UNAUTHENTICATED,
    PERMISSION_DENIED, INVALID_ARGUMENT and RESOURCE_EXHAUSTED (when to retry in RetryInfo,
    which exporters wait for); invalid spans are partial_success and dead letters, a Vigil
    event in a log record is stored."""
    good = _spans([10]).SerializeToString()
    assert _grpc_export(gateway, good, key=None)[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        b"missing API key: send Authorization: Bearer <key>",
    )
    assert _grpc_export(gateway, good, key="not-a-key")[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        b"unknown API key",
    )
    assert _grpc_export(gateway, good, key=OFF_KEY)[:2] == (
        grpc.StatusCode.PERMISSION_DENIED,
        b"tenant 'off' is disabled",
    )
    code, said, _ = _grpc_export(gateway, b"\x0a\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and b"protobuf" in said, said
    huge = _spans([1] * 80)
    for span in huge.resource_spans[0].scope_spans[0].spans:
        span.attributes.add(key="pad").value.string_value = "x" * 5000
    body = huge.SerializeToString()
    assert len(body) > 300_000  # VIGIL_GATEWAY_MAX_BYTES
    oversize = f'vigil_gateway_requests_total{{path="{TRACES}",code="413"}}'
    before = _metric(gateway, oversize)
    code, _, trailers = _grpc_export(gateway, body)
    # no RetryInfo: the OTLP specification says not to retry it, unlike a 429's
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "google.rpc.retryinfo-bin" not in trailers
    assert len(gzip.compress(body)) < 300_000  # small on the wire, over the limit unpacked
    code, _, _ = _grpc_export(gateway, body, compression=grpc.Compression.Gzip)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _metric(gateway, oversize) == before + 2  # gRPC's refusals counted as HTTP's 413
    code, reply, _ = _grpc_export(gateway, _spans([10, -5, 20, -1]).SerializeToString(),
                                  compression=grpc.Compression.Gzip)  # fmt: skip
    assert code == grpc.StatusCode.OK
    partial = ExportTraceServiceResponse.FromString(reply).partial_success
    assert partial.rejected_spans == 2 and "negative_value" in partial.error_message
    logs = ExportLogsServiceRequest()
    record = (
        logs.resource_logs.add()
        .scope_logs.add()
        .log_records.add(event_name="vigil.event", time_unix_nano=time.time_ns())
    )
    record.body.string_value = json.dumps({
        "event_id": "grpc-eval-1", "kind": "eval", "ts": datetime.now(UTC).isoformat(),
        "tenant_id": "acme", "agent_id": "grpc-agent", "metric": "faithfulness",
        "score": 0.42, "threshold": 0.8,
    })  # fmt: skip
    code, reply, _ = _grpc_export(gateway, logs.SerializeToString(), method=LOGS)
    assert code == grpc.StatusCode.OK
    assert not ExportLogsServiceResponse.FromString(reply).HasField("partial_success")
    wait_until(lambda: count(running, "SELECT count() FROM vigil.audit_log") >= 3, 60, "3 events")
    assert sorted(running.query_rows("SELECT event_id, kind FROM vigil.audit_log")) == [
        *sorted((f"{0xFEED00 + i:032x}-{i + 1:016x}", "interaction") for i in (0, 2)),
        ("grpc-eval-1", "eval"),
    ]
    wait_until(lambda: count(running, "SELECT count() FROM vigil.dlq") >= 2, 60, "2 dead letters")
    assert (
        running.query_rows("SELECT stage, reason_code, origin_topic FROM vigil.dlq")
        == [("gateway", "negative_value", f"gateway:{TRACES}")] * 2
    )
    # slow may take 20 events at once, then one a second: 5 more are 5 s away
    assert _grpc_export(gateway, _spans([1] * 20).SerializeToString(), key=SLOW_KEY)[0] == (
        grpc.StatusCode.OK
    )
    code, said, trailers = _grpc_export(gateway, _spans([1] * 5, 0xAB00).SerializeToString(),
                                        key=SLOW_KEY)  # fmt: skip
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert b"tenant 'slow' is over its rate limit of 1 events/s (burst 20)" in said
    wait = RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"]).retry_delay.seconds
    assert 1 <= wait <= 5
    _, metrics = http_get(f"{gateway.url}/metrics")
    for code_said, times in (("401", 2), ("403", 1), ("400", 1), ("429", 1), ("200", 2)):
        assert f'vigil_gateway_requests_total{{path="{TRACES}",code="{code_said}"}} {times}' in (
            metrics
        ), code_said
    assert f'vigil_gateway_requests_total{{path="{LOGS}",code="200"}} 1' in metrics


def test_otlp_metrics_are_refused_saying_what_to_do(gateway: GatewayProcess) -> None:
    """opentelemetry-instrument exports metrics by default wherever the OTLP endpoint points:
    Vigil keeps none, and the error each export logs says so and what to set, over HTTP (404)
    and gRPC (UNIMPLEMENTED), as it is counted."""
    told = ("Vigil's gateway takes OTLP traces and logs, not metrics: set "
            "OTEL_METRICS_EXPORTER=none, or OTEL_EXPORTER_OTLP_METRICS_ENDPOINT to a collector "
            "that keeps them")  # fmt: skip
    status, _, body = _post(f"{gateway.url}/v1/metrics", b"", content_type="application/x-protobuf")
    assert (status, json.loads(body)) == (404, {"code": 404, "message": told})
    metrics_method = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
    assert _grpc_export(gateway, b"", method=metrics_method)[:2] == (
        grpc.StatusCode.UNIMPLEMENTED,
        told.encode(),
    )
    _, metrics = http_get(f"{gateway.url}/metrics")
    for path in ("/v1/metrics", metrics_method):
        assert f'vigil_gateway_requests_total{{path="{path}",code="404"}} 1' in metrics, path


def test_a_port_already_taken_is_said_at_start(
    gateway_env: dict[str, str], gateway: GatewayProcess
) -> None:
    """gRPC binds with SO_REUSEPORT: a second gateway given the first's gRPC port started, and
    the two took turns at its calls. Given its HTTP port, it ended in a traceback. Either way
    it stops at start, saying why and what to do, and the first serves on."""
    assert gateway.grpc_port is not None
    for http_port, grpc_port, said in (
        (free_port(), gateway.grpc_port, f"the OTLP/gRPC receiver cannot listen on "
                                         f"127.0.0.1:{gateway.grpc_port}: the port is taken"),
        (gateway.port, free_port(), f"the gateway cannot listen on 127.0.0.1:{gateway.port}: "
                                    "the port is taken"),
    ):  # fmt: skip
        second = vigil(gateway_env, "gateway", "--port", str(http_port),
                       "--grpc-port", str(grpc_port))  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"vigil: error: {said}" in second.stderr, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
    assert _grpc_export(gateway, _spans([3]).SerializeToString())[0] == grpc.StatusCode.OK
    assert _post(f"{gateway.url}/v1/traces", _json_traces([_json_span(3)]))[0] == 200


def test_json_encoding_logs_and_tenant_spoofing(gateway: GatewayProcess, running: Store) -> None:
    spoof = {"vigil.tenant_id": {"stringValue": "globex"}}
    # a span no date can hold was a 500 for the request: its good spans were lost with it
    timeless = {**_json_span(3), "startTimeUnixNano": "1" + "0" * 30}
    status, _, body = _post(
        f"{gateway.url}/v1/traces",
        _json_traces([_json_span(1), _json_span(2, attrs=spoof), timeless]),
    )
    assert status == 200
    assert json.loads(body)["partialSuccess"]["rejectedSpans"] == "1"
    assert "bad_timestamp: startTimeUnixNano" in json.loads(body)["partialSuccess"]["errorMessage"]
    eval_event = {
        "event_id": "gw-eval-1", "kind": "eval", "ts": datetime.now(UTC).isoformat(),
        "tenant_id": "globex", "agent_id": "json-agent", "metric": "faithfulness",
        "score": 0.42, "threshold": 0.8,
    }  # fmt: skip
    logs = {
        "resourceLogs": [{"scopeLogs": [{"logRecords": [
            {"eventName": "vigil.event", "timeUnixNano": str(time.time_ns()),
             "body": {"stringValue": json.dumps(eval_event)}},
            {"eventName": "some.other.log", "body": {"stringValue": "ignored"}},
        ]}]}]
    }  # fmt: skip
    status, _, body = _post(f"{gateway.url}/v1/logs", json.dumps(logs).encode())
    assert (status, json.loads(body)) == (200, {})
    _, metrics = http_get(f"{gateway.url}/metrics")
    assert 'vigil_gateway_spans_ignored_total{signal="logs"} 1' in metrics  # some.other.log
    sql = "SELECT count() FROM vigil.audit_log"
    wait_until(lambda: count(running, sql) >= 3, 60, "3 events from JSON")
    rows = {
        r[0]: r[1:]
        for r in running.query_rows(
            "SELECT event_id, tenant_id, trace_id, attributes['vigil.claimed_tenant'], kind "
            "FROM vigil.audit_log"
        )
    }
    assert set(rows) == {f"{0xABC001:032x}-{0xDEF001:016x}", f"{0xABC002:032x}-{0xDEF002:016x}",
                         "gw-eval-1"}  # fmt: skip
    # the tenant is the key's: claims are recorded, never obeyed
    assert {r[0] for r in rows.values()} == {"acme"}
    assert rows[f"{0xABC002:032x}-{0xDEF002:016x}"][2] == "globex"
    assert rows["gw-eval-1"][2:] == ("globex", "eval")
    assert rows[f"{0xABC001:032x}-{0xDEF001:016x}"][1] == f"{0xABC001:032x}"  # hex ids kept
    wait_until(lambda: count(running, "SELECT count() FROM vigil.dlq") >= 1, 60, "a dead letter")
    assert running.query_rows("SELECT stage, reason_code FROM vigil.dlq") == [
        ("gateway", "bad_timestamp")
    ]


def test_every_error_path_answers_as_otlp_says(gateway: GatewayProcess, running: Store) -> None:
    url = f"{gateway.url}/v1/traces"
    good = _json_traces([_json_span(5)])
    assert _post(url, good, key=None)[0] == 401
    assert _post(url, good, key="not-a-key")[0] == 401
    assert _post(url, good, key=OFF_KEY)[0] == 403
    # bytes that are not UTF-8 in the key: a UnicodeEncodeError, and a 500 where a 401 belongs
    conn = http.client.HTTPConnection(gateway.url.removeprefix("http://"), timeout=10)
    conn.putrequest("POST", "/v1/traces")
    for header, value in (("Authorization", b"Bearer \xff\xfe"),
                          ("Content-Type", b"application/json"),
                          ("Content-Length", str(len(good)).encode())):  # fmt: skip
        conn.putheader(header, value)
    conn.endheaders(good)
    assert conn.getresponse().status == 401
    conn.close()
    # a body that stops coming held its connection (and the request) until TCP gave up on it
    conn = http.client.HTTPConnection(gateway.url.removeprefix("http://"), timeout=15)
    conn.putrequest("POST", "/v1/traces")
    for header, value in (("Authorization", f"Bearer {ACME_KEY}".encode()),
                          ("Content-Type", b"application/json"),
                          ("Content-Length", str(len(good)).encode())):  # fmt: skip
        conn.putheader(header, value)
    conn.endheaders(good[:10])
    started = time.monotonic()
    reply = conn.getresponse()
    assert reply.status == 408 and time.monotonic() - started < 10
    assert json.loads(reply.read())["message"] == (
        "the request's body did not arrive within 2 s (10 bytes did)"
    )
    conn.close()
    assert _post(url, good, content_type="text/plain")[0] == 415
    status, _, body = _post(url, b"\x0a\xff\xff", content_type="application/x-protobuf")
    assert status == 400 and b"protobuf" in body
    bad_id = json.loads(good)
    bad_id["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] = "not-hex"
    status, _, body = _post(url, json.dumps(bad_id).encode())
    assert status == 400 and b"traceId" in body and b"hex" in body
    huge = _json_traces(
        [_json_span(i, attrs={"pad": {"stringValue": "x" * 5000}}) for i in range(80)]
    )
    assert len(huge) > 300_000 and _post(url, huge)[0] == 413
    bomb = gzip.compress(huge)  # small on the wire, over the limit once decompressed
    assert len(bomb) < 300_000
    assert _post(url, bomb, headers={"Content-Encoding": "gzip"})[0] == 413
    assert _post(url, b"not gzip", headers={"Content-Encoding": "gzip"})[0] == 400
    # an encoding aiohttp does not undo reached the decoder as it came (snappy: "not protobuf")
    for encoding in ("snappy", "lz4", "x-gzip"):  # aiohttp undoes none of these
        status, _, body = _post(url, good, headers={"Content-Encoding": encoding})
        assert status == 415, (encoding, status)
        assert f"Content-Encoding '{encoding}' is not one this gateway reads".encode() in body
    zstd_good = _json_traces([_json_span(6)])
    assert _post(url, zstd.compress(zstd_good), headers={"Content-Encoding": "zstd"})[0] == 200
    # some spans invalid: 200 with partial_success, in protobuf since the request was protobuf
    request = _spans([10, -5, 20, -1])
    status, _, body = _post(
        url, gzip.compress(request.SerializeToString()), content_type="application/x-protobuf",
        headers={"Content-Encoding": "gzip"},
    )  # fmt: skip
    assert status == 200
    reply = ExportTraceServiceResponse.FromString(body)
    assert reply.partial_success.rejected_spans == 2
    assert "negative" in reply.partial_success.error_message
    wait_until(lambda: count(running, "SELECT count() FROM vigil.dlq") >= 2, 60, "2 dead letters")
    letters = running.query_rows("SELECT stage, reason_code, tenant_hint FROM vigil.dlq")
    assert sorted(letters) == [("gateway", "negative_value", "acme")] * 2
    wait_until(lambda: count(running, "SELECT count() FROM vigil.audit_log") >= 2, 60, "2 events")
    metrics = urllib.request.urlopen(f"{gateway.url}/metrics", timeout=10).read().decode()
    assert 'vigil_gateway_requests_total{path="/v1/traces",code="401"} 3' in metrics
    assert (
        'vigil_gateway_spans_rejected_total{signal="traces",reason="negative_value"} 2' in metrics
    )
    assert 'vigil_gateway_spans_accepted_total{signal="traces"} 3' in metrics
    assert "vigil_gateway_producer_queue_depth 0" in metrics
    assert "vigil_gateway_producer_renewals_total 0" in metrics
    # no VIGIL_METRICS_TOKEN: anyone on the clients' port may read them, so no tenant is named
    assert "tenant=" not in metrics and "acme" not in metrics
    assert urllib.request.urlopen(f"{gateway.url}/readyz", timeout=10).status == 200


def test_a_tenant_over_its_rate_limit_is_told_when_to_retry_and_holds_no_other_back(
    gateway_env: dict[str, str],
) -> None:
    """slow may send 1 event a second, 20 at once: its second request is refused whole (429,
    Retry-After: its 5 events are 5 s away), acme's meanwhile is not, and the same request
    sent again after Retry-After is taken. The raw topic has each span once. The metrics that
    name tenants are read with the scrapers' token."""
    env = {**gateway_env, "VIGIL_METRICS_TOKEN": "scrape-0123456789"}
    settings = Settings.from_env(env)
    ensure_topics(settings)
    gateway = GatewayProcess(settings, free_port(), env)
    gateway.start()
    try:
        _over_the_rate_limit(gateway, settings)
    finally:
        assert gateway.stop() == 0, gateway.log_path.read_text()[-2000:]


def _over_the_rate_limit(gateway: GatewayProcess, settings: Settings) -> None:
    url = f"{gateway.url}/v1/traces"
    assert _post(url, _json_traces([_json_span(i) for i in range(20)]), key=SLOW_KEY)[0] == 200
    again = _json_traces([_json_span(i) for i in range(20, 25)])
    status, headers, body = _post(url, again, key=SLOW_KEY)
    assert status == 429, body
    assert (
        "tenant 'slow' is over its rate limit of 1 events/s (burst 20)"
        in json.loads(body)["message"]
    )
    assert 1 <= int(headers["Retry-After"]) <= 5
    assert _post(url, _json_traces([_json_span(i) for i in range(100, 130)]))[0] == 200
    time.sleep(int(headers["Retry-After"]) + 0.2)
    assert _post(url, again, key=SLOW_KEY)[0] == 200
    assert http_get(f"{gateway.url}/metrics")[0] == 401
    code, metrics = http_get(
        f"{gateway.url}/metrics", {"Authorization": "Bearer scrape-0123456789"}
    )
    assert code == 200
    assert 'vigil_gateway_rate_limited_total{tenant="slow"} 1' in metrics
    assert 'vigil_gateway_tenant_events_total{tenant="slow"} 25' in metrics
    assert 'vigil_gateway_tenant_events_total{tenant="acme"} 30' in metrics
    assert 'vigil_gateway_requests_total{path="/v1/traces",code="429"} 1' in metrics
    expected = {f"{0xABC000 + i:032x}" for i in (*range(25), *range(100, 130))}
    published = _trace_ids(settings.bootstrap, settings.topics.raw, expected.issubset)
    assert sorted(published) == sorted(expected)


def _gateway_on_own_broker(
    tmp_path: Path, gateway_env: dict[str, str]
) -> tuple[LocalKafka, GatewayProcess, Settings]:
    """A broker of the test's own, to stop or freeze, and a gateway started on it whose
    requests wait 3 s for the broker's acknowledgement; its settings."""
    settings = Settings.from_env(gateway_env)
    broker = LocalKafka(tmp_path / "own-kafka", fetch_jars(settings.cache_dir), free_port(2))
    broker.start()
    env = {**gateway_env, "VIGIL_KAFKA_BOOTSTRAP": broker.bootstrap,
           "VIGIL_GATEWAY_DELIVERY_TIMEOUT_SECONDS": "3"}  # fmt: skip
    settings = Settings.from_env(env)
    ensure_topics(settings)
    gateway = GatewayProcess(settings, free_port(), env, grpc_port=free_port())
    gateway.start()
    return broker, gateway, settings


def test_broker_down_means_503_and_nothing_answered_200_is_lost(
    tmp_path: Path, gateway_env: dict[str, str]
) -> None:
    broker, gateway, settings = _gateway_on_own_broker(tmp_path, gateway_env)
    url = f"{gateway.url}/v1/traces"
    answered_200: set[str] = set()
    try:

        def send(i: int) -> int:
            status, headers, _ = _post(url, _json_traces([_json_span(i)]))
            if status == 200:
                answered_200.add(f"{0xABC000 + i:032x}")
            else:
                assert status == 503 and headers.get("Retry-After"), (status, headers)
            return status

        over_grpc = _spans([7], first=0xABC000 + 20).SerializeToString()  # trace id 20's

        def grpc_sent() -> int:
            code, _, trailers = _grpc_export(gateway, over_grpc)
            if code == grpc.StatusCode.OK:
                answered_200.add(f"{0xABC000 + 20:032x}")
                return 200
            assert code == grpc.StatusCode.UNAVAILABLE and trailers, (code, trailers)
            return 503

        assert all(send(i) == 200 for i in range(10))
        assert (_health(gateway), _health(gateway, TRACE_SERVICE)) == (SERVING, SERVING)
        broker.stop()
        refused = [i for i in range(10, 20) if send(i) != 200]
        assert refused, "every export was answered 200 while the broker was down"
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"{gateway.url}/readyz", timeout=10)
        assert not_ready.value.code == 503
        # alive, not ready: a probe restarting it would not bring the broker back
        assert (_health(gateway), _health(gateway, TRACE_SERVICE)) == (SERVING, NOT_SERVING)
        code, said, trailers = _grpc_export(gateway, over_grpc)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, said)
        assert RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"]).retry_delay.seconds == 5
        broker.start()
        deadline = time.monotonic() + 60
        pending = [*refused, 20]
        while pending and time.monotonic() < deadline:  # the client retries after Retry-After
            pending = [i for i in pending if (send(i) if i < 20 else grpc_sent()) != 200]
            time.sleep(1)
        assert not pending
        assert _health(gateway, TRACE_SERVICE) == SERVING
    finally:
        assert gateway.stop() == 0
    published = _trace_ids(broker.bootstrap, settings.topics.raw, answered_200.issubset)
    broker.stop()
    assert len(answered_200) == 21 and answered_200 <= set(published)


def test_spans_each_within_the_raw_topic_are_not_refused_together(
    gateway_env: dict[str, str],
) -> None:
    """librdkafka packs messages into record batches of up to 1,000,000 bytes, and a topic's
    max.message.bytes holds a whole batch: spans of 140,000 bytes to a raw topic taking
    300,000, each within it, were refused together, and the export answered 503 at each try."""
    env = {**gateway_env, "VIGIL_GATEWAY_MAX_BYTES": str(4 << 20)}
    settings = Settings.from_env(env)
    topic_takes(settings, settings.topics.raw, 300_000)
    gateway = GatewayProcess(settings, free_port(), env)
    gateway.start()
    rng = random.Random(11)
    try:
        spans = [
            _json_span(i, attrs={"note": {"stringValue": "".join(
                rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(140_000))}})
            for i in range(6)
        ]  # fmt: skip
        status, _, body = _post(f"{gateway.url}/v1/traces", _json_traces(spans))
        assert status == 200, body[:500]
        expected = {span["traceId"] for span in spans}
        assert set(_trace_ids(settings.bootstrap, settings.topics.raw, expected.issubset)) == (
            expected
        )
    finally:
        assert gateway.stop() == 0, gateway.log_path.read_text()[-2000:]


def test_a_raw_topic_limit_lowered_while_the_gateway_runs_is_read_again(
    gateway_env: dict[str, str],
) -> None:
    """The gateway sized spans by the raw topic's limit as read at start: one lowered since
    refused a span between the two limits, and the export was answered 503 at every retry."""
    env = {**gateway_env, "VIGIL_GATEWAY_MAX_BYTES": str(4 << 20)}
    settings = Settings.from_env(env)
    gateway = GatewayProcess(settings, free_port(), env)
    gateway.start()
    rng = random.Random(29)
    note = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(400_000))
    try:
        topic_takes(settings, settings.topics.raw, 300_000)
        body = _json_traces([_json_span(1, attrs={"note": {"stringValue": note}})])
        status, _, said = _post(f"{gateway.url}/v1/traces", body)
        assert status == 503 and b"MSG_SIZE_TOO_LARGE" in said, said[:500]
        status, _, said = _post(f"{gateway.url}/v1/traces", body)  # the exporter's retry
        assert status == 200, said[:500]
        assert b"1 of 1 rejected, kept in the DLQ; first: oversized" in said
        assert "max.message.bytes read again" in gateway.log_path.read_text()
    finally:
        assert gateway.stop() == 0, gateway.log_path.read_text()[-2000:]


def test_the_gateway_stops_within_its_delivery_timeout_while_the_broker_does_not_answer(
    tmp_path: Path, gateway_env: dict[str, str]
) -> None:
    """A broker that takes connections and answers nothing (SIGSTOP): exports are answered
    503, and SIGTERM ends the gateway after the delivery timeout, not the 30 s it waited to
    deliver what those 503s already told their clients to send again."""
    broker, gateway, _ = _gateway_on_own_broker(tmp_path, gateway_env)
    url = f"{gateway.url}/v1/traces"
    frozen = broker.pid()
    assert frozen is not None
    try:
        assert _post(url, _json_traces([_json_span(1)]))[0] == 200
        os.kill(frozen, signal.SIGSTOP)
        assert [_post(url, _json_traces([_json_span(i)]))[0] for i in (2, 3)] == [503, 503]
        began = time.monotonic()
        assert gateway.stop(timeout=30) == 0
        assert time.monotonic() - began < 15
        said = gateway.log_path.read_text()
        assert "2 message(s) were still undelivered at shutdown" in said, said[-2000:]
    finally:
        os.kill(frozen, signal.SIGCONT)
        broker.stop()


def test_the_gateway_serves_https_with_its_certificate(
    gateway_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a certificate, the API keys in exporters' headers travel encrypted: the standard
    exporter, trusting the CA, gets its spans acknowledged; plain HTTP and a client that does not
    trust the certificate get no answer. The gRPC port presents the same certificate."""
    # requests, under the exporter, takes these over the exporter's certificate_file
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    made = make_certificates(tmp_path)
    env = {**gateway_env, "VIGIL_GATEWAY_TLS_CERT_LOCATION": str(made.cert),
           "VIGIL_GATEWAY_TLS_KEY_LOCATION": str(made.key)}  # fmt: skip
    settings = Settings.from_env(env)
    ensure_topics(settings)
    gateway = GatewayProcess(settings, free_port(), env, grpc_port=free_port())
    gateway.start()
    try:
        assert gateway.url.startswith("https://127.0.0.1:")
        spans = _spans([12], first=0x7150).SerializeToString()
        trusting = grpc.ssl_channel_credentials(root_certificates=made.ca.read_bytes())
        assert _grpc_export(gateway, spans, tls=trusting)[0] == grpc.StatusCode.OK
        assert _grpc_export(gateway, spans)[0] == grpc.StatusCode.UNAVAILABLE  # plain: no answer
        code, said, _ = _grpc_export(gateway, spans, tls=grpc.ssl_channel_credentials())
        assert code == grpc.StatusCode.UNAVAILABLE, said  # the certificate is not trusted
        provider = TracerProvider(resource=Resource.create({"service.name": "tls-agent"}))
        finished = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(finished))
        with provider.get_tracer("test").start_as_current_span("chat gpt-4o") as span:
            span.set_attribute("gen_ai.provider.name", "openai")
            span.set_attribute("gen_ai.request.model", "gpt-4o")
            span.set_attribute("gen_ai.usage.input_tokens", 12)
        exporter = OTLPSpanExporter(endpoint=f"{gateway.url}/v1/traces",
                                    certificate_file=str(made.ca),
                                    headers={"Authorization": f"Bearer {ACME_KEY}"})  # fmt: skip
        assert exporter.export(finished.get_finished_spans()) == SpanExportResult.SUCCESS
        exporter.shutdown()

        plain = gateway.url.replace("https://", "http://")
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
            _post(f"{plain}/v1/traces", _json_traces([_json_span(1)]))
        with pytest.raises(urllib.error.URLError) as untrusted:
            _post(f"{gateway.url}/v1/traces", _json_traces([_json_span(2)]),
                  context=ssl.create_default_context())  # fmt: skip
        assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
        status, _, _ = _post(f"{gateway.url}/v1/traces", _json_traces([_json_span(3)]),
                             context=ssl.create_default_context(cafile=made.ca))  # fmt: skip
        assert status == 200
    finally:
        assert gateway.stop() == 0, gateway.log_path.read_text()[-2000:]
    said = gateway.log_path.read_text()
    assert "vigil gateway on https://" in said
    # a tenant whose variable is not set is said at start, not only by 401s
    assert "tenants.later.api_keys_env: LATER_KEYS holds no key in this environment" in said


def test_a_renewed_certificate_is_served_over_https_and_grpc_without_a_restart(
    gateway_env: dict[str, str], tmp_path: Path
) -> None:
    """cert-manager renews the gateway's mounted certificate: from the next connection on,
    HTTPS and gRPC present the new one (here signed by another CA, which exporters trust only
    afterwards), without a restart, and /metrics says when it expires. A renewal whose key is
    encrypted is HTTPS's alone: gRPC, which reads no password, keeps the one before, said."""
    old, new, third = tmp_path / "old", tmp_path / "new", tmp_path / "third"
    old.mkdir(), new.mkdir(), third.mkdir()
    before, after, encrypted = (make_certificates(old), make_certificates(new),
                                make_certificates(third))  # fmt: skip
    plain = encrypted.key.rename(third / "plain.key")
    subprocess.run(["openssl", "pkey", "-in", str(plain), "-aes256", "-passout",
                    "pass:key-s3cret", "-out", str(encrypted.key)], check=True)  # fmt: skip
    live = tmp_path / "live"
    live.symlink_to(old)
    env = {**gateway_env, "VIGIL_GATEWAY_TLS_CERT_LOCATION": str(live / before.cert.name),
           "VIGIL_GATEWAY_TLS_KEY_LOCATION": str(live / before.key.name),
           "VIGIL_GATEWAY_TLS_KEY_PASSWORD": "key-s3cret"}  # fmt: skip
    settings = Settings.from_env(env)
    ensure_topics(settings)
    gateway = GatewayProcess(settings, free_port(), env, grpc_port=free_port())
    gateway.start()
    spans = _spans([7], first=0x7160).SerializeToString()

    def answers(made: Certificates) -> tuple[int, grpc.StatusCode]:
        """What a client trusting only ``made``'s CA gets: over HTTPS (0: no handshake), over
        gRPC."""
        try:
            status = _post(f"{gateway.url}/v1/traces", _json_traces([_json_span(9)]),
                           context=ssl.create_default_context(cafile=made.ca))[0]  # fmt: skip
        except urllib.error.URLError as refused:
            assert isinstance(refused.reason, ssl.SSLCertVerificationError), refused
            status = 0
        trusting = grpc.ssl_channel_credentials(root_certificates=made.ca.read_bytes())
        return status, _grpc_export(gateway, spans, tls=trusting)[0]

    def mounted(folder: Path) -> None:
        swap = tmp_path / "swap"
        swap.symlink_to(folder)
        os.replace(swap, live)  # as Kubernetes updates a mounted secret
        time.sleep(1.5)  # the files are looked at no more than once a second

    try:
        assert answers(before) == (200, grpc.StatusCode.OK)
        assert answers(after) == (0, grpc.StatusCode.UNAVAILABLE)
        mounted(new)
        assert answers(after) == (200, grpc.StatusCode.OK)
        assert answers(before) == (0, grpc.StatusCode.UNAVAILABLE)
        metrics = http_get(f"{gateway.url}/metrics",
                           context=ssl.create_default_context(cafile=after.ca))[1]  # fmt: skip
        until = min(expiries(after.cert)).timestamp()
        served = 'variable="VIGIL_GATEWAY_TLS_CERT_LOCATION"'
        assert f"vigil_gateway_certificate_expiry_timestamp_seconds{{{served}}} {until}" in metrics
        mounted(third)
        assert answers(encrypted)[0] == 200  # HTTPS, with the password
        assert answers(after)[1] == grpc.StatusCode.OK  # gRPC, the certificate before
    finally:
        assert gateway.stop() == 0, gateway.log_path.read_text()[-2000:]
    said = gateway.log_path.read_text()
    assert f"{live / before.key.name}: the renewed key is encrypted, which the OTLP/gRPC" in said
    assert "key-s3cret" not in said


def test_sighup_reads_the_policy_again_without_a_restart(
    gateway_env: dict[str, str], tmp_path: Path
) -> None:
    """A leaked key revoked, a tenant disabled and a new key given, without a restart: SIGHUP
    reads vigil.yaml again (and a file of keys it names), and HTTP and gRPC answer by it; a
    policy that does not read is said, and the one before kept."""
    settings = Settings.from_env(gateway_env)
    ensure_topics(settings)
    gateway = GatewayProcess(settings, free_port(), gateway_env, grpc_port=free_port())
    gateway.start()
    assert gateway.proc is not None
    config = Path(gateway_env["VIGIL_CONFIG"])
    new_key = "globex-new-key-0123456789abcdef"
    spans = _spans([5], first=0x7170).SerializeToString()

    def status(key: str) -> int:
        return _post(f"{gateway.url}/v1/traces", _json_traces([_json_span(4)]), key=key)[0]

    def said() -> str:
        return gateway.log_path.read_text()

    try:
        metrics = http_get(f"{gateway.url}/metrics")[1]
        assert 'vigil_gateway_policy_reads_total{outcome="read"} 0' in metrics
        started = time.time()  # the gateway's policy was read before
        assert [status(key) for key in (ACME_KEY, GLOBEX_KEY, new_key)] == [200, 200, 401]
        digest = hashlib.sha256(new_key.encode()).hexdigest()
        keys = config.with_name("globex.keys")  # a mounted secret's file
        keys.write_text("# globex\nglobex-file-key-1\n")
        config.write_text(
            CONFIG.replace("acme: {api_keys_env: ACME_KEYS}",
                           "acme: {api_keys_env: ACME_KEYS, disabled: true}")
            .replace("globex: {api_keys_env: GLOBEX_KEYS}",
                     f"globex: {{api_key_sha256: [{digest}], api_keys_file: globex.keys}}")
        )  # fmt: skip
        os.kill(gateway.proc.pid, signal.SIGHUP)
        wait_until(lambda: status(new_key) == 200, 30, "the new key taken", said)
        assert status(ACME_KEY) == 403 and status(GLOBEX_KEY) == 401
        assert status("globex-file-key-1") == 200
        assert _grpc_export(gateway, spans, key=new_key)[0] == grpc.StatusCode.OK
        assert _grpc_export(gateway, spans, key=GLOBEX_KEY)[0] == grpc.StatusCode.UNAUTHENTICATED
        assert f"vigil gateway read {config} again: 4 tenant(s) with keys" in said()
        keys.write_text("globex-file-key-2\n")  # the secret rotated; vigil.yaml unchanged
        os.kill(gateway.proc.pid, signal.SIGHUP)
        wait_until(lambda: status("globex-file-key-2") == 200, 30, "the rotated key taken", said)
        assert status("globex-file-key-1") == 401 and status(new_key) == 200

        config.write_text("tenants: [\n")  # a policy that does not read
        os.kill(gateway.proc.pid, signal.SIGHUP)
        kept = "the gateway goes on with the policy it read before"
        wait_until(lambda: kept in said(), 30, "the unreadable policy said", said)
        unread = f"ERROR vigil.gateway: SIGHUP: {config}: the configuration file is not valid YAML"
        assert unread in said()
        assert status(new_key) == 200 and status(ACME_KEY) == 403
        metrics = http_get(f"{gateway.url}/metrics")[1]
        for outcome, times in (("read", 2), ("refused", 1)):
            assert f'vigil_gateway_policy_reads_total{{outcome="{outcome}"}} {times}' in metrics
        read_at = re.search(r"^vigil_gateway_policy_read_timestamp_seconds (\S+)$", metrics, re.M)
        assert read_at and started < float(read_at[1]) < time.time()  # the reading that read
    finally:
        assert gateway.stop() == 0, said()[-2000:]


def test_requests_over_the_bytes_in_flight_are_told_to_retry_and_none_is_lost(
    gateway_env: dict[str, str],
) -> None:
    """With a body held half-sent, another export that would take the bytes held past
    VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT is answered 503 (UNAVAILABLE with RetryInfo over gRPC),
    by its Content-Length (after waiting a second for room, as a gRPC call does), or as a
    chunked body grows past it; a gRPC call that comes while the body is held waits, unread,
    and is answered once the body held is; the bytes are given back, and the retries are taken:
    every span once on the topic."""
    held = _spans([5] * 1_600, first=0xA0000).SerializeToString()
    other = _spans([6] * 1_200, first=0xB0000).SerializeToString()
    chunked = _spans([7] * 1_200, first=0xC0000).SerializeToString()
    over_grpc = _spans([8] * 1_200, first=0xD0000).SerializeToString()
    waits = _spans([9] * 1_200, first=0xE0000).SerializeToString()
    assert 200_000 < len(held) <= 300_000 and 150_000 < len(other) < 200_000
    # the half-sent body is held through the others' waits for room, a second each
    env = {**gateway_env, "VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT": "400000",
           "VIGIL_GATEWAY_BODY_TIMEOUT_SECONDS": "30"}  # fmt: skip
    settings = Settings.from_env(env)
    ensure_topics(settings)
    gateway = GatewayProcess(settings, free_port(), env, grpc_port=free_port())
    gateway.start()
    url = f"{gateway.url}/v1/traces"
    try:
        # one span first: the gateway's producer has a connection to the partition's leader
        first = _spans([1], first=0xF0000).SerializeToString()
        assert _grpc_export(gateway, first)[0] == grpc.StatusCode.OK
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sender:
            sender.sendall(
                b"POST /v1/traces HTTP/1.1\r\nHost: vigil\r\n"
                b"Content-Type: application/x-protobuf\r\n"
                + f"Authorization: Bearer {ACME_KEY}\r\nContent-Length: {len(held)}\r\n\r\n".encode()
                + held[: len(held) // 2]
            )
            name = "vigil_gateway_request_bytes_held"
            wait_until(lambda: _metric(gateway, name) == len(held), 30, "the half-sent body held")

            status, headers, said = _post(url, other, content_type=PROTOBUF)
            assert status == 503 and headers.get("Retry-After") == "1", (status, said)
            assert b"VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT" in said
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
            pieces = (chunked[i : i + 16_384] for i in range(0, len(chunked), 16_384))
            connection.request("POST", "/v1/traces", pieces, encode_chunked=True,
                               headers={"Content-Type": PROTOBUF,
                                        "Authorization": f"Bearer {ACME_KEY}"})  # fmt: skip
            reply = connection.getresponse()
            assert reply.status == 503 and b"VIGIL_GATEWAY" in reply.read()
            connection.close()
            code, message, trailers = _grpc_export(gateway, over_grpc)
            assert code == grpc.StatusCode.UNAVAILABLE and b"IN_FLIGHT" in message, message
            assert RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"]).retry_delay.seconds
            assert _metric(gateway, "vigil_gateway_busy_total") == 3
            assert _metric(gateway, name) == len(held)  # the refused gave back what they took

            # a gRPC call needs room for VIGIL_GATEWAY_MAX_BYTES (300,000) before its message
            # is read: it waits (at most ROOM_WAIT) while the body is held
            waited: list[grpc.StatusCode] = []
            waiter = threading.Thread(target=lambda: waited.append(_grpc_export(gateway, waits)[0]))
            waiter.start()
            deadline = time.monotonic() + 30
            while _metric(gateway, "vigil_gateway_requests_waiting") != 1:
                assert time.monotonic() < deadline and not waited, waited
            assert _metric(gateway, name) == len(held)  # its message not taken

            sender.sendall(held[len(held) // 2 :])
            answer = sender.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
            waiter.join(30)
            assert waited == [grpc.StatusCode.OK]
            assert _metric(gateway, "vigil_gateway_busy_total") == 3
        wait_until(lambda: _metric(gateway, name) == 0, 30, "the bytes given back")
        assert _post(url, other, content_type=PROTOBUF)[0] == 200
        status, _, said = _post(url, chunked, content_type=PROTOBUF)
        assert status == 200, said
        assert _grpc_export(gateway, over_grpc)[0] == grpc.StatusCode.OK
        assert _metric(gateway, name) == 0
    finally:
        assert gateway.stop() == 0, gateway.log_path.read_text()[-2000:]
    sent = {
        f"{first + i:032x}"
        for first, spans in ((0xA0000, 1_600), (0xB0000, 1_200), (0xC0000, 1_200),
                             (0xD0000, 1_200), (0xE0000, 1_200), (0xF0000, 1))
        for i in range(spans)
    }  # fmt: skip
    published = _trace_ids(settings.bootstrap, settings.topics.raw, sent.issubset)
    assert len(published) == len(sent) and set(published) == sent
