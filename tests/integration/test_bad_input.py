"""The bad-input corpus (33 kinds) through raw bytes on the topic, the SDK and the gateway,
and spans the event schema cannot hold through the OpenTelemetry exporter: each one rejected
into the DLQ with its own reason, none stopping the pipeline, every valid event around them
stored."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
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
from pipeline.owner import RemoteStore
from pipeline.producer import KafkaSender, Unavailable
from pipeline.services import GatewayProcess, WorkerProcess, free_port
from pipeline.settings import Settings
from pipeline.topics import batch_bytes, ensure_topics, message_bytes
from pipeline.workload import bad_corpus
from tests.integration.conftest import count, topic_takes, wait_until

pytestmark = pytest.mark.integration
KEY = "corpus-key-0123456789abcdef"


def _valid(i: int) -> Event:
    return Event(event_id=f"ok-{i}", kind="interaction", ts=datetime.now(UTC), tenant_id="acme",
                 agent_id="corpus-bot", body=Interaction("openai", "gpt-4o", input_tokens=9))  # fmt: skip


@contextmanager
def _worker_and_emitter(
    settings: Settings, env: dict[str, str]
) -> Iterator[tuple[WorkerProcess, RemoteStore, Emitter]]:
    """A worker of ``settings`` serving its embedded store, and an emitter to its raw topic as
    an agent makes one (librdkafka's sizes: nothing asked of the topic); on leaving, the emitter
    closed and the worker stopped, cleanly."""
    worker = WorkerProcess(settings, env)
    store = worker.start()
    assert store is not None
    emitter = Emitter(settings.bootstrap, settings.topics.raw)  # librdkafka's 1,000,000 bytes
    try:
        yield worker, store, emitter
    finally:
        try:
            emitter.close()  # raises for what it did not deliver: the worker stopped all the same
        finally:
            assert worker.stop() == 0, worker.tail()


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


def test_messages_each_within_the_clean_topic_are_not_refused_together(
    vigil_env: dict[str, str],
) -> None:
    """librdkafka packs messages into record batches of up to 1,000,000 bytes, and a topic's
    max.message.bytes holds a whole batch: to a clean topic taking 300,000, events of 140,000
    bytes, each within it, were refused together, and the worker sent them again for ever."""
    settings = Settings.from_env(vigil_env)
    topic_takes(settings, settings.topics.clean, 300_000)
    written = message_bytes(settings, [settings.topics.clean, settings.topics.dlq])
    assert batch_bytes(written.values()) == 298_976
    unknown = message_bytes(settings, [settings.topics.raw, "vigil-no-such-topic"])
    assert batch_bytes(unknown.values()) == 1_000_000
    _all_stored(settings, vigil_env, events=8, text_bytes=140_000)


def test_event_batches_on_the_clean_topic_are_no_larger_than_it_takes(
    vigil_env: dict[str, str],
) -> None:
    """The validator packs clean events into EventBatch messages of up to 192 KiB: a clean
    topic taking less refused each such message by itself, and the worker sent it again for
    ever, though every event in it was within the topic's limit."""
    settings = Settings.from_env(vigil_env)
    topic_takes(settings, settings.topics.clean, 100_000)
    _all_stored(settings, vigil_env, events=300, text_bytes=900)  # one tenant: one key


def _all_stored(settings: Settings, env: dict[str, str], events: int, text_bytes: int) -> None:
    """Emit ``events`` events of ``text_bytes`` random letters (lz4 finds few repeats in them:
    a batch stays near its size) to a worker, and assert every one stored, none a dead letter."""
    rng = random.Random(7)
    with _worker_and_emitter(settings, env) as (worker, store, emitter):
        for i in range(events):
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(text_bytes))
            emitter.emit(dataclasses.replace(_valid(0), event_id=f"many-{i}", body=Interaction(
                "openai", "gpt-4o", input_tokens=9, input_text=text)))  # fmt: skip
        assert emitter.flush() == 0
        sql = "SELECT count() FROM vigil.audit_log WHERE startsWith(event_id, 'many-')"
        wait_until(lambda: count(store, sql) == events, 90, f"the {events} events stored",
                   worker.tail)  # fmt: skip
        assert count(store, "SELECT count() FROM vigil.dlq") == 0
        assert worker.alive()


