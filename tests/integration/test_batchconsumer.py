"""The raw topic's batch consumer (``pipeline.batchconsumer``) on the real broker: batches bounded
by count and by bytes, offsets committed only for what the caller finished, and a group that
takes over a topic resuming where the group before it stopped."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupState, Producer

from pipeline import batchconsumer
from pipeline.batchconsumer import BatchConsumer, _group_members, adopt_offsets
from pipeline.settings import Settings
from pipeline.sink import Message
from pipeline.topics import ensure_topics

pytestmark = pytest.mark.integration


def _produce(settings: Settings, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    for i, value in enumerate(values):
        producer.produce(settings.topics.raw, value, key=f"k{i % 5}".encode())
    assert producer.flush(30) == 0


def _take_all(consumer: BatchConsumer, expected: int, **limits: int) -> list[list[bytes]]:
    """Batches until ``expected`` messages came (or 20 empty takes in a row)."""
    batches: list[list[bytes]] = []
    idle = 0
    while sum(map(len, batches)) < expected and idle < 20:
        batch = consumer.take(limits.get("events", 10_000), limits.get("bytes", 1 << 30), 0.5)
        idle = 0 if batch else idle + 1
        if batch:
            batches.append([m.value for m in batch])
    return batches


def _take_n(consumer: BatchConsumer, n: int, per_batch: int) -> list[Message]:
    """The first ``n`` messages, in batches of up to ``per_batch``; fails after 60 s."""
    taken: list[Message] = []
    deadline = time.monotonic() + 60
    while len(taken) < n:
        assert time.monotonic() < deadline, f"only {len(taken)} of {n} messages came"
        taken += consumer.take(per_batch, 1 << 20, 0.5)
    return taken


def _read_all(settings: Settings, group: str, expected: int, **limits: int) -> list[list[bytes]]:
    """A new member of ``group`` takes batches until ``expected`` messages came, then leaves
    without committing."""
    consumer = BatchConsumer(settings.kafka, group, settings.topics.raw)
    try:
        return _take_all(consumer, expected, **limits)
    finally:
        consumer.close()


def test_batches_stop_at_their_count_or_their_bytes_and_keep_each_partitions_order(
    settings: Settings,
) -> None:
    ensure_topics(settings)
    values = [f"{i:06d}".encode() * (200 if i % 10 == 0 else 1) for i in range(600)]
    _produce(settings, values)
    batches = _read_all(settings, f"{settings.consumer_group}-n", len(values), events=100)
    assert all(len(b) <= 100 for b in batches)
    assert sorted(v for b in batches for v in b) == sorted(values)

    batches = _read_all(settings, f"{settings.consumer_group}-b", len(values), bytes=5_000)
    # full at 5,000 bytes: no batch goes on past the message that reached it
    assert all(sum(map(len, b[:-1])) < 5_000 for b in batches)
    assert sorted(v for b in batches for v in b) == sorted(values)
    # per key (so per partition), messages come in the order they were produced
    for key in range(5):
        seen = [v for b in batches for v in b if int(v[:6]) % 5 == key]
        assert seen == [v for i, v in enumerate(values) if i % 5 == key]


def test_only_committed_messages_are_not_read_again(settings: Settings) -> None:
    ensure_topics(settings)
    values = [f"m{i}".encode() for i in range(300)]
    _produce(settings, values)
    first = BatchConsumer(settings.kafka, settings.consumer_group, settings.topics.raw)
    try:
        taken = _take_n(first, len(values), 50)
        done, unfinished = taken[:120], taken[120:]
        first.commit(done)  # the rest was taken but never finished (the process died, say)
    finally:
        first.close()  # waits for the commit
    again = [v for b in _read_all(settings, settings.consumer_group, len(unfinished)) for v in b]
    # committed per partition: past each partition's last finished message, nothing before it
    finished_to: dict[int, int] = {}
    for m in done:
        finished_to[m.origin.partition] = max(finished_to.get(m.origin.partition, -1),
                                              m.origin.offset)  # fmt: skip
    expected = [m.value for m in taken if m.origin.offset > finished_to.get(m.origin.partition, -1)]
    assert sorted(again) == sorted(expected)
    assert set(m.value for m in unfinished) <= set(again)


def test_a_group_taking_over_a_topic_resumes_where_the_previous_group_stopped(
    settings: Settings,
) -> None:
    ensure_topics(settings)
    before, after = f"{settings.consumer_group}-before", f"{settings.consumer_group}-after"
    _produce(settings, [f"old{i}".encode() for i in range(200)])
    assert adopt_offsets(settings.kafka, before, after, settings.topics.raw) == 0  # none yet
    old = BatchConsumer(settings.kafka, before, settings.topics.raw)
    try:
        taken = _take_n(old, 200, 500)
        old.commit(taken)
    finally:
        old.close()
    _produce(settings, [f"new{i}".encode() for i in range(50)])

    adopted = adopt_offsets(settings.kafka, before, after, settings.topics.raw)
    assert adopted == len({m.origin.partition for m in taken})
    read = [v for b in _read_all(settings, after, 50) for v in b]
    assert sorted(read) == sorted(f"new{i}".encode() for i in range(50))
    # a group with offsets of its own (adopted ones, here) keeps them
    assert adopt_offsets(settings.kafka, before, after, settings.topics.raw) == 0
    assert sorted(v for b in _read_all(settings, after, 50) for v in b) == sorted(read)


class _CloseHangs:
    """A consumer whose ``close`` waits until released, as a consumer left out of its group
    after a broker restart did (its leave request waited in a queue never sent); the rest is
    the real consumer's."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self.closing = threading.Event()
        self.released = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    def close(self) -> None:
        self.closing_at = time.monotonic()
        self.closing.set()
        self.released.wait(90)
        self._consumer.close()


