"""Consumer lag: how many messages the worker's group has not committed yet, per partition.

Read with the Kafka admin protocol (committed offsets and high watermarks) by a consumer that
never joins the group, so sampling does not disturb it. Blocking.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from confluent_kafka import Consumer, TopicPartition

from pipeline.kafkaconn import KafkaConnection
from pipeline.logs import RDKAFKA_LOGGER

if TYPE_CHECKING:
    from pipeline.settings import Settings

LAG_TABLE = "vigil.consumer_lag"
LAG_COLUMNS = ("at", "consumer_group", "topic", "partition", "committed", "end_offset", "lag")


def raw_group(settings: Settings) -> str:
    """The consumer group that reads the raw topic (the validate agent), in every role."""
    return f"{settings.consumer_group}-validate"


def lag_groups(settings: Settings) -> list[tuple[str, tuple[str, ...]]]:
    """(group, topics) whose lag a store worker samples: the raw group's, and its own. In that
    order: the raw group commits a batch once its clean records are appended, so once clean's
    commits reach ends read after raw's commits reached raw's ends of a time, every event sent
    before that time is stored (``alerting.CaughtUp``); read the other way, a batch validated
    in between would be missed."""
    topics = settings.topics
    return [
        (raw_group(settings), (topics.raw,)),
        (settings.consumer_group, (topics.clean, topics.dlq)),
    ]


def caught_up_groups(settings: Settings) -> list[tuple[str, str]]:
    """The (group, topic)s whose commits must reach their ends for every event sent before a
    time to have been evaluated (``alerting.CaughtUp``): each ``lag_groups`` group with the
    first topic it reads, raw and clean (the DLQ holds nothing a rule reads)."""
    return [(group, topics[0]) for group, topics in lag_groups(settings)]


@contextmanager
def group_client(kafka: KafkaConnection, group: str) -> Iterator[Consumer]:
    """A consumer that reads and writes ``group``'s offsets without joining it, closed on exit.

    librdkafka's own lines go to the held-back logger, not stderr: while the broker is down it
    wrote one every 50 ms until a call's timeout; callers log the failure itself."""
    consumer = Consumer({**kafka.config(), "group.id": group, "enable.auto.commit": False,
                         "logger": RDKAFKA_LOGGER})  # fmt: skip
    try:
        yield consumer
    finally:
        consumer.close()


class Gap(NamedTuple):
    """Messages of ``topic`` partition ``partition`` that its retention deleted before a group
    read them: from the group's ``committed`` offset to the log's ``first`` one kept."""

    topic: str
    partition: int
    committed: int
    first: int

    def said(self, group: str, running: bool = False) -> str:
        """What it means to a worker of ``group`` that starts (all of them are lost) or that
        is ``running``: it may have fetched some of them already (its insert held up, on a
        ClickHouse outage say), and those are stored."""
        gone = (
            f"{self.topic} partition {self.partition}: {self.first - self.committed} "
            f"message(s) (offsets {self.committed}-{self.first - 1}) were deleted by the topic's "
            f"retention before group {group} "
        )
        if running:
            return gone + (
                "committed them; those the worker had not fetched yet are lost: it has been "
                "behind for longer than the topic keeps messages"
            )
        return gone + f"read them, and are lost; it reads on from offset {self.first}"


def consumer_lag(
    kafka: KafkaConnection,
    group: str,
    topics: Sequence[str],
    timeout: float = 10.0,
    at: datetime | None = None,
) -> tuple[list[tuple[Any, ...]], list[Gap]]:
    """One row per partition of ``topics`` (LAG_COLUMNS order), and the partitions whose log no
    longer keeps ``group``'s committed offset (Gap). A partition the group has never committed
    counts from its low watermark. Raises KafkaException when Kafka does not answer.

    Each row's time is ``at`` (by default now), taken before the offsets are read: a row with no
    lag says that everything appended to its partition before that time had been committed."""
    now = datetime.now(UTC) if at is None else at
    rows, gaps = [], []
    for tp, low, high in _offsets(kafka, group, topics, timeout):
        done = tp.offset if tp.offset >= 0 else low
        rows.append((now, group, tp.topic, tp.partition, done, high, max(high - done, 0)))
        if 0 <= tp.offset < low:
            gaps.append(Gap(tp.topic, tp.partition, tp.offset, low))
    return rows, gaps


def _offsets(
    kafka: KafkaConnection, group: str, topics: Sequence[str], timeout: float
) -> list[tuple[TopicPartition, int, int]]:
    """Per partition of ``topics``: ``group``'s committed offset (negative: none), and the
    first and next offsets of its log."""
    with group_client(kafka, group) as consumer:
        metadata = consumer.list_topics(timeout=timeout)
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in metadata.topics
            for p in sorted(metadata.topics[topic].partitions)
        ]
        if not partitions:
            return []
        offsets = []
        for tp in consumer.committed(partitions, timeout=timeout):
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
            offsets.append((tp, low, high))
        return offsets
