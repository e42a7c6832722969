"""Reading a topic in batches with confluent-kafka's C consumer, committing only what is done.

The validate agent reads the raw topic this way. Emitters publish one event per message, and
Faust's stream delivers each message through its conductor, channel queue, stream iterator
and acknowledgement: about 40-60 µs of Python a message, most of what a do-nothing Faust agent
costs, against 1.3-1.7 µs for librdkafka's batched ``consume`` (bench/faust_floor.py,
docs/benchmarks.md). The clean and DLQ topics stay with Faust: a clean message is an
EventBatch of hundreds of events, so the per-message cost there is small.

Offsets are committed only for messages the caller has finished (``commit``): at-least-once,
like the Faust agents. Automatic commits are off. A batch that was taken but not committed
when the process died or its partitions moved is read again; the sinks drop the repeats.
Every method blocks; the worker calls them from one thread of its own.

A consumer that has held no partition for ``MEMBER_CHECK_SECONDS`` asks the broker whether it is
still a member of its group, and if the group is not rebalancing and lacks it, a new consumer
joins in its place. After a broker restart, librdkafka 2.16 once left the raw consumer out of
its group for good: its session timed out while the broker was down, and its requests to the
group coordinator then waited in a queue that was never sent, so the worker read nothing more
from raw. Closing such a consumer waits for those requests too, for good: it is closed on a
thread of its own, and the new consumer does not wait for it longer than
``LEFT_OUT_CLOSE_SECONDS``. A member that holds no partition because the group has more members
than the topic has partitions is left alone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from confluent_kafka import (
    Consumer,
    ConsumerGroupState,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from pipeline.kafkaconn import KafkaConnection
from pipeline.lag import group_client
from pipeline.logs import RDKAFKA_LOGGER
from pipeline.rows import Origin
from pipeline.sink import Message

log = logging.getLogger("vigil.consumer")
# How many messages one ``consume`` call may return. What they hold is bounded anyway: librdkafka
# keeps at most ``queued.max.messages.kbytes`` fetched ahead.
CONSUME_CHUNK = 500
# How long a consumer may hold no partition before it checks that it is still in its group, and
# then how often: far longer than a joining consumer takes to reach the coordinator, which lists
# it from then on. One missing while its group rebalances may yet join that rebalance (after a
# broker restart members come back one by one), so it is replaced only when its group is not
# rebalancing (``left_out``).
MEMBER_CHECK_SECONDS = 15.0
# How long the consumer that replaces one left out of its group waits for that one to close. A
# consumer left out after a broker restart never finished closing (its leave request waited in
# a queue never sent), and the worker read nothing more from raw; it is left to close, or not,
# on a daemon thread.
LEFT_OUT_CLOSE_SECONDS = 5.0
_T = TypeVar("_T")
# What a group's coordinator answers while it moves or loads (a new group, a broker restart)
_COORDINATOR_NOT_READY = frozenset(
    (
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    )
)


class BatchConsumer:
    """A member of ``group`` reading ``topic`` from its committed offsets (from the start when
    the group has none)."""

    def __init__(
        self,
        kafka: KafkaConnection,
        group: str,
        topic: str,
        config: dict[str, Any] | None = None,
        member_check: float = MEMBER_CHECK_SECONDS,
    ) -> None:
        self.group = group
        self.topic = topic
        self.rejoins = 0  # how often a new consumer joined in place of one left out of the group
        self._kafka = kafka
        self._member_check = member_check
        self._config = {
            **kafka.config(),
            # tells it apart from the group's other members in the broker's description of the
            # group (``_rejoin_if_left_out``)
            "client.id": f"vigil-{os.getpid()}-{uuid.uuid4().hex[:12]}",
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 2_000,
            # what librdkafka fetches ahead of the batches taken: bounded by bytes, since a raw
            # message may be up to 1 MiB
            "queued.max.messages.kbytes": 32 * 1024,
            "error_cb": self._on_error,
            "logger": RDKAFKA_LOGGER,  # served by each take
            "on_commit": self._on_commit,
            **(config or {}),
        }
        self._client_id = str(self._config["client.id"])
        self._ahead: deque[Message] = deque()  # read from Kafka, not yet in a batch
        self._last_commit: list[TopicPartition] = []
        self._idle_since: float | None = None  # since when it has held no partition
        self._joined = 0  # how many consumers joined: the callbacks of earlier ones are ignored
        self._consumer = self._join()

    def _join(self) -> Consumer:
        self._joined += 1
        joined = self._joined
        consumer = Consumer(self._config)
        consumer.subscribe(
            [self.topic],
            on_assign=lambda c, partitions: self._on_assign(joined, partitions),
            on_revoke=lambda c, partitions: self._on_revoke(joined, partitions),
        )
        self._idle_since = time.monotonic()
        return consumer

    def __repr__(self) -> str:
        return f"BatchConsumer(group={self.group!r}, topic={self.topic!r})"

    @staticmethod
    def _on_error(err: KafkaError) -> None:
        log.warning("kafka consumer: %s", err)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            log.warning("%s: a commit failed; its messages are read again: %s", self, err)

    def _on_assign(self, joined: int, partitions: list[TopicPartition]) -> None:
        if joined != self._joined:
            return  # a consumer left out, closing: nothing of it is ours any more
        self._idle_since = None if partitions else time.monotonic()

    def _on_revoke(self, joined: int, partitions: list[TopicPartition]) -> None:
        # runs inside ``consume`` (also for partitions lost), on the thread that takes: the
        # group's next owner of these partitions reads what was read ahead from them, and commits
        # from there on. A consumer left out revokes as it closes, on its own thread: what was
        # read ahead then is the new consumer's, and stays.
        if joined != self._joined:
            return
        gone = {p.partition for p in partitions}
        self._ahead = deque(m for m in self._ahead if m.origin.partition not in gone)
        self._last_commit = [tp for tp in self._last_commit if tp.partition not in gone]
        self._idle_since = time.monotonic()
        log.info("%s: partitions %s revoked", self, sorted(gone))

    def _rejoin_if_left_out(self) -> None:
        """After ``member_check`` seconds without a partition, ask the broker whether this
        consumer is a member of its group, and if it is not, put a new one in its place."""
        now = time.monotonic()
        if self._idle_since is None or now - self._idle_since < self._member_check:
            return
        idle = now - self._idle_since
        self._idle_since = now  # the next check, if still idle, a period later
        try:
            state, members = _group_members(self._kafka, self.group)
        except KafkaException as exc:  # the broker is down: a new consumer would not help
            log.info("%s: no partition for %.0f s; group not described: %s", self, idle, exc)
            return
        if not left_out(state, members, self._client_id):
            return
        log.warning(
            "%s: no partition for %.0f s and not a member of its group (%s); a new consumer "
            "joins it", self, idle, state.name.lower(),
        )  # fmt: skip
        replaced = self._consumer
        self._ahead.clear()
        self._last_commit = []
        self._consumer = self._join()
        self.rejoins += 1
        self._close_left_out(replaced)

    def _close_left_out(self, consumer: Consumer) -> None:
        """Close a consumer left out of the group (its threads and sockets: it holds nothing) on
        a daemon thread, waiting at most LEFT_OUT_CLOSE_SECONDS for it."""
        closed = threading.Event()

        def close() -> None:
            try:
                consumer.close()
            except KafkaException as exc:
                log.warning("%s: the consumer left out did not close cleanly: %s", self, exc)
            finally:
                closed.set()

        threading.Thread(target=close, name="vigil-left-out-close", daemon=True).start()
        if not closed.wait(LEFT_OUT_CLOSE_SECONDS):
            log.warning("%s: the consumer left out did not close within %.0f s; it goes on "
                        "closing on its own", self, LEFT_OUT_CLOSE_SECONDS)  # fmt: skip

    def take(self, max_events: int, max_bytes: int, within: float) -> list[Message]:
        """Messages in order per partition: as many as come within ``within`` seconds, up to
        ``max_events`` or up to the message that brings them to ``max_bytes``, whichever comes
        first. Empty when none came. What was read past the batch's end opens the next one.
        Raises KafkaException on a fatal consumer error; other errors are logged."""
        self._rejoin_if_left_out()
        batch: list[Message] = []
        size = 0
        deadline = time.monotonic() + within
        while len(batch) < max_events and size < max_bytes:
            if not self._ahead:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ahead.extend(self._read(CONSUME_CHUNK, left))
                continue
            m = self._ahead.popleft()
            batch.append(m)
            size += len(m.value)
        return batch

    def _read(self, most: int, timeout: float) -> Iterator[Message]:
        for m in self._consumer.consume(most, timeout):
            error = m.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                log.warning("kafka consumer: %s", error)
                continue
            partition, offset = m.partition(), m.offset()
            assert partition is not None and offset is not None  # a consumed message has both
            yield Message(Origin(self.topic, partition, offset), m.key(), m.value() or b"")

    def commit(self, done: Iterable[Message]) -> None:
        """Commit past every message of ``done`` (all taken from this consumer, in order).
        Asynchronous: a commit that fails (its partitions moved meanwhile) is logged, and those
        messages are read again."""
        offsets = _next_offsets(done)
        if offsets:
            self._consumer.commit(offsets=offsets, asynchronous=True)
            self._last_commit = offsets

    def close(self) -> None:
        """Commit the last commit once more and wait for it, then leave the group."""
        try:
            if self._last_commit:
                self._consumer.commit(offsets=self._last_commit, asynchronous=False)
        except KafkaException as exc:
            log.warning("last commit of %s failed; those messages are read again: %s", self, exc)
        finally:
            self._consumer.close()


_REBALANCING = frozenset(
    (ConsumerGroupState.PREPARING_REBALANCING, ConsumerGroupState.COMPLETING_REBALANCING)
)


def left_out(state: ConsumerGroupState, members: set[str], client_id: str) -> bool:
    """Whether the consumer ``client_id`` is out of a group in ``state`` with ``members``. One
    missing while the group rebalances may yet join that rebalance: not out, not yet."""
    return state not in _REBALANCING and client_id not in members


def _group_members(
    kafka: KafkaConnection, group: str, timeout: float = 5.0
) -> tuple[ConsumerGroupState, set[str]]:
    """``group``'s state and the client ids of its members, as its coordinator describes them.
    Raises KafkaException when Kafka does not answer within about ``timeout``."""
    config: dict[str, Any] = {**kafka.config(), "logger": RDKAFKA_LOGGER}
    admin = AdminClient(config)
    futures = admin.describe_consumer_groups([group], request_timeout=timeout)
    description = futures[group].result()
    return description.state, {member.client_id for member in description.members}


def _next_offsets(done: Iterable[Message]) -> list[TopicPartition]:
    """Kafka's commit convention: per partition, the offset of the next message to read."""
    last: dict[tuple[str, int], int] = {}
    for m in done:
        key = (m.origin.topic, m.origin.partition)
        last[key] = max(last.get(key, -1), m.origin.offset)
    return [TopicPartition(topic, p, offset + 1) for (topic, p), offset in sorted(last.items())]