def test_a_consumer_left_out_of_its_group_is_replaced_and_reads_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """librdkafka once left the raw consumer out of its group after a broker restart, for good.
    Here the consumer is left out by hand (its librdkafka consumer leaves the group behind its
    back); after ``member_check`` seconds without a partition it finds itself missing from the
    group's members and a new consumer joins in its place, from the committed offsets, without
    waiting for the one left out to finish closing, which never did. The group it finds has no
    member at all, and is not rebalancing: so the consumer is out, not joining."""
    monkeypatch.setattr(batchconsumer, "LEFT_OUT_CLOSE_SECONDS", 1.0)
    ensure_topics(settings)
    _produce(settings, [f"before{i}".encode() for i in range(100)])
    consumer = BatchConsumer(settings.kafka, settings.consumer_group, settings.topics.raw,
                             member_check=5.0)  # fmt: skip
    left_out = consumer._consumer = _CloseHangs(consumer._consumer)
    try:
        consumer.commit(_take_n(consumer, 100, 500))
        left_out.unsubscribe()  # left out, as the stuck consumer was
        _produce(settings, [f"after{i}".encode() for i in range(50)])
        read = [m.value for m in _take_n(consumer, 50, 500)]
        assert sorted(read) == sorted(f"after{i}".encode() for i in range(50))
        assert consumer.rejoins == 1
        # read on while the one left out was still closing (released after 90 s, or now)
        assert left_out.closing.is_set() and not left_out.released.is_set()
        assert time.monotonic() - left_out.closing_at < 30
    finally:
        left_out.released.set()
        consumer.close()


def test_a_member_without_a_partition_stays_in_its_group(settings: Settings) -> None:
    """More members than partitions: the one without a partition is a member all the same, and
    is not replaced (each replacement would rebalance the whole group)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"{settings.topics.raw}.single"
    admin = AdminClient({"bootstrap.servers": settings.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result()
    consumers = [
        BatchConsumer(settings.kafka, settings.consumer_group, topic, member_check=5.0)
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 16  # three checks of the idle one, after a join (3 s)
        while time.monotonic() < deadline:
            for c in consumers:
                c.take(100, 1 << 20, 0.2)
        held = [c._idle_since is None for c in consumers]
        assert sorted(held) == [False, True], "one holds the partition, the other none"
        assert [c.rejoins for c in consumers] == [0, 0]
        state, members = _group_members(settings.kafka, settings.consumer_group)
        assert {c._client_id for c in consumers} <= members
        assert state == ConsumerGroupState.STABLE
    finally:
        for c in consumers:
            c.close()
