"""End to end on the local stack: one worker, produce -> validate -> redact -> enrich -> ledger
(chained) -> rollups -> stored and queryable, against a baseline measured in the same run: the
same bytes copied raw from the topic into ClickHouse by a minimal confluent-kafka consumer with
clickhouse-connect batch inserts. Then freshness (event time to queryable) at half the measured
capacity, and the worker's peak RSS.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.devkafka import LocalKafka, fetch_jars
from pipeline.events import event_to_avro
from pipeline.services import WorkerProcess, free_port
from pipeline.settings import Settings
from pipeline.store import connect
from pipeline.topics import ensure_topics
from pipeline.workload import generate

EVENTS = 60_000
FRESHNESS_SECONDS = 20


def _payloads(n: int, now: datetime) -> list[tuple[bytes, bytes]]:
    registry = Registry.load()
    events = generate(n, now, seed=5, run_id="e2e", bad_fraction=0.0).events
    while len(events) < n:
        events += events
    return [
        (
            f"{e.tenant_id}/{e.agent_id}".encode(),
            registry.encode(EVENT_SCHEMA, event_to_avro(replace(e, event_id=f"e2e-{i}"))),
        )
        for i, e in enumerate(events[:n])
    ]


def _produce(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all",
                         "compression.type": "lz4", "batch.num.messages": 10000})  # fmt: skip
    for key, value in payloads:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)


def _count(store: Any, sql: str) -> int:
    return int(store.query_rows(sql)[0][0])


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _baseline(bootstrap: str, topic: str, n: int, path: Path) -> float:
    """Events/s copying the topic raw into ClickHouse: consume, batch, insert; nothing else."""
    store = connect(f"chdb://{path}")
    store.command("CREATE DATABASE IF NOT EXISTS raw")
    store.command(
        "CREATE TABLE raw.events (k String, v String) ENGINE = MergeTree ORDER BY tuple()"
    )
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "e2e-baseline",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    consumer.subscribe([topic])
    done = 0
    t0 = None
    while done < n:
        batch = [m for m in consumer.consume(5000, timeout=1.0) if m.error() is None]
        if not batch:
            continue
        t0 = t0 or time.perf_counter()
        store.insert("raw.events", [(m.key() or b"", m.value()) for m in batch], ("k", "v"),
                     f"b-{batch[0].partition()}-{batch[0].offset()}")  # fmt: skip
        consumer.commit(asynchronous=False)
        done += len(batch)
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    consumer.close()
    stored = _count(store, "SELECT count() FROM raw.events")
    store.close()
    assert stored == n, (stored, n)
    return n / elapsed


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vigil-bench-e2e-") as tmp:
        home = Path(tmp)
        port = free_port()
        env = {
            **os.environ,
            "VIGIL_HOME": str(home / "home"),
            "VIGIL_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
            "VIGIL_TOPIC_PREFIX": "e2e",
        }
        settings = Settings.from_env(env)
        broker = LocalKafka(home / "kafka", fetch_jars(settings.cache_dir), port)
        print("end-to-end benchmark: local broker and one worker ...", flush=True)
        broker.start()
        worker = WorkerProcess(settings, env)
        try:
            ensure_topics(settings)
            now = datetime.now(UTC)
            payloads = _payloads(EVENTS, now)
            _produce(settings.bootstrap, settings.topics.raw, payloads)  # the backlog
            store = worker.start()
            assert store is not None
            first = 0
            while first == 0:  # from the first stored batch: group join is not throughput
                first = _count(store, "SELECT count() FROM vigil.audit_log")
                t0 = time.perf_counter()
                time.sleep(0.05)
            while _count(store, "SELECT count() FROM vigil.audit_log") < EVENTS:
                time.sleep(0.2)
            e2e = (EVENTS - first) / (time.perf_counter() - t0)
            print(f"  e2e: {e2e:,.0f} events/s", flush=True)
            # freshness at half capacity: events stamped when sent, sent at half the rate
            rate = e2e / 2
            sent = int(rate * FRESHNESS_SECONDS)
            fresh = generate(sent, now, seed=9, run_id="fresh", bad_fraction=0.0).events
            while len(fresh) < sent:  # the SDK events alone: repeat them (new ids below)
                fresh += fresh
            registry = Registry.load()
            producer = Producer({"bootstrap.servers": settings.bootstrap, "linger.ms": 5})
            start = time.perf_counter()
            for i, e in enumerate(fresh[:sent]):
                due = start + i / rate
                time.sleep(max(0.0, due - time.perf_counter()))
                stamped = replace(e, event_id=f"fresh-{i}", ts=datetime.now(UTC))
                value = registry.encode(EVENT_SCHEMA, event_to_avro(stamped))
                producer.produce(settings.topics.raw, value, f"{e.tenant_id}/{e.agent_id}".encode())
                producer.poll(0)
            producer.flush(60)
            while (
                _count(
                    store,
                    "SELECT count() FROM vigil.audit_log WHERE startsWith(event_id, 'fresh-')",
                )
                < sent
            ):
                time.sleep(0.2)
            # queryable when stored: ingested_at is stamped by the ledger sink before its insert
            lags = sorted(float(r[0]) for r in store.query_rows(
                "SELECT dateDiff('millisecond', ts, ingested_at) FROM vigil.audit_log "
                "WHERE startsWith(event_id, 'fresh-')"))  # fmt: skip
            assert worker.proc is not None
            rss = _peak_rss_mb(worker.proc.pid)
            worker.stop()
            baseline = _baseline(settings.bootstrap, settings.topics.raw, EVENTS + sent,
                                 home / "baseline")  # fmt: skip
        finally:
            worker.stop()
            broker.stop()
    return {
        "e2e_events_per_s": e2e,
        "baseline_events_per_s": baseline,
        "ratio_vs_baseline": e2e / baseline,
        "freshness_p50_ms": statistics.median(lags),
        "freshness_p99_ms": lags[int(len(lags) * 0.99) - 1],
        "freshness_offered_events_per_s": rate,
        "worker_peak_rss_mb": rss,
        "events": EVENTS,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=1))
