"""The bad-input corpus (33 kinds) through raw bytes on the topic, the SDK and the gateway,
and spans the event schema cannot hold through the OpenTelemetry exporter: each one rejected
into the DLQ with its own reason, none stopping the pipeline, every valid event around them
stored."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from connectors.otel import VigilSpanExporter
from connectors.sdk import Emitter
from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.events import Event, Interaction, event_from_avro
from pipeline.services import GatewayProcess, WorkerProcess, free_port
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from pipeline.workload import bad_corpus
from tests.integration.conftest import count, wait_until

pytestmark = pytest.mark.integration
KEY = "corpus-key-0123456789abcdef"


def _valid(i: int) -> Event:
    return Event(event_id=f"ok-{i}", kind="interaction", ts=datetime.now(UTC), tenant_id="acme",
                 agent_id="corpus-bot", body=Interaction("openai", "gpt-4o", input_tokens=9))  # fmt: skip


def _otlp(spans: list[dict]) -> bytes:  # type: ignore[type-arg]
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}).encode()


def _span(i: int, start_ns: int, attrs: dict) -> dict:  # type: ignore[type-arg]
    values = {"gen_ai.provider.name": {"stringValue": "openai"},
              "gen_ai.request.model": {"stringValue": "gpt-4o"}, **attrs}  # fmt: skip
    return {"traceId": f"{0xBAD000 + i:032x}", "spanId": f"{i + 1:016x}", "name": "chat",
            "startTimeUnixNano": str(start_ns), "endTimeUnixNano": str(start_ns + 10**6),
            "attributes": [{"key": k, "value": v} for k, v in values.items()]}  # fmt: skip


def test_every_kind_of_bad_input_is_rejected_with_its_reason(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "vigil.yaml"
    config.write_text("tenants:\n  acme: {api_keys_env: CORPUS_KEYS}\n")
    env = {**vigil_env, "VIGIL_CONFIG": str(config), "CORPUS_KEYS": KEY}
    settings = Settings.from_env(env)
    ensure_topics(settings)
    now = datetime.now(UTC)
    corpus = bad_corpus(now, settings.limits.max_payload_bytes)
    assert len(corpus) >= 25
    worker = WorkerProcess(settings, env)
    store = worker.start()
    assert store is not None
    gateway = GatewayProcess(settings, free_port(), env)
    url = f"{gateway.start()}/v1/traces"
    emitter = Emitter(settings.bootstrap, settings.topics.raw,
                      config={"message.max.bytes": 4_000_000})  # fmt: skip
    registry = Registry.load()
    try:
        # 1. raw bytes on the topic, valid events between them
        for i, bad in enumerate(corpus.values()):
            emitter.emit(_valid(i))
            emitter.emit_raw(bad.key, bad.value)
        # 2. through the SDK: the contract-breaking events, as an agent would emit them
        sdk_cases = {}
        for name, bad in corpus.items():
            try:
                event = event_from_avro(registry.decode(bad.value, EVENT_SCHEMA))
            except Exception:  # broken bytes cannot be an Event: raw-only kinds
                continue
            if bad.reason_code == "oversized":
                continue
            sdk_cases[name] = bad.reason_code
            # the agent id marks where it came from (but for the empty-agent case itself)
            agent = f"sdk-{name}" if event.agent_id.strip() else event.agent_id
            emitter.emit(dataclasses.replace(event, agent_id=agent))
        emitter.flush()
        # 3. through the gateway: OTLP spans that break the contract; undecodable bodies get 400
        start = time.time_ns()
        spans = [
            _span(1, start, {"gen_ai.usage.input_tokens": {"intValue": "-3"}}),
            _span(2, start - 3650 * 86400 * 10**9, {}),
            _span(3, start, {f"a{i}": {"stringValue": "v"} for i in range(400)}),
            _span(4, start, {"gen_ai.usage.output_tokens": {"intValue": "80000000"}}),
            _span(5, start, {}),  # valid
            _span(6, start, {"vigil.reported_cost_usd": {"doubleValue": 4e12}}),
            _span(7, start, {"gen_ai.request.model": {"stringValue": "gpt-\ud800"}}),  # OTLP/JSON
        ]
        request = urllib.request.Request(url, data=_otlp(spans), method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert json.loads(reply.read())["partialSuccess"]["rejectedSpans"] == "6"
        nested = b'{"resourceSpans": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
        bad_request = urllib.request.Request(url, data=nested, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad_request, timeout=30)
        assert refused.value.code == 400
        # 4. through the OpenTelemetry exporter: spans whose events the schema cannot hold, in
        # one batch with a valid span, which must not be lost with them
        provider = TracerProvider(resource=Resource.create({"service.name": "exporter-bot"}))
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("corpus")
        for attrs in ({"gen_ai.usage.input_tokens": "9" * 30},  # past 64 bits
                      {"gen_ai.request.model": "gpt-\ud800"},  # a lone surrogate
                      {"vigil.event_id": "exported-ok"}):  # fmt: skip
            with tracer.start_as_current_span("chat", attributes={"gen_ai.system": "openai",
                                                                  **attrs}):  # fmt: skip
                pass
        exporter = VigilSpanExporter(emitter, tenant_id="acme")
        assert exporter.export(memory.get_finished_spans()) == SpanExportResult.SUCCESS
        emitter.flush()

        expected = len(corpus) + len(sdk_cases) + 6 + 2
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") >= expected, 120,
                   f"{expected} dead letters")  # fmt: skip
        letters = store.query_rows("SELECT stage, reason_code, origin_key, reason FROM vigil.dlq")
        raw_reasons = {}
        for stage, code, key, reason in letters:
            name = base64.b64decode(key).decode().split("/", 1)[1] if key else ""
            if stage == "validate" and name in corpus:
                raw_reasons[name] = code
                assert reason, name  # a reason a person can act on
                if name == "oversized":  # the dead letter itself must fit in a Kafka message
                    assert "keeps the first 262,144 of" in reason
        assert raw_reasons == {n: b.reason_code for n, b in corpus.items()}
        agent = {key: base64.b64decode(key).decode().split("/", 1)[1] for _, _, key, _ in letters
                 if key}  # fmt: skip
        sdk = Counter(code for stage, code, key, _ in letters if stage == "validate"
                      and agent[key] not in corpus and agent[key] != "exporter-bot")  # fmt: skip
        exported = sorted(reason for stage, code, key, reason in letters
                          if key and agent[key] == "exporter-bot" and code == "unencodable")  # fmt: skip
        assert len(exported) == 2, letters
        assert "OverflowError" in exported[0] and "UnicodeEncodeError" in exported[1]
        assert sdk == Counter(sdk_cases.values()) and len(sdk_cases) >= 18
        gateway_codes = sorted(code for stage, code, *_ in letters if stage == "gateway")
        assert gateway_codes == [
            "negative_value",
            "out_of_range",
            "out_of_range",
            "timestamp_past",
            "too_many_attributes",
            "unencodable",
        ]
        # none of it stopped the pipeline: every valid event is stored, and new ones still are
        emitter.emit(_valid(999))
        emitter.flush()
        sql = "SELECT count() FROM vigil.audit_log WHERE startsWith(event_id, 'ok-')"
        wait_until(lambda: count(store, sql) == len(corpus) + 1, 60, "the valid events")
        span_sql = f"SELECT count() FROM vigil.audit_log WHERE trace_id = '{0xBAD005:032x}'"
        wait_until(lambda: count(store, span_sql) == 1, 60, "the valid span from the gateway")
        exported_sql = "SELECT count() FROM vigil.audit_log WHERE event_id = 'exported-ok'"
        wait_until(lambda: count(store, exported_sql) == 1, 60, "the exporter's valid span")
        assert worker.alive()
    finally:
        emitter.close()
        gateway.stop()
        assert worker.stop() == 0, worker.tail()
