"""Producing to Kafka from asyncio code: confluent-kafka's C producer, awaited per batch.

Used by the gateway (raw events) and the worker (clean events, dead letters, rollups, alerts).
librdkafka batches, compresses and retries on its own threads; a polling thread runs the
delivery callbacks, and one asyncio future per ``send`` call resolves when the broker holds
every record of it (acks=all, idempotent) or when the first one failed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline.kafkaconn import KafkaConnection
from pipeline.logs import RDKAFKA_LOGGER

log = logging.getLogger("vigil.producer")


class Unavailable(RuntimeError):
    """The broker did not take the records in time (or said no)."""


# The largest message the sender produces. librdkafka's default, 1,000,000 bytes, is below
# Kafka's own for a topic (1,048,588): an event the clean topic would take was refused before
# it was sent (MSG_SIZE_TOO_LARGE, raised by produce), and the worker that could not publish it
# stopped, at each restart. The topics' limits are the ones that hold (``validate.route``).
MESSAGE_BYTES = 64 * 1024 * 1024


class KafkaSender:
    """An idempotent acks=all producer with a polling thread, awaited per batch of records."""

    def __init__(self, kafka: KafkaConnection, config: dict[str, Any] | None = None) -> None:
        self._producer = Producer(
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

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
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
                done.set_exception(Unavailable(f"{topic}: {err}"))

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if err is not None:
                loop.call_soon_threadsafe(settle, err, msg.topic())
            else:
                self.broker_down = False
                if last:
                    loop.call_soon_threadsafe(settle, None)

        for topic, key, value in records:
            try:
                self._producer.produce(topic, value, key, on_delivery=on_delivery)
            except BufferError:
                raise Unavailable("the producer queue is full") from None
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            raise Unavailable(f"the broker did not acknowledge within {timeout:.0f}s") from None

    def close(self, timeout: float = 30.0) -> int:
        """Deliver what is queued (up to ``timeout``), stop polling; what is left undelivered."""
        left = int(self._producer.flush(timeout))
        self._stop.set()
        self._thread.join(5)
        return left
