"""Faults the pipeline must ride out with nothing lost or duplicated, by event_id accounting."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.sdk import Emitter
from pipeline.events import Event, Interaction
from pipeline.kafkaconn import KafkaConnection
from pipeline.lag import consumer_lag
from pipeline.ledger import Retention, verify
from pipeline.producer import KafkaSender, RenewingProducer
from pipeline.services import WorkerProcess, free_port
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from pipeline.worker import raw_group
from tests.conftest import http_get
from tests.integration.conftest import count, events_on, start_worker, wait_until

pytestmark = pytest.mark.integration


def test_clickhouse_outage_holds_the_backlog_in_kafka_and_catches_up(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    outage = tmp_path / "clickhouse-down"
    env = {**vigil_env, "VIGIL_FAULT_STORE_OUTAGE_FILE": str(outage)}
    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    total = 3000
    try:
        outage.touch()  # ClickHouse goes away
        for i in range(total):
            emitter.emit(Event(event_id=f"o-{i}", kind="interaction", ts=datetime.now(UTC),
                               tenant_id="acme", agent_id=f"a{i % 5}",
                               body=Interaction("openai", "gpt-4o", input_tokens=i)))  # fmt: skip
        emitter.flush()
        time.sleep(8)
        assert count(store, "SELECT count() FROM vigil.audit_log") == 0  # nothing half-written
        assert worker.alive()  # backing off, not crashing
        log = worker.tail(400)
        assert "retrying in" in log and "fault injected" in log
        outage.unlink()  # it comes back: the backlog waiting in Kafka is written, once
        sql = "SELECT count() FROM vigil.audit_log"
        wait_until(lambda: count(store, sql) >= total, 90, f"{total} events after the outage",
                   worker.tail)  # fmt: skip
        time.sleep(2)
        stored, distinct, tokens = store.query_rows(
            "SELECT count(), uniqExact(event_id), sum(input_tokens) FROM vigil.audit_log"
        )[0]
        assert (int(stored), int(distinct), int(tokens)) == (total, total, sum(range(total))), (
            worker.tail(60)  # what the worker said last (its progress line), when it fails in CI
        )
        verdict = verify(store, Retention())
        assert verdict.ok and verdict.rows == total
    finally:
        outage.unlink(missing_ok=True)
        emitter.close()
        assert worker.stop() == 0, worker.tail()


def test_broker_restart_while_the_sdk_the_exporter_and_the_gateway_produce(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    """The SDK, the Vigil exporter, a client posting OTLP/JSON and the standard OTLP/gRPC
    exporter all sending while the broker is down for 6 s: every event stored once."""
    import json
    import threading
    import urllib.error
    import urllib.request

    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from connectors.otel import VigilSpanExporter
    from pipeline.devkafka import LocalKafka, fetch_jars
    from pipeline.services import GatewayProcess, free_port

    key = "restart-key-0123456789abcdef"
    config = tmp_path / "vigil.yaml"
    config.write_text("tenants:\n  acme: {api_keys_env: RESTART_KEYS}\n")
    broker = LocalKafka(tmp_path / "kafka", fetch_jars(Settings.from_env(vigil_env).cache_dir),
                        free_port(2))  # fmt: skip
    broker.start()
    env = {**vigil_env, "VIGIL_KAFKA_BOOTSTRAP": broker.bootstrap, "VIGIL_CONFIG": str(config),
           "RESTART_KEYS": key, "VIGIL_GATEWAY_DELIVERY_TIMEOUT_SECONDS": "2"}  # fmt: skip
    settings = Settings.from_env(env)
    ensure_topics(settings)
    worker = WorkerProcess(settings, env)
    worker.start()
    gateway = GatewayProcess(settings, free_port(), env, grpc_port=free_port())
    url = f"{gateway.start()}/v1/traces"
    n_sdk, n_spans, n_requests, n_grpc = 1500, 300, 40, 200
    sdk = Emitter(settings.bootstrap, settings.topics.raw)
    provider = TracerProvider(resource=Resource.create({"service.name": "restart-agent"}))
    span_emitter = Emitter(settings.bootstrap, settings.topics.raw)
    provider.add_span_processor(
        BatchSpanProcessor(VigilSpanExporter(span_emitter, tenant_id="acme"))
    )
    tracer = provider.get_tracer("t")
    # as OTLP/gRPC exporters do, it retries UNAVAILABLE after the RetryInfo the gateway sends,
    # for up to its timeout: 10 s by default, which a 6 s outage and the broker's start outlast
    grpc_provider = TracerProvider(resource=Resource.create({"service.name": "grpc-agent"}))
    grpc_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=f"127.0.0.1:{gateway.grpc_port}", insecure=True, timeout=90,
        headers={"authorization": f"Bearer {key}"})))  # fmt: skip
    grpc_tracer = grpc_provider.get_tracer("t")
    answered: list[int] = []

    def by_sdk() -> None:
        for i in range(n_sdk):
            sdk.emit(Event(event_id=f"sdk-{i}", kind="interaction", ts=datetime.now(UTC),
                           tenant_id="acme", agent_id="sdk-agent",
                           body=Interaction("openai", "gpt-4o", input_tokens=1)))  # fmt: skip
            time.sleep(0.008)

    def by_exporter() -> None:
        for i in range(n_spans):
            with tracer.start_as_current_span("chat") as span:
                span.set_attribute("gen_ai.provider.name", "openai")
                span.set_attribute("gen_ai.request.model", "gpt-4o")
                span.set_attribute("vigil.event_id", f"otel-{i}")
            time.sleep(0.04)

    def by_grpc() -> None:
        for _ in range(n_grpc):
            with grpc_tracer.start_as_current_span("chat") as span:
                span.set_attribute("gen_ai.provider.name", "openai")
                span.set_attribute("gen_ai.request.model", "gpt-4o")
            time.sleep(0.05)

    def by_gateway() -> None:  # a client that retries as OTLP says: on 429/503, after a pause
        for r in range(n_requests):
            now = time.time_ns()
            spans = [{"traceId": f"{0xFEE000 + r:032x}", "spanId": f"{s + 1:016x}", "name": "chat",
                      "startTimeUnixNano": str(now), "endTimeUnixNano": str(now + 10**6),
                      "attributes": [{"key": "gen_ai.provider.name", "value": {"stringValue": "openai"}}]}
                     for s in range(10)]  # fmt: skip
            body = json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}).encode()
            while True:
                request = urllib.request.Request(url, data=body, method="POST", headers={
                    "Content-Type": "application/json", "Authorization": f"Bearer {key}"})  # fmt: skip
                try:
                    with urllib.request.urlopen(request, timeout=30) as reply:
                        answered.append(reply.status)
                        break
                except urllib.error.HTTPError as err:
                    assert err.code in (429, 503), err.code
                    time.sleep(1)
            time.sleep(0.25)

    threads = [threading.Thread(target=f) for f in (by_sdk, by_exporter, by_gateway, by_grpc)]
    try:
        for t in threads:
            t.start()
        time.sleep(4)
        broker.stop()  # the broker goes down mid-stream...
        time.sleep(6)
        broker.start()  # ...and comes back
        for t in threads:
            t.join(300)
        assert provider.force_flush(120_000) and grpc_provider.force_flush(120_000)
        sdk.close()
        span_emitter.close()
        total = n_sdk + n_spans + n_requests * 10 + n_grpc
        deadline = time.monotonic() + 180
        store = None
        while time.monotonic() < deadline:
            if not worker.alive():  # as its supervisor (compose: restart) would
                worker.start()
            from pipeline.owner import find_owner

            store = find_owner(settings.home)
            if store is not None and count(store, "SELECT count() FROM vigil.audit_log") >= total:
                break
            time.sleep(1)
        assert store is not None
        time.sleep(2)
        stored, distinct = store.query_rows(
            "SELECT count(), uniqExact(event_id) FROM vigil.audit_log"
        )[0]
        assert (int(stored), int(distinct)) == (total, total), worker.tail(60)
        assert answered == [200] * n_requests
        assert verify(store, Retention()).ok
    finally:
        provider.shutdown()
        grpc_provider.shutdown()
        gateway.stop()
        worker.stop()
        broker.stop()
        # shown by pytest only when the test fails: what each part said across the restart
        for name, path in (("broker", broker.log_path), ("gateway", gateway.log_path)):
            print(f"--- the {name}'s log, last lines ---\n{_tail(path, 80)}")
        print(f"--- the worker's log, last lines ---\n{worker.tail(80)}")


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def _lost_the_cluster(kafka: RenewingProducer, *, silent: bool = False) -> Iterator[None]:
    """Stand in for a producer librdkafka has left knowing no broker (librdkafka#5301, which
    no test can cause at will; the restart above met it in 2 of 26 runs): one with the same
    settings whose only broker address refuses connections, or (``silent``) takes them and
    answers nothing, so that no error is reported, as the worker's producer reported none."""
    with socket.socket() as hole:  # (its port is the silent one's)
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # never accepted: connections are made, and nothing answers
        port = hole.getsockname()[1] if silent else free_port()
        # (silent: and no timeout of its own within the test says that the connection is stuck)
        patient = (
            {
                "socket.connection.setup.timeout.ms": 600_000,
                "api.version.request.timeout.ms": 300_000,
            }
            if silent
            else {}
        )
        kafka.producer = Producer(
            {**kafka._config, **patient, "bootstrap.servers": f"127.0.0.1:{port}"}
        )
        yield


