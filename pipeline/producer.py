"""Producing to Kafka from asyncio code: confluent-kafka's C producer, awaited per batch.

Used by the gateway (raw events) and the worker (clean events, dead letters, rollups, alerts).
librdkafka batches, compresses and retries on its own threads; a polling thread runs the
delivery callbacks, and one asyncio future per ``send`` call resolves when the broker holds
every record of it (acks=all, idempotent) or when the first one failed.

Its producer, and the SDK's (``connectors.sdk.Emitter``), is a ``RenewingProducer``: replaced
by a new one when librdkafka has left it knowing no broker while the cluster answers others,
or with smaller record batches when a topic refuses one as too large.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline.kafkaconn import KafkaConnection
from pipeline.logs import RDKAFKA_LOGGER
from pipeline.topics import LIBRDKAFKA_BATCH_BYTES

log = logging.getLogger("vigil.producer")


class Unavailable(RuntimeError):
    """The broker did not take the records in time (or said no). ``too_large``: it refused one
    as larger than its topic takes."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


# How long a producer may know no broker before it is renewed, if a new client reaches one.
RENEW_AFTER_SECONDS = 20.0
_PURGED = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)
_REFUSED_LARGE = KafkaError.MSG_SIZE_TOO_LARGE
_DOWN = (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT)  # the broker, or all, unreachable
# why the broker refused a message alone as too large (a batch of several is made smaller,
# ``RenewingProducer``): the limit its events were sized by (``topics.event_bytes``) is its
# topic's max.message.bytes as read before, which the worker and the gateway read again on this
_TOO_LARGE = (
    " (the topic takes less than when this process last read its max.message.bytes, or than"
    " Kafka's default of 1,048,588 where it may not DESCRIBE_CONFIGS the topic)"
)