def test_a_limit_lowered_while_sending_makes_batches_smaller_and_a_message_over_it_is_named(
    vigil_env: dict[str, str], sender: KafkaSender, caplog: pytest.LogCaptureFixture
) -> None:
    # the sizes a process sends by are read at start: a topic's limit lowered after that
    # refused batches of messages each within it at every retry, until a restart; now the
    # producer makes its batches smaller, and only a message over the limit by itself is
    # refused, its error saying that a restart reads the limit again
    settings = Settings.from_env(vigil_env)
    topic_takes(settings, settings.topics.clean, 300_000)
    rng = random.Random(3)
    records = [(settings.topics.clean, b"acme", rng.randbytes(140_000)) for _ in range(6)]
    with caplog.at_level("WARNING", logger="vigil.producer"):
        asyncio.run(sender.send(records, timeout=60))
    assert "refused a record batch as too large" in caplog.text
    record = (settings.topics.clean, b"acme", rng.randbytes(400_000))
    with pytest.raises(Unavailable) as refused:
        asyncio.run(sender.send([record], timeout=60))
    assert str(refused.value).startswith(f"{settings.topics.clean}: KafkaError{{code=MSG_SIZE")
    assert str(refused.value).endswith("where it may not DESCRIBE_CONFIGS the topic)")
    assert refused.value.too_large


def test_a_limit_lowered_while_the_worker_runs_is_read_again(
    vigil_env: dict[str, str],
) -> None:
    """The worker sized clean events by the clean topic's limit as read at start: one lowered
    since refused an event between the two limits, and the worker sent it again for ever, every
    event after it held, until it was restarted."""
    settings = Settings.from_env(vigil_env)
    rng = random.Random(23)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(400_000))
    with _worker_and_emitter(settings, vigil_env) as (worker, store, emitter):
        emitter.emit(dataclasses.replace(_valid(0), event_id="before"))
        sql = "SELECT count() FROM vigil.audit_log WHERE event_id IN ('before', 'after')"
        wait_until(lambda: count(store, sql) == 1, 60, "the event before stored", worker.tail)
        topic_takes(settings, settings.topics.clean, 300_000)
        emitter.emit(dataclasses.replace(_valid(0), event_id="between", body=Interaction(
            "openai", "gpt-4o", input_tokens=9, input_text=text)))  # fmt: skip
        assert emitter.flush() == 0
        log = worker.log_path
        assert log is not None
        wait_until(lambda: "records failed, retrying" in log.read_text(), 60, "the refusal")
        emitter.emit(dataclasses.replace(_valid(0), event_id="after"))  # a batch after it
        assert emitter.flush() == 0
        wait_until(lambda: count(store, sql) == 2, 90, "the event after stored", worker.tail)
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") == 1, 60, "a letter")
        [(code, reason)] = store.query_rows("SELECT reason_code, reason FROM vigil.dlq")
        assert code == "oversized"
        assert "the clean topic takes 298,976 at most" in reason
        assert "max.message.bytes read again" in log.read_text()


def test_a_dead_letter_keeps_what_a_smaller_dlq_takes_and_the_worker_goes_on(
    vigil_env: dict[str, str],
) -> None:
    """A dead letter keeps up to 256 KiB of its input: a DLQ taking less refused the letter
    of a large input, and the worker sent it again for ever, its validation held."""
    settings = Settings.from_env(vigil_env)
    topic_takes(settings, settings.topics.dlq, 100_000)
    with _worker_and_emitter(settings, vigil_env) as (worker, store, emitter):
        # no Avro: a dead letter; random, so that lz4 leaves the batch about as large
        emitter.emit_raw(b"acme/large", b"\x07" + random.Random(13).randbytes(299_999))
        emitter.emit(dataclasses.replace(_valid(0), event_id="after"))
        assert emitter.flush() == 0
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") == 1, 60, "a letter",
                   worker.tail)  # fmt: skip
        [(code, reason, kept)] = store.query_rows(
            "SELECT reason_code, reason, payload_bytes FROM vigil.dlq")  # fmt: skip
        assert code == "bad_magic" and kept == 100_000 - 16_384
        assert reason.endswith("(dead letter keeps the first 83,616 of 300,000 bytes)")
        sql = "SELECT count() FROM vigil.audit_log WHERE event_id = 'after'"
        wait_until(lambda: count(store, sql) == 1, 60, "the event after it stored", worker.tail)
        assert worker.alive()


def test_a_dlq_limit_lowered_while_the_worker_runs_is_read_again_for_the_ledgers_letters(
    vigil_env: dict[str, str],
) -> None:
    """What the ledger rejects is a dead letter sized by the DLQ's limit as read at start: one
    lowered since refused it, and the worker sent it again for ever, the clean batch behind it
    never acknowledged."""
    settings = Settings.from_env(vigil_env)
    with _worker_and_emitter(settings, vigil_env) as (worker, store, _):
        topic_takes(settings, settings.topics.dlq, 100_000)
        on_clean = Emitter(settings.bootstrap, settings.topics.clean)
        try:  # not an EventBatch: the ledger's to reject; random, so lz4 keeps its size
            on_clean.emit_raw(b"acme", b"\x07" + random.Random(31).randbytes(299_999))
            assert on_clean.flush() == 0
        finally:
            on_clean.close()
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") == 1, 60, "a letter",
                   worker.tail)  # fmt: skip
        [(stage, code, kept)] = store.query_rows(
            "SELECT stage, reason_code, payload_bytes FROM vigil.dlq")  # fmt: skip
        assert (stage, code, kept) == ("ledger", "bad_magic", 100_000 - 16_384)
        assert worker.log_path is not None
        assert "max.message.bytes read again" in worker.log_path.read_text()