def test_an_emitter_that_knows_no_broker_is_renewed_and_sends_what_it_held(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("pipeline.producer.RENEW_AFTER_SECONDS", 1.0)
    topic = f"renew-{uuid.uuid4().hex[:8]}"
    emitter = Emitter(kafka_bootstrap, topic)
    with _lost_the_cluster(emitter._kafka), caplog.at_level(logging.WARNING, "vigil.producer"):
        _emit(emitter, "renew", 100)
        wait_until(lambda: emitter.flush(1) == 0 and emitter.delivered == 100, 90,
                   "the events sent by the renewed producer")  # fmt: skip
    emitter.close()
    assert (emitter.delivered, emitter.failed, emitter._kafka.renewed) == (100, 0, 1)
    assert "replaced by a new one, which sends again the 100 message(s)" in caplog.text
    ids = {e.event_id for e in events_on(kafka_bootstrap, topic, lambda seen: len(seen) >= 100)}
    assert ids == {f"renew-{i}" for i in range(100)}


@pytest.mark.parametrize("silent", [False, True], ids=["refused", "silent"])
def test_a_sender_that_knows_no_broker_is_renewed_and_its_send_completes(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, silent: bool
) -> None:
    monkeypatch.setattr("pipeline.producer.RENEW_AFTER_SECONDS", 1.0)
    topic = f"renew-{uuid.uuid4().hex[:8]}"
    sender = KafkaSender(KafkaConnection(kafka_bootstrap))
    records = [(topic, None, f"record-{i}".encode()) for i in range(50)]
    try:
        with _lost_the_cluster(sender._kafka, silent=silent):
            # the gateway's and the worker's way; the silent stand-in reports an error after a
            # minute (a request timing out), which would renew it without the stall seen
            asyncio.run(sender.send(records, timeout=45))
        assert sender._kafka.renewed == 1
    finally:
        assert sender.close(timeout=10) == 0
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"check-{topic}",
                         "auto.offset.reset": "earliest"})  # fmt: skip
    consumer.subscribe([topic])
    values: set[bytes] = set()
    deadline = time.monotonic() + 60
    while len(values) < 50 and time.monotonic() < deadline:
        values |= {m.value() or b"" for m in consumer.consume(100, timeout=1) if not m.error()}
    consumer.close()
    assert values == {value for _, _, value in records}


