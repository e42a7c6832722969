"""The Python SDK: ``emit(event)`` publishes one event to ``vigil.events.raw``.

The producer is idempotent with ``acks=all`` and compression; every delivery is reported, and
``close()`` flushes and raises if anything was not delivered. The SDK encodes; it does not
judge — semantic validation is the pipeline's, so a bad event is visible in the DLQ rather than
silently dropped in a client.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from connectors.units import current_unit
from pipeline.codec import Registry
from pipeline.events import Event, event_from_json
from pipeline.settings import Settings

log = logging.getLogger(__name__)


class DeliveryError(RuntimeError):
    """Some events were not delivered to Kafka; ``failed`` counts them, the message says why."""

    def __init__(self, failed: int, reason: str) -> None:
        super().__init__(f"{failed} event(s) were not delivered to Kafka: {reason}")
        self.failed = failed


class Emitter:
    """A producer of Vigil events. Thread-safe; one per process is enough."""

    def __init__(
        self,
        bootstrap: str,
        topic: str = "vigil.events.raw",
        *,
        registry: Registry | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self._registry = registry or Registry.load()
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": "lz4",
                "linger.ms": 20,
                "batch.num.messages": 10000,
                "message.timeout.ms": 300000,
                **(config or {}),
            }
        )
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0
        self._last_error: str | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, *, config: Mapping[str, Any] | None = None
    ) -> Emitter:
        """An emitter to the raw topic of ``settings``' cluster, signed in as they say
        (``VIGIL_KAFKA_SECURITY_PROTOCOL`` and the rest); ``config`` adds producer properties."""
        return cls(
            settings.bootstrap,
            settings.topics.raw,
            config={**settings.kafka_security.librdkafka(), **(config or {})},
        )

    def __repr__(self) -> str:
        return f"Emitter(topic={self.topic}, delivered={self.delivered}, failed={self.failed})"

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        with self._lock:
            if err is None:
                self.delivered += 1
            else:
                self.failed += 1
                self._last_error = str(err)
                log.error("event not delivered: %s", err)

    def emit(self, event: Event | Mapping[str, Any]) -> None:
        """Queue one event (an Event or its JSON form); inside ``unit_of_work`` an event without
        a unit gets the one in scope. Blocks only while the local queue is full. Raises
        InvalidEvent for a JSON form that is not an event, ValueError for an Event that does
        not fit the schema."""
        if not isinstance(event, Event):
            event = event_from_json(event)
        if event.unit is None:
            unit = current_unit()
            if unit is not None:
                event = dataclasses.replace(event, unit=unit)
        value = self._registry.encode_event(event)
        self.emit_raw(f"{event.tenant_id}/{event.agent_id}".encode(), value)

    def emit_raw(self, key: bytes | None, value: bytes) -> None:
        """Queue bytes as they are (for tests, replays and bridges that already encoded)."""
        while True:
            try:
                self._producer.produce(self.topic, value, key, on_delivery=self._on_delivery)
                break
            except BufferError:
                # the local queue is full: wait for deliveries rather than drop
                self._producer.poll(0.1)
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding deliveries; return how many are still in flight."""
        return int(self._producer.flush(timeout))

    def close(self, timeout: float = 60.0) -> None:
        """Flush. Raises DeliveryError if anything failed or is still in flight."""
        remaining = self.flush(timeout)
        if remaining or self.failed:
            raise DeliveryError(
                remaining + self.failed,
                self._last_error or f"{remaining} still in flight after {timeout}s",
            )


_default: Emitter | None = None
_default_lock = threading.Lock()


def configure(emitter: Emitter) -> None:
    """Use ``emitter`` for module-level ``emit``."""
    global _default
    with _default_lock:
        _default = emitter


def emit(event: Event | Mapping[str, Any]) -> None:
    """Emit with the process-wide emitter (built from ``VIGIL_*`` settings on first use and
    flushed at exit)."""
    global _default
    with _default_lock:
        if _default is None:
            settings = Settings.from_env()
            _default = Emitter.from_settings(settings)
            atexit.register(_default.close)
        emitter = _default
    emitter.emit(event)
