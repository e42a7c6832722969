"""The worker's hot path without Faust: what the stages cost when messages arrive in batches.

Measures one question for issue 9: how fast would one process go if validate and ledger took
their messages from confluent-kafka in batches (as the raw-copy baseline does) instead of
through Faust's per-message delivery? The worker's validate now reads raw that way; its ledger
takes clean through Faust, in EventBatches. The stages are the worker's own: ``route`` (decode,
validate, redact, enrich, re-encode), publish to a clean topic in EventBatches (idempotent,
acks=all, waited for), then ``LedgerSink.write`` (dedup, hash chain, insert into embedded
ClickHouse), with offsets committed after each step, the ledger taking validate's events from a
``HandOff`` as in the worker. One thread, so the two stages take turns as they do in the
worker. Rollups and alert evaluation are left out (see the fold benchmark: 9 µs an event in a
slow hour of 2026-12-06, 15 before that day's change). Not a product path: a measurement for
the design decision.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, Producer
from confluent_kafka import Message as KafkaMessage

from pipeline.codec import Registry
from pipeline.config import load_config
from pipeline.enrich import enrich
from pipeline.events import Event
from pipeline.handoff import HandOff
from pipeline.logs import RDKAFKA_LOGGER
from pipeline.rows import Origin
from pipeline.settings import Settings
from pipeline.sink import LedgerSink, Message
from pipeline.store import connect, migrate
from pipeline.validate import clean_batches, route


def batch_consumer(bootstrap: str, group: str, topic: str) -> Consumer:
    """A consumer of ``topic`` from its start that commits only when told (as the baseline's)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "logger": RDKAFKA_LOGGER})  # fmt: skip
    consumer.subscribe([topic])
    return consumer


def _messages(batch: list[KafkaMessage]) -> list[Message]:
    return [
        Message(Origin(m.topic() or "", m.partition() or 0, m.offset() or 0), m.key(),
                m.value() or b"")
        for m in batch
    ]  # fmt: skip


def measure(settings: Settings, raw_topic: str, clean_topic: str, n: int, path: Path) -> float:
    """events/s from ``raw_topic`` (its first ``n`` events, already there) to stored in a fresh
    embedded store at ``path``, through ``clean_topic`` (fresh, empty)."""
    registry = Registry.load()
    config = load_config(settings.config_path, os.environ)
    store = connect(f"chdb://{path}")
    migrate(store)
    handoff = HandOff()  # as in the worker's one process
    sink = LedgerSink(store, registry, handoff=handoff)
    producer = Producer({"bootstrap.servers": settings.bootstrap, "enable.idempotence": True,
                         "acks": "all", "linger.ms": 5, "compression.type": "lz4",
                         "logger": RDKAFKA_LOGGER})  # fmt: skip
    raw = batch_consumer(settings.bootstrap, f"hot-raw-{os.getpid()}", raw_topic)
    clean = batch_consumer(settings.bootstrap, f"hot-clean-{os.getpid()}", clean_topic)

    def enrich_with(event: Event) -> Event:
        return enrich(event, config.catalog, config.agents)

    validated = published = stored = 0
    t0: float | None = None
    try:
        while validated < n or stored < published:
            if validated < n:
                batch = [m for m in raw.consume(min(2000, n - validated), timeout=0.1)
                         if m.error() is None]  # fmt: skip
                if batch:
                    t0 = t0 or time.perf_counter()
                    now = datetime.now(UTC)
                    routed_clean = []
                    built: list[tuple[bytes, Event]] = []
                    for m in _messages(batch):
                        routed = route(m.value, m.key, m.origin, registry, settings.limits, now,
                                       config.policy_for, enrich_with)  # fmt: skip
                        if routed.event is not None:
                            routed_clean.append((routed.key, routed.value))
                            built.append((routed.value, routed.event))
                    handoff.put(built)
                    for key, value in clean_batches(routed_clean, registry):
                        producer.produce(clean_topic, value, key)
                    published += len(routed_clean)
                    producer.flush(60)
                    raw.commit(asynchronous=False)
                    validated += len(batch)
            # EventBatch messages: a few dozen make an insert of thousands of events
            batch = [m for m in clean.consume(50, timeout=0.1) if m.error() is None]
            if batch:
                stored += sink.write(_messages(batch), held=0).inserted  # one generation
                clean.commit(asynchronous=False)
        return stored / (time.perf_counter() - (t0 or time.perf_counter()))
    finally:
        raw.close()
        clean.close()
        store.close()