def test_an_event_larger_than_the_raw_topic_takes_is_a_dead_letter_named_by_its_ids(
    vigil_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """An agent's emitter does not know the raw topic's max.message.bytes: an event within its
    own message.max.bytes but over the topic's was refused, counted not delivered, and gone."""
    settings = Settings.from_env(vigil_env)
    topic_takes(settings, settings.topics.raw, 300_000)
    rng = random.Random(17)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(400_000))
    with _worker_and_emitter(settings, vigil_env) as (worker, store, emitter):
        with caplog.at_level("WARNING"):
            emitter.emit(dataclasses.replace(_valid(0), event_id="over-raw", body=Interaction(
                "openai", "gpt-4o", input_tokens=9, input_text=text)))  # fmt: skip
            emitter.emit(dataclasses.replace(_valid(0), event_id="small"))
            # no flush and no emit after: the emitter's own thread serves the reports
            wait_until(lambda: emitter.delivered == 2, 60, "both delivered while idle")
        assert (emitter.delivered, emitter.failed) == (2, 0)
        assert re.search(
            rf"event 'over-raw' is 400\d{{3}} bytes encoded, more than "
            rf"{settings.topics.raw} takes; sent for the dead-letter",
            caplog.text,
        )
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") == 1, 60, "a letter",
                   worker.tail)  # fmt: skip
        [(code, reason, payload)] = store.query_rows(
            "SELECT reason_code, reason, payload FROM vigil.dlq")  # fmt: skip
        assert code == "oversized"
        assert f"{settings.topics.raw} refused it as larger than it takes" in reason
        assert json.loads(payload)["event"]["event_id"] == "over-raw"
        sql = "SELECT count() FROM vigil.audit_log WHERE event_id = 'small'"
        wait_until(lambda: count(store, sql) == 1, 60, "the small event stored", worker.tail)


def test_what_no_topic_would_carry_is_a_dead_letter_and_the_worker_goes_on(
    vigil_env: dict[str, str],
) -> None:
    """An event larger than the clean topic takes, one larger than the SDK's producer sends, a
    key of 600 KB: each was a KafkaException, out of the worker (which stopped, and stopped
    again at each restart, the pipeline held) or out of the agent's emit."""
    settings = Settings.from_env(vigil_env)
    topic_takes(settings, settings.topics.clean, 300_000)

    def event(event_id: str, text_bytes: int) -> Event:
        return dataclasses.replace(_valid(0), event_id=event_id, body=Interaction(
            "openai", "gpt-4o", input_tokens=9, input_text="x" * text_bytes))  # fmt: skip

    with _worker_and_emitter(settings, vigil_env) as (worker, store, emitter):
        emitter.emit(event("over-clean", 400_000))
        emitter.emit(event("over-emitter", 1_100_000))
        emitter.emit_raw(b"acme/" + b"k" * 600_000, b"\x07" * 300_000)
        with pytest.raises(ValueError, match=r"a message of 1,000,001 bytes .* is more than this"):
            emitter.emit_raw(b"k", b"v" * 1_000_000)
        emitter.emit(event("fits", 200_000))
        emitter.emit(event("small", 0))
        assert emitter.flush() == 0
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") >= 3, 60, "3 letters")
        sql = "SELECT event_id FROM vigil.audit_log ORDER BY event_id"
        wait_until(lambda: store.query_rows(sql) == [("fits",), ("small",)], 60, "2 stored")
        letters = sorted(store.query_rows(
            "SELECT reason_code, reason, length(base64Decode(origin_key)) FROM vigil.dlq"))  # fmt: skip
        assert [code for code, _, _ in letters] == ["bad_magic", "oversized", "oversized"]
        assert letters[0][1].endswith("(its key keeps the first 1,024 of 600,005 bytes)")
        assert letters[0][2] == 1024
        reasons = sorted(reason for code, reason, _ in letters if code == "oversized")
        assert reasons[0].startswith("payload: its emitter could not encode the event: "
                                     "oversized: the event is 1,100,")  # fmt: skip
        assert reasons[0].endswith("its emitter sends 1,000,000 at most (message.max.bytes)")
        assert reasons[1].startswith("the event is 400,")
        assert reasons[1].endswith("bytes validated and enriched; the clean topic takes 298,976 "
                                   "at most (its max.message.bytes) (dead letter keeps the "
                                   "first 262,144 of 400,101 bytes)")  # fmt: skip
        assert worker.alive()