def adopt_offsets(
    kafka: KafkaConnection, source: str, target: str, topic: str, timeout: float = 10.0
) -> int:
    """Copy ``source``'s committed offsets on ``topic`` to group ``target`` when ``target`` has
    committed none there: a group that takes over reading a topic from another resumes where
    that one stopped instead of from the start. Does nothing when ``target`` has offsets (or
    ``source`` has none). Returns how many partitions it set. ``target`` must have no running
    members. Raises KafkaException when Kafka does not answer within about ``timeout``."""
    deadline = time.monotonic() + timeout
    if any(tp.offset >= 0 for tp in _committed(kafka, target, topic, deadline)):
        return 0  # every start after the first ends here
    adopted = [tp for tp in _committed(kafka, source, topic, deadline) if tp.offset >= 0]
    if not adopted:
        return 0
    with group_client(kafka, target) as consumer:
        _retrying(deadline, lambda: consumer.commit(offsets=adopted, asynchronous=False))
    log.warning("group %s resumes %s where group %s stopped (%d partitions)", target, topic,
                source, len(adopted))  # fmt: skip
    return len(adopted)


def _committed(
    kafka: KafkaConnection, group: str, topic: str, deadline: float
) -> list[TopicPartition]:
    with group_client(kafka, group) as consumer:
        left = max(deadline - time.monotonic(), 1.0)
        metadata = consumer.list_topics(topic, timeout=left)
        partitions = sorted(metadata.topics[topic].partitions) if topic in metadata.topics else []
        if not partitions:
            return []
        asked = [TopicPartition(topic, p) for p in partitions]
        return list(_retrying(deadline, lambda: consumer.committed(asked, timeout=left)))


def _retrying(deadline: float, call: Callable[[], _T]) -> _T:
    """``call()``, again after 0.2 s while it fails with a retriable error or a coordinator not
    ready yet (a new group's first answer can be NOT_COORDINATOR), until ``deadline``."""
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0]
            if time.monotonic() >= deadline or not (
                error.retriable() or error.code() in _COORDINATOR_NOT_READY
            ):
                raise
        time.sleep(0.2)