def _emit(emitter: Emitter, prefix: str, n: int) -> None:
    """``n`` interactions of acme's five agents, ids ``<prefix>-<i>``, delivered."""
    for i in range(n):
        emitter.emit(Event(event_id=f"{prefix}-{i}", kind="interaction", ts=datetime.now(UTC),
                           tenant_id="acme", agent_id=f"a{i % 5}",
                           body=Interaction("openai", "gpt-4o", input_tokens=i)))  # fmt: skip
    emitter.flush()


def test_the_worker_stops_on_sigterm_while_the_broker_does_not_answer(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    """A broker that takes connections and answers nothing (a partition that drops packets,
    a frozen host: here SIGSTOP) when the worker is told to stop: it exits within the 30 s an
    orchestrator gives it (it took about 90, waiting out aiokafka's request timeout), and what
    it held is stored once after both come back."""
    from pipeline.devkafka import LocalKafka, fetch_jars

    broker = LocalKafka(tmp_path / "kafka", fetch_jars(Settings.from_env(vigil_env).cache_dir),
                        free_port(2))  # fmt: skip
    broker.start()
    env = {**vigil_env, "VIGIL_KAFKA_BOOTSTRAP": broker.bootstrap}
    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    sql = "SELECT count() FROM vigil.audit_log"
    frozen = broker.pid()
    assert frozen is not None
    try:
        _emit(emitter, "first", 300)
        wait_until(lambda: count(store, sql) >= 300, 90, "300 events", worker.tail)
        os.kill(frozen, signal.SIGSTOP)
        time.sleep(2)
        code = worker.stop(timeout=30)  # SIGKILL past 30 s
        assert code == 0, f"exit code {code} (-9: killed after 30 s)\n{worker.tail(60)}"
        os.kill(frozen, signal.SIGCONT)
        _emit(emitter, "second", 200)
        store = worker.start()
        assert store is not None
        wait_until(lambda: count(store, sql) >= 500, 120, "500 events after", worker.tail)
        time.sleep(2)
        assert store.query_rows("SELECT count(), uniqExact(event_id) FROM vigil.audit_log") == [
            (500, 500)
        ]
    finally:
        os.kill(frozen, signal.SIGCONT)
        emitter.close()
        code = worker.stop()
        broker.stop()
    assert code == 0, worker.tail()


def test_clean_messages_retention_deletes_while_the_store_is_down_are_named(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    """ClickHouse away for longer than the clean topic keeps messages: the worker, retrying
    its insert, says once, at its next lag sample, which clean messages were deleted before it
    committed them, and stores what it still holds once when ClickHouse is back."""
    outage = tmp_path / "clickhouse-down"
    address = f"127.0.0.1:{free_port()}"
    env = {**vigil_env, "VIGIL_FAULT_STORE_OUTAGE_FILE": str(outage),
           "VIGIL_WORKER_HTTP_ADDRESS": address}  # fmt: skip
    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    sql = "SELECT count() FROM vigil.audit_log"
    clean = settings.topics.clean

    def retried_inserts() -> int:
        metrics = http_get(f"http://{address}/metrics")[1].splitlines()
        line = next(m for m in metrics if m.startswith('vigil_worker_retries_total{what="insert"}'))
        return int(line.split()[1])

    def behind() -> list[tuple[int, int, int]]:
        rows, _ = consumer_lag(settings.kafka, settings.consumer_group, [clean])
        return [(row[3], row[4], row[5]) for row in rows if row[5] > row[4]]

    try:
        _emit(emitter, "stored", 100)
        wait_until(lambda: count(store, sql) >= 100, 90, "100 events", worker.tail)
        # committed too (a group that never committed a partition reads it from its start:
        # nothing it committed is deleted there)
        wait_until(lambda: not behind(), 30, "clean committed to its end", worker.tail)
        assert retried_inserts() == 0
        outage.touch()
        _emit(emitter, "held", 100)
        wait_until(lambda: bool(behind()), 60, "events waiting on clean", worker.tail)
        partition, committed, _ = behind()[0]
        admin = AdminClient(settings.kafka.config())
        deleted = admin.delete_records([TopicPartition(clean, partition, committed + 1)])
        assert [f.result().low_watermark for f in deleted.values()] == [committed + 1]
        said = (
            f"{clean} partition {partition}: 1 message(s) (offsets {committed}-{committed}) were "
            f"deleted by the topic's retention before group {settings.consumer_group} committed "
            "them; those the worker had not fetched yet are lost"
        )
        wait_until(lambda: said in worker.tail(2000), 45, "the lost message named", worker.tail)
        assert retried_inserts() > 0  # what an operator's alert on /metrics sees
        outage.unlink()
        wait_until(lambda: not behind(), 90, "clean read to its end", worker.tail)
        time.sleep(2)
        stored, distinct, held = store.query_rows(
            "SELECT count(), uniqExact(event_id), countIf(event_id LIKE 'held-%') "
            "FROM vigil.audit_log"
        )[0]
        # none twice; the held events the worker had fetched (or taken from its hand-off)
        # before the message was deleted are stored, here usually all of them
        assert stored == distinct and held == stored - 100 and 100 <= stored <= 200
        assert worker.tail(100_000).count(said) == 1, "said once, not at every sample"
    finally:
        outage.unlink(missing_ok=True)
        emitter.close()
        assert worker.stop() == 0, worker.tail()


def test_messages_retention_deleted_unread_are_named_and_nothing_else_is_lost(
    vigil_env: dict[str, str],
) -> None:
    """The worker is down longer than the raw topic keeps messages: what retention deleted
    before it was read is lost, and the worker says which, at start; every event still kept is
    stored once."""
    worker, settings, store = start_worker(vigil_env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    sql = "SELECT count() FROM vigil.audit_log"
    try:
        _emit(emitter, "before", 300)
        wait_until(lambda: count(store, sql) >= 300, 90, "300 events", worker.tail)
        assert worker.stop() == 0, worker.tail()
        _emit(emitter, "while-down", 300)
        # retention deletes the first 3 unread messages of a partition, as it would a week on
        _, _, topic, partition, committed, end, _ = max(
            consumer_lag(settings.kafka, raw_group(settings), [settings.topics.raw])[0],
            key=lambda row: row[-1],
        )
        assert end - committed >= 3
        admin = AdminClient(settings.kafka.config())
        deleted = admin.delete_records([TopicPartition(topic, partition, committed + 3)])
        assert [f.result().low_watermark for f in deleted.values()] == [committed + 3]

        store = worker.start()
        assert store is not None
        wait_until(lambda: count(store, sql) >= 597, 90, "the 297 events kept", worker.tail)
        time.sleep(2)
        stored, distinct, later = store.query_rows(
            "SELECT count(), uniqExact(event_id), countIf(event_id LIKE 'while-down-%') "
            "FROM vigil.audit_log"
        )[0]
        assert (stored, distinct, later) == (597, 597, 297), worker.tail(60)
    finally:
        emitter.close()
        code = worker.stop()
    said = worker.tail(100_000)
    assert code == 0, said[-3000:]
    assert (
        f"ERROR vigil.worker: {topic} partition {partition}: 3 message(s) (offsets "
        f"{committed}-{committed + 2}) were deleted by the topic's retention before group "
        f"{raw_group(settings)} read them, and are lost; it reads on from offset {committed + 3}"
    ) in said, said[-3000:]


def test_the_worker_stops_on_sigterm_while_the_broker_is_down(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    """A deploy or a node drain during a broker outage: SIGTERM ends the worker by itself, and
    what it had not committed is stored once after both come back.

    It hung until SIGKILL before, for two reasons this reproduces every time: aiokafka's fetcher
    let a CancelledError out of its close, and a commit retried forever. Dead letters and
    events are fetched while ClickHouse is away. Once it is back, after the broker went down,
    a retry within 5 s of the broker's last answered heartbeat stores them (their offsets
    cannot be committed any more, so they are read again and must be stored once); a later one
    waits for the broker (``pipeline.fence``) until the worker stops. Meanwhile the Kafka
    clients' failed connections are logged once per kind and 30 s, not 80 times a second."""
    from pipeline.devkafka import LocalKafka, fetch_jars
    from pipeline.services import free_port

    broker = LocalKafka(tmp_path / "kafka", fetch_jars(Settings.from_env(vigil_env).cache_dir),
                        free_port(2))  # fmt: skip
    broker.start()
    outage = tmp_path / "clickhouse-down"
    env = {**vigil_env, "VIGIL_KAFKA_BOOTSTRAP": broker.bootstrap,
           "VIGIL_FAULT_STORE_OUTAGE_FILE": str(outage)}  # fmt: skip
    worker, settings, store = start_worker(env)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    events = "SELECT count() FROM vigil.audit_log"
    letters = "SELECT count() FROM vigil.dlq"

    def emit(first: int, n: int) -> None:
        for i in range(first, first + n):
            emitter.emit(Event(event_id=f"down-{i}", kind="interaction", ts=datetime.now(UTC),
                               tenant_id="acme", agent_id=f"a{i % 3}",
                               body=Interaction("openai", "gpt-4o", input_tokens=i)))  # fmt: skip
            if i % 5 == 0:
                emitter.emit_raw(b"acme/bad", b"\x00\x00\x00\x00\x04not avro " + str(i).encode())
        emitter.flush()

    try:
        emit(0, 500)
        wait_until(lambda: count(store, events) >= 500 and count(store, letters) >= 100, 60,
                   "the first events and dead letters stored", worker.tail)  # fmt: skip
        outage.touch()
        emit(500, 500)
        wait_until(lambda: "dlq: insert of" in worker.tail(400), 60, "dead letters held back",
                   worker.tail)  # fmt: skip
        broker.stop()
        outage.unlink()
        # some or all of the second hundred, fetched before the broker went down, stored after
        # it; or, if the retry came later, held until the broker answers again
        wait_until(lambda: count(store, letters) > 100 or "writes wait for it" in worker.tail(400),
                   60, "dead letters stored, or held for the broker", worker.tail)  # fmt: skip
        time.sleep(3)
        code = worker.stop(timeout=40)
        assert code == 0, f"exit code {code} (-9: killed after 40 s)\n{worker.tail(60)}"
        # the Kafka clients' failed connections, held back to one line of a kind per 30 s
        # (about 80 lines a second before)
        refused = [line for line in worker.tail(100_000).splitlines()
                   if "Connection refused" in line or "Connect call failed" in line]  # fmt: skip
        assert 0 < len(refused) <= 20, "\n".join(refused[:40])
        broker.start()
        emit(1000, 500)
        store = worker.start()
        assert store is not None
        wait_until(lambda: count(store, events) >= 1500, 120, "1,500 events after the outage",
                   worker.tail)  # fmt: skip
        time.sleep(2)
        stored, distinct, tokens = store.query_rows(
            "SELECT count(), uniqExact(event_id), sum(input_tokens) FROM vigil.audit_log"
        )[0]
        assert (int(stored), int(distinct), int(tokens)) == (1500, 1500, sum(range(1500))), (
            worker.tail(60)
        )
        assert count(store, letters) == 300  # each once, though stored before a lost commit
        assert verify(store, Retention()).ok
    finally:
        outage.unlink(missing_ok=True)
        emitter.close()
        worker.stop()
        broker.stop()
