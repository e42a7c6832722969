"""PII through the real pipeline: nothing planted reaches any ClickHouse table or the clean topic."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import pytest
from confluent_kafka import Consumer, TopicPartition

from connectors.sdk import Emitter
from pipeline.events import Actor, Cost, Decision, Event, Interaction, Unit
from pipeline.owner import RemoteStore
from pipeline.services import WorkerProcess
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.integration.conftest import count, wait_until
from tests.pii_samples import GENERATORS, sensitive_part

pytestmark = pytest.mark.integration


def _clean_topic_bytes(settings: Settings) -> bytes:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap,
            "group.id": f"scan-{time.time()}",
            "enable.auto.commit": False,
        }
    )
    topic = settings.topics.clean
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    ends = {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        for p in partitions
    }
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    seen = dict.fromkeys(partitions, 0)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    while any(seen[p] < ends[p] for p in partitions) and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is None or msg.error():
            continue
        chunks.append((msg.key() or b"") + (msg.value() or b""))
        seen[msg.partition()] = msg.offset() + 1
    consumer.close()
    assert all(seen[p] >= ends[p] for p in partitions), "could not read the whole clean topic"
    return b"\n".join(chunks)


def test_no_planted_value_reaches_storage_or_the_clean_topic(
    settings: Settings, worker: WorkerProcess
) -> None:
    ensure_topics(settings)
    store = worker.start()
    assert isinstance(store, RemoteStore)
    rng = random.Random(2026)
    now = datetime.now(UTC)
    planted: list[str] = []
    events: list[Event] = []
    for i, (kind, gen) in enumerate(sorted(GENERATORS.items()) * 5):
        values = [gen(rng) for _ in range(6)]
        planted += [sensitive_part(kind, v) for v in values]
        events.append(
            Event(
                event_id=f"pii-{i}-a",
                kind="interaction",
                ts=now,
                tenant_id="acme",
                agent_id="bot",
                unit=Unit("ticket", "T-9"),
                actor=Actor("u-1"),
                attributes={
                    "note": f"see {values[0]}",
                    "plain": "nothing here",
                    f"cc {values[5]}": "a key is stored too",
                },
                body=Interaction(
                    "openai",
                    "gpt-4o",
                    input_text=f"user said {values[1]} today",
                    output_text=f"I will contact {values[2]}.",
                    tool_name=None,
                ),
            )
        )
        events.append(
            Event(
                event_id=f"pii-{i}-b",
                kind="cost",
                ts=now,
                tenant_id="globex",
                agent_id="bot",
                body=Cost(0.2, description=f"vendor ref {values[3]}"),
            )
        )
        events.append(
            Event(
                event_id=f"pii-{i}-c",
                kind="decision",
                ts=now,
                tenant_id="initech",
                agent_id="bot",
                body=Decision(
                    f"pii-{i}-a", "corrected", "rev-3", reason=f"leaked {values[4]} in reply"
                ),
            )
        )
    # a malformed event full of PII too: its dead letter must be scrubbed as well
    bad = Event(
        event_id="pii-bad",
        kind="interaction",
        ts=now,
        tenant_id="acme",
        agent_id="bot",
        body=Interaction("openai", "gpt-4o", input_tokens=-1, input_text=f"ssn {planted[0]}"),
    )
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    for event in [*events, bad]:
        emitter.emit(event)
    emitter.close()

    wait_until(
        lambda: count(store, "SELECT count() FROM vigil.audit_log") >= len(events),
        120,
        "all events",
    )
    wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") >= 1, 60, "the dead letter")
    assert count(store, "SELECT count() FROM vigil.audit_log WHERE length(redactions) > 0") == len(
        events
    )

    tables = store.query_rows("SELECT name FROM system.tables WHERE database = 'vigil'")
    dump = b""
    for (table,) in tables:
        dump += store.query_raw(f"SELECT * FROM vigil.{table}", "TSVRaw")
    assert len(dump) > 10_000
    dump += _clean_topic_bytes(settings)
    survivors = [value for value in planted if value.encode() in dump]
    assert survivors == [], (
        f"{len(survivors)} planted values reached storage, e.g. a {survivors[0][:4]}…"
    )
    assert b"nothing here" in dump and b"T-9" in dump, "ordinary text is kept"
    types = {
        r[0]
        for r in store.query_rows(
            "SELECT DISTINCT tupleElement(arrayJoin(redactions), 'type') FROM vigil.audit_log"
        )
    }
    assert types == set(GENERATORS)