class RenewingProducer:
    """A librdkafka producer, replaced by a new one when it has lost every broker for good.

    librdkafka (2.10 and later) forgets the brokers a metadata response leaves out, and a lone
    broker shutting down answers one with none: a client can be left knowing no broker at all
    and never asking again (confluentinc/librdkafka#5301, open), sometimes without reporting
    any error. Seen here after the test broker's restart: the gateway made no connection to it
    for eight minutes, answering 503; another time the worker's producer held a clean batch
    until it timed out, and again after each retry; new clients were served all along. Only a
    new client gets out of that. So a thread looks every ``renew_after`` seconds: when all
    brokers have been down that long, or messages have waited that long with none delivered,
    and this producer cannot get the cluster's metadata while a new client with the same
    settings can, this one is replaced. What it held is purged and produced again on the new
    one with the same delivery callback: nothing is lost, and what was in flight may arrive
    twice (the ledger keeps an event once).

    A topic's ``max.message.bytes`` holds a whole record batch, and librdkafka packs messages
    into batches of up to ``batch.size``: messages each within a topic's limit are refused
    together (MSG_SIZE_TOO_LARGE) where the limit is below ``batch.size`` (an agent's SDK does
    not know the topic's limit; a worker's was lowered after it read it). A message refused so
    that did not fill its batch alone is not reported: the producer is replaced by one whose
    ``batch.size`` is half as large (or the message's size), and the message, the rest of its
    batch and what the old one held are produced again on it. Only a message refused alone
    (its size at least ``batch.size``) is reported as refused.

    Produce through ``produce`` and flush through ``flush`` (which follows the replacements);
    poll and the rest on ``producer``, which is the current one. ``error_cb`` in ``config``
    still hears every error."""

    def __init__(self, config: Mapping[str, Any], renew_after: float | None = None) -> None:
        self._error_cb = config.get("error_cb")
        self._config = {**config, "error_cb": self._on_error}
        self._renew_after = RENEW_AFTER_SECONDS if renew_after is None else renew_after
        self._lock = threading.RLock()  # a produce, or the swap: nothing enters a replaced one
        self.producer = Producer(self._config)
        self.renewed = 0
        self._retiring: list[threading.Thread] = []  # replaced producers being purged
        self._down_since: float | None = None
        self._delivered = 0  # deliveries reported, for telling a stall
        self._closed = threading.Event()
        # the watch holds it weakly: an emitter dropped unclosed is collected, its thread ends
        threading.Thread(
            target=_watch, args=(weakref.ref(self),), name="vigil-kafka-renew", daemon=True
        ).start()

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        """``Producer.produce`` on the current producer (BufferError when its queue is full)."""
        with self._lock:
            producer = self.producer
            producer.produce(
                topic, value, key, on_delivery=partial(self._reported, producer, on_delivery)
            )

    def _reported(
        self,
        producer: Producer,
        on_delivery: Callable[[KafkaError | None, Message], None],
        err: KafkaError | None,
        msg: Message,
    ) -> None:
        if err is None:
            self._delivered += 1
            self._down_since = None
        elif self._sent_again(producer, err, msg):
            try:
                self.produce(msg.topic() or "", msg.value() or b"", msg.key(), on_delivery)
                return
            except (BufferError, KafkaException, RuntimeError):  # RuntimeError: closed
                pass  # reported as it came: the caller keeps or retries it
        on_delivery(err, msg)

    def _sent_again(self, producer: Producer, err: KafkaError, msg: Message) -> bool:
        """Whether a message ``producer`` reported with ``err`` is for the current producer to
        send: purged from or refused by one since replaced, or refused in a batch larger than
        its topic takes, after which the current one makes smaller batches (the class's doc)."""
        code = err.code()
        if code not in _PURGED and code != _REFUSED_LARGE:
            return False
        with self._lock:
            if producer is not self.producer:
                return True
            if code != _REFUSED_LARGE:
                return False  # purged by the caller, not by a replacement
            size = len(msg.key() or b"") + len(msg.value() or b"")
            batch = int(self._config.get("batch.size", LIBRDKAFKA_BATCH_BYTES))
            if size >= batch:
                return False  # alone in its batch: larger than the topic takes
            self._config["batch.size"] = smaller = max(batch // 2, size)
            held = self._replace()
        log.warning(
            "%s refused a record batch as too large (its max.message.bytes is below the "
            "producer's batch.size, %s bytes): batches are at most %s bytes from now on, and "
            "the %d message(s) the producer held are sent again", msg.topic(), f"{batch:,}",
            f"{smaller:,}", held,
        )  # fmt: skip
        return True

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in _DOWN and self._down_since is None:
            self._down_since = time.monotonic()
        if self._error_cb is not None:
            self._error_cb(err)
        else:  # as librdkafka logs an error when no callback takes it
            RDKAFKA_LOGGER.error("%s", err)

    def _look(self, delivered: int, queued: bool) -> tuple[int, bool]:
        """One look of the watch (the class's doc), given what the last one saw: how many
        were delivered then and whether messages were waiting. Returns what this one saw."""
        down_since = self._down_since
        down = down_since is not None and time.monotonic() - down_since >= self._renew_after
        waiting = len(self.producer) > 0
        # messages waiting now and a period ago, and none delivered in between
        stalled = queued and waiting and self._delivered == delivered
        seen = (self._delivered, waiting)
        if not (down or stalled):
            return seen
        if _answers(self.producer, timeout=2.0):
            self._down_since = None  # it reaches the cluster: waiting is the cluster's
            return seen
        probe = Producer({**self._config, "error_cb": lambda _err: None})
        try:
            if _answers(probe, timeout=5.0):
                self._renew()
                return (self._delivered, False)
        finally:
            probe.close()
        return seen

    def _renew(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return  # a producer made now might be flushed by no one
            held = self._replace()
            self.renewed += 1
        log.warning(
            "the Kafka producer cannot reach the cluster while a new client can (librdkafka#5301"
            "): replaced by a new one, which sends again the %d message(s) it held", held,
        )  # fmt: skip

    def _replace(self) -> int:
        """A new producer of ``_config`` in place of the current one (the caller holds the
        lock); the old one is purged on a thread of its own, each message it held reported, and
        so produced again on the new one (``_sent_again``). Returns how many it held."""
        old, self.producer = self.producer, Producer(self._config)
        held = len(old)
        self._down_since = None
        retiring = threading.Thread(target=_retire, args=(old,), name="vigil-kafka-retire",
                                    daemon=True)  # fmt: skip
        self._retiring = [thread for thread in self._retiring if thread.is_alive()]
        self._retiring.append(retiring)
        retiring.start()
        return held

    def flush(self, timeout: float) -> int:
        """Wait until every message produced is delivered or reported, by the current producer
        and by those it replaced meanwhile, for at most ``timeout`` seconds; how many are still
        queued on the current one."""
        deadline = time.monotonic() + timeout
        while True:
            producer = self.producer
            left = int(producer.flush(max(0.0, deadline - time.monotonic())))
            with self._lock:
                retiring = list(self._retiring)
            for thread in retiring:
                thread.join(max(0.0, deadline - time.monotonic()))
            settled = producer is self.producer and not any(t.is_alive() for t in retiring)
            if (settled and len(producer) == left) or time.monotonic() >= deadline:
                return len(self.producer)

    def close(self) -> None:
        """No renewal from now on (call before flushing and closing ``producer``). Does not
        wait: a watch asking the cluster meanwhile replaces nothing after this."""
        self._closed.set()


def _retire(old: Producer) -> None:
    """Purge a replaced producer and serve the purged reports: each is produced again on the
    producer that replaced it (``RenewingProducer._sent_again``). Not closed here: another
    thread may be in its flush; it is destroyed with its last reference."""
    old.purge()
    old.flush(30)


def _watch(ref: weakref.ref[RenewingProducer]) -> None:
    """A RenewingProducer's thread: a look every ``renew_after`` seconds until it is closed or
    collected."""
    seen = (0, False)
    renewing = ref()
    while renewing is not None:
        closed, every = renewing._closed, renewing._renew_after
        del renewing  # held only while it looks, not while the thread waits
        if closed.wait(every):
            return
        renewing = ref()
        if renewing is not None:
            seen = renewing._look(*seen)


def _answers(producer: Producer, timeout: float) -> bool:
    """Whether ``producer`` gets the cluster's metadata (any broker) within ``timeout``."""
    try:
        return bool(producer.list_topics(timeout=timeout).brokers)
    except KafkaException:
        return False


# The largest message the sender produces. librdkafka's default, 1,000,000 bytes, is below
# Kafka's own for a topic (1,048,588): an event the clean topic would take was refused before
# it was sent (MSG_SIZE_TOO_LARGE, raised by produce), and the worker that could not publish it
# stopped, at each restart. The topics' limits are the ones that hold (``validate.route``).
MESSAGE_BYTES = 64 * 1024 * 1024

# How long a batch may wait for the broker's acknowledgement before the sender says so (it
# goes on waiting: the producer gives up after message.timeout.ms, 120 s)
SLOW_ACK_SECONDS = 30.0


def _still_waiting(records: Sequence[tuple[str, bytes | None, bytes]]) -> None:
    """Said of a batch still unacknowledged after SLOW_ACK_SECONDS: librdkafka retries the
    writes to a partition short of its in-sync copies without a word, until
    message.timeout.ms (120 s)."""
    topics = ", ".join(sorted({topic for topic, _, _ in records}))
    log.warning(
        "%d record(s) for %s not acknowledged by Kafka after %g s, still waiting: a broker "
        "down or out of reach, or a partition with fewer in-sync copies than its "
        "min.insync.replicas",
        len(records), topics, SLOW_ACK_SECONDS,
    )  # fmt: skip


class KafkaSender:
    """An idempotent acks=all producer with a polling thread, awaited per batch of records."""

    def __init__(self, kafka: KafkaConnection, config: dict[str, Any] | None = None) -> None:
        self._kafka = RenewingProducer(
            {
                **kafka.config(),
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": "lz4",
                "linger.ms": 5,
                "message.timeout.ms": 120_000,
                "message.max.bytes": MESSAGE_BYTES,
                "error_cb": self._on_error,
                "logger": RDKAFKA_LOGGER,  # served by the polling thread
                **(config or {}),
            }
        )
        self.broker_down = False
        self._last_probe = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="vigil-kafka-poll", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"KafkaSender(queue={self.queue_depth}, down={self.broker_down})"

    @property
    def _producer(self) -> Producer:
        return self._kafka.producer

    @property
    def renewed(self) -> int:
        """How often its producer was replaced (``RenewingProducer``)."""
        return self._kafka.renewed

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in _DOWN:
            self.broker_down = True
        log.warning("kafka: %s", err)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    @property
    def queue_depth(self) -> int:
        return len(self._producer)

    def probe(self, topic: str, timeout: float = 2.0) -> bool:
        """Whether the broker answers and knows ``topic`` (blocking)."""
        try:
            meta = self._producer.list_topics(topic, timeout=timeout)
            ok = topic in meta.topics and meta.topics[topic].error is None
        except KafkaException:
            ok = False
        self.broker_down = not ok
        self._last_probe = time.monotonic()
        return ok

    async def available(self, topic: str) -> bool:
        """False while the broker is known to be down (re-probed at most once a second)."""
        if not self.broker_down:
            return True
        if time.monotonic() - self._last_probe < 1.0:
            return False
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.probe, topic, 1.0)

    async def send(
        self, records: Sequence[tuple[str, bytes | None, bytes]], timeout: float | None = None
    ) -> None:
        """Produce (topic, key, value) records and wait until the broker has all of them.
        Raises Unavailable when one failed, the queue is full, or ``timeout`` passed."""
        if not records:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        lock = threading.Lock()  # callbacks run on the poll thread, and in close()'s flush
        left = [len(records)]

        def settle(err: KafkaError | None, topic: str | None = None) -> None:
            if done.done():
                return
            if err is None:
                done.set_result(None)
            else:  # named, since a refusal (an ACL, a size) may concern one topic alone
                large = err.code() == KafkaError.MSG_SIZE_TOO_LARGE
                hint = _TOO_LARGE if large else ""
                done.set_exception(Unavailable(f"{topic}: {err}{hint}", too_large=large))

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if err is None:
                self.broker_down = False
            # RuntimeError: the loop that awaited it has ended (given up at close)
            with contextlib.suppress(RuntimeError):
                if err is not None:
                    loop.call_soon_threadsafe(settle, err, msg.topic())
                elif last:
                    loop.call_soon_threadsafe(settle, None)

        for topic, key, value in records:
            try:
                self._kafka.produce(topic, value, key, on_delivery)
            except BufferError:
                raise Unavailable("the producer queue is full") from None
        slow = loop.call_later(SLOW_ACK_SECONDS, _still_waiting, records)
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            raise Unavailable(f"the broker did not acknowledge within {timeout:.0f}s") from None
        finally:
            slow.cancel()

    def close(self, timeout: float = 30.0) -> int:
        """Deliver what is queued (up to ``timeout``), stop polling, and release the producer's
        connections and threads; how many were left undelivered, given up (their sends fail).
        Once closed, a second call returns 0.

        Without the release, a process that goes on after closing a sender (a test, an embedded
        worker) kept the producer's threads trying the broker for as long as anything held it."""
        if self._stop.is_set():
            return 0
        self._kafka.close()
        left = self._kafka.flush(timeout)
        self._stop.set()
        self._thread.join(5)
        if not self._thread.is_alive():  # else a poll may still be in the producer
            if left:  # or closing would wait for them until message.timeout.ms
                self._producer.purge()
                self._producer.flush(timeout)  # each reported as purged
            self._producer.close()
        return left
