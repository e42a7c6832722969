"""The Python SDK: ``emit(event)`` publishes one event to ``vigil.events.raw``.

The producer is idempotent with ``acks=all`` and compression; every delivery is reported, and
``close()`` flushes and raises if anything was not delivered. Given a spool folder
(``connectors.spool``), what the broker did not take in time, what would not fit the producer's
queue and what is still queued at ``close()`` is kept on disk and sent again once the broker
answers, by this emitter or the next one on that folder. The SDK encodes; it does not judge —
semantic validation is the pipeline's, so a bad event is visible in the DLQ rather than
silently dropped in a client.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from connectors.spool import Spool, SpoolError, Taken
from connectors.units import current_unit
from pipeline.codec import (
    ENCODE_ERRORS,
    OVERSIZED_MARK,
    UNENCODABLE_MARK,
    Registry,
    encode_failure,
    unencodable,
)
from pipeline.events import Event, InvalidEvent, event_from_json, event_to_json
from pipeline.logs import RDKAFKA_LOGGER
from pipeline.producer import RenewingProducer
from pipeline.settings import Settings
from pipeline.topics import batch_bytes, message_bytes

log = logging.getLogger(__name__)


class DeliveryError(RuntimeError):
    """Some events were not delivered to Kafka; ``failed`` counts them, the message says why."""

    def __init__(self, failed: int, reason: str) -> None:
        super().__init__(f"{failed} event(s) were not delivered to Kafka: {reason}")
        self.failed = failed


class EmitterClosed(RuntimeError):
    """An event given to an emitter after its ``close()``: nothing would deliver or keep it."""


# librdkafka's own limit on a message's key and value together, unless message.max.bytes says
LIBRDKAFKA_MESSAGE_BYTES = 1_000_000

# what to do when the broker refuses even the small message standing for one larger than the
# topic takes (``Emitter._stand_in``): an emitter sizes its messages by its config, not by the
# topic, which it does not ask (an agent's principal need not DESCRIBE_CONFIGS)
_TOO_LARGE = (
    " (the topic takes less than this emitter sends in one message: give it config="
    "{'message.max.bytes': N} with N below the topic's max.message.bytes; a larger event then "
    "goes for the DLQ as oversized)"
)

# after the first event not delivered is said, how long further ones are counted before the
# next line says how many (an outage without a spool wrote a line for each event)
FAILED_LOG_SECONDS = 10.0

# what a broker away for a while, or a stop, makes of a message: worth sending again
_TRANSIENT = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
    }
)


# what the dead letter of an event too large to send names it by
_IDENTITY = ("event_id", "kind", "ts", "tenant_id", "agent_id")


class Emitter:
    """A producer of Vigil events. Thread-safe; one per process is enough.

    ``spool``: a folder for what the broker does not take (above), at most ``spool_max_bytes``
    (every process's sharing it together); its segments are tried again every
    ``resend_seconds`` while any are waiting (None: only when the caller calls
    ``send_spooled``)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str = "vigil.events.raw",
        *,
        registry: Registry | None = None,
        config: Mapping[str, Any] | None = None,
        spool: Path | str | None = None,
        spool_max_bytes: int = 1 << 30,
        resend_seconds: float | None = 5.0,
    ) -> None:
        if spool_max_bytes < 1:
            raise ValueError(f"spool_max_bytes: expected at least 1 byte, got {spool_max_bytes}")
        if resend_seconds is not None and not resend_seconds > 0:  # nan too
            raise ValueError(
                f"resend_seconds: expected seconds above 0 or None, got {resend_seconds}"
            )
        self.topic = topic
        self._registry = registry or Registry.load()
        self._max_bytes = int((config or {}).get("message.max.bytes", LIBRDKAFKA_MESSAGE_BYTES))
        self._kafka = RenewingProducer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": "lz4",
                "linger.ms": 20,
                "batch.num.messages": 10000,
                "message.timeout.ms": 300000,
                # librdkafka's own lines (a broker unreachable...) through the agent's logging,
                # not straight to its stderr; served by each emit, flush and the spool's thread
                "logger": RDKAFKA_LOGGER,
                **(config or {}),
            }
        )
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0
        self.spooled = 0  # messages kept in the spool, counted as they are kept
        self._last_error: str | None = None
        self._unsaid = 0  # events counted failed since the last line said so
        self._said_at = float("-inf")  # when that line was written (monotonic)
        self._refused = False  # the spool refused a message since it last took one
        self._spool = Spool(Path(spool), spool_max_bytes) if spool is not None else None
        self._spooling = False  # since the last delivery: one warning a broker outage
        self._stopping = threading.Event()
        # emits between their check of ``_stopping`` and their produce(): close() waits for
        # them (one queued after its flush, or given to a closed producer, was lost)
        self._gate = threading.Condition()
        self._emitting = 0
        self._closed = False  # the producer closed, by close()
        self._giving_up = False  # close() purges what is still in flight
        self._resender: threading.Thread | None = None
        self._server: threading.Thread | None = None
        if self._spool is not None:
            if resend_seconds is not None:
                self._resender = threading.Thread(
                    target=self._resend, args=(resend_seconds,), name="vigil-spool", daemon=True
                )
                self._resender.start()
            atexit.register(self._close_at_exit)  # what is still queued, to the spool
        if self._resender is None:  # the reports of an idle emitter, served all the same
            self._server = threading.Thread(target=_serve, args=(weakref.ref(self),),
                                            name="vigil-emitter", daemon=True)  # fmt: skip
            self._server.start()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        config: Mapping[str, Any] | None = None,
        spool: Path | None = None,
        spool_max_bytes: int = 1 << 30,
        resend_seconds: float | None = 5.0,
    ) -> Emitter:
        """An emitter to the raw topic of ``settings``' cluster, signed in as they say
        (``VIGIL_KAFKA_SECURITY_PROTOCOL`` and the rest), its batches no larger than the topic
        takes (``topics.batch_bytes``); ``config`` adds producer properties. No spool unless
        given: the command line's senders say what was not delivered."""
        raw = message_bytes(settings, [settings.topics.raw], timeout=5.0)
        sized = {"batch.size": batch_bytes(raw.values())}
        return cls(
            settings.bootstrap,
            settings.topics.raw,
            config={**settings.kafka_security.librdkafka(), **sized, **(config or {})},
            spool=spool,
            spool_max_bytes=spool_max_bytes,
            resend_seconds=resend_seconds,
        )

    def __repr__(self) -> str:
        return (
            f"Emitter(topic={self.topic}, delivered={self.delivered}, failed={self.failed}, "
            f"spooled={self.spooled})"
        )

    @property
    def _producer(self) -> Producer:
        return self._kafka.producer  # a new one after a renewal (``RenewingProducer``)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if not self._settle(err, msg):
            self._count_failed(err)

    def _settle(self, err: KafkaError | None, msg: Message) -> bool:
        """Count a delivery, or keep a message the broker did not take for now; False when it
        was neither."""
        if err is None:
            with self._lock:
                self.delivered += 1
                recovered, self._spooling = self._spooling, False
                unsaid = self._unsaid
            if unsaid:
                self._say_failed()
            if recovered:
                log.info("the broker takes events again; the spool's are sent next")
            return True
        if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
            return self._stand_in(msg)
        return err.code() in _TRANSIENT and self._keep(msg.key(), msg.value() or b"", str(err))

    def _stand_in(self, msg: Message) -> bool:
        """Send, for the pipeline's DLQ, an ``oversized`` message naming one the topic refused
        by itself as larger than it takes (batches of several are made smaller first,
        ``RenewingProducer``): an emitter does not know the topic's max.message.bytes. False
        when it stood in for one already, or the producer does not take it."""
        value = msg.value() or b""
        if value.startswith(UNENCODABLE_MARK):
            return False
        try:
            event = self._registry.read_event(value)
            identity = {name: getattr(event, name) for name in _IDENTITY}
        except InvalidEvent:
            identity = {}  # bytes given to emit_raw: named by their key only
        refused = f"{self.topic} refused it as larger than it takes (max.message.bytes)"
        try:
            self._kafka.produce(
                self.topic,
                self._oversized("the event", len(value), identity, refused),
                msg.key(),
                self._on_delivery,
            )
        except (BufferError, KafkaException, RuntimeError):  # full, or closed
            return False
        log.warning("event %r is %d bytes encoded, more than %s takes; sent for the dead-letter "
                    "queue", identity.get("event_id"), len(value), self.topic)  # fmt: skip
        return True

    def _count_failed(self, err: KafkaError | None) -> None:
        """Count an event not delivered: said at once, then at most every FAILED_LOG_SECONDS
        with how many since (and when the broker takes events again, or at close)."""
        with self._lock:
            self.failed += 1
            if self._giving_up:  # close() says how many, once
                return
            self._last_error = str(err)
            if err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                self._last_error += _TOO_LARGE
            self._unsaid += 1
            if time.monotonic() - self._said_at < FAILED_LOG_SECONDS:
                return
        self._say_failed()

    def _say_failed(self) -> None:
        with self._lock:
            unsaid, self._unsaid = self._unsaid, 0
            self._said_at = time.monotonic()
        if unsaid == 1:
            log.error("event not delivered: %s", self._last_error)
        elif unsaid:
            log.error("%d more events not delivered (the last: %s)", unsaid,
                      self._last_error)  # fmt: skip

    def _keep(self, key: bytes | None, value: bytes, why: str) -> bool:
        """Put a message the broker did not take in the spool; False without one, or when it
        is full or cannot be written (said at ERROR)."""
        if self._spool is None:
            return False
        try:
            self._spool.append(key, value)
        except SpoolError as exc:
            with self._lock:  # said once until it takes one again: not once an event
                say, self._refused = not self._refused, True
            if say:
                log.error("the spool does not take what the broker did not (%s): %s", why,
                          exc)  # fmt: skip
            return False
        with self._lock:
            self.spooled += 1
            self._refused = False
            warn, self._spooling = not self._spooling, True
        if warn:
            log.warning(
                "the broker does not take events (%s); keeping them in %s until it does",
                why,
                self._spool.folder,
            )
        return True

    def emit(self, event: Event | Mapping[str, Any]) -> None:
        """Queue one event (an Event or its JSON form); inside ``unit_of_work`` an event without
        a unit gets the one in scope. Blocks only while the local queue is full (and a spool,
        if given, too). Raises InvalidEvent for a JSON form that is not an event, EmitterClosed
        once ``close()`` was called. An Event the schema cannot hold (a number past 64 bits, a
        lone surrogate), or larger than the producer sends (message.max.bytes) or the topic
        takes (refused by the broker), is sent as ``codec.unencodable`` instead, which the
        pipeline keeps in its DLQ with the reason (a WARNING here names the event)."""
        if not isinstance(event, Event):
            event = event_from_json(event)
        self._refuse_if_closed(f"event {event.event_id!r}")  # before encoding it for nothing
        if event.unit is None:
            unit = current_unit()
            if unit is not None:
                event = dataclasses.replace(event, unit=unit)
        try:
            value = self._registry.encode_event(event)
        except ENCODE_ERRORS as exc:
            # its message may quote a value (a prompt in the wrong field): the DLQ scrubs the
            # reason it keeps; this log names the kind of error only
            log.warning("event %r does not fit the event schema (%s); sent for the dead-letter "
                        "queue", event.event_id, type(exc).__name__)  # fmt: skip
            value = unencodable(encode_failure(exc), event_to_json(event))
        key = f"{event.tenant_id}/{event.agent_id}".encode()
        if len(key) + len(value) > self._max_bytes:
            # produce() refused it with a KafkaException out of emit (a prompt of 1 MB)
            log.warning("event %r is %d bytes encoded, more than this emitter sends; sent for "
                        "the dead-letter queue", event.event_id, len(value))  # fmt: skip
            identity = {name: getattr(event, name) for name in _IDENTITY}
            value = self._oversized("the event", len(value), identity)
        self.emit_raw(key, value)

    def _oversized(
        self, what: str, size: int, event: Mapping[str, Any], by: str | None = None
    ) -> bytes:
        """The message standing for ``what``, ``size`` bytes, too large for the producer (or as
        ``by`` says): for the pipeline's DLQ, as ``oversized`` (``codec``)."""
        by = by or f"its emitter sends {self._max_bytes:,} at most (message.max.bytes)"
        return unencodable(f"{OVERSIZED_MARK}{what} is {size:,} bytes encoded; {by}", event)

    def _refuse_if_closed(self, what: str) -> None:
        if self._stopping.is_set():
            # queued now, it would be in no flush and no spool: lost at exit without a word
            raise EmitterClosed(
                f"{what} given to the emitter to {self.topic} after its close(): it would be "
                "neither delivered nor kept; emit before close()"
            )

    def emit_raw(self, key: bytes | None, value: bytes) -> None:
        """Queue bytes as they are (for tests, replays and bridges that already encoded).
        Blocks only while the producer's queue is full and there is no room in a spool. Raises
        EmitterClosed once ``close()`` was called, or when it is called while this waits for
        room; ValueError for a message larger than the producer sends (message.max.bytes)."""
        if len(key or b"") + len(value) > self._max_bytes:
            raise ValueError(
                f"a message of {len(key or b'') + len(value):,} bytes (key and value) is more "
                f"than this emitter sends: {self._max_bytes:,} (message.max.bytes)"
            )
        with self._gate:
            self._refuse_if_closed("a message")
            self._emitting += 1
        try:
            if not self._produce(key, value, self._on_delivery, spill=True):
                raise EmitterClosed(
                    f"a message given to the emitter to {self.topic} was not queued: close() "
                    "was called while the producer's queue was full"
                )
            self._producer.poll(0)
        finally:
            with self._gate:
                self._emitting -= 1
                self._gate.notify_all()

    def _produce(self, key: bytes | None, value: bytes, on_delivery: Any, spill: bool) -> bool:
        """Queue one message; while the queue is full, spool it (``spill``) or wait. False
        only when the emitter is closing (and, spilling, the spool did not take it)."""
        while True:
            try:
                self._kafka.produce(self.topic, value, key, on_delivery)
                return True
            except BufferError:
                # the local queue is full: the spool, or wait for deliveries; never drop
                if spill and self._keep(key, value, "the producer's queue is full"):
                    return True
                if self._stopping.is_set():
                    return False
                self._producer.poll(0.1)

    def _resend(self, every: float) -> None:
        """The spool's thread: every ``every`` seconds, ``send_spooled``. It outlives what one
        round meets: dead, nothing the spool holds was sent until the agent restarted."""
        while not self._stopping.wait(every):
            try:
                self._producer.poll(0)  # reports, and so spooling, even while the agent idles
                self.send_spooled()
            except Exception as exc:  # said, and the next round tries again
                log.error("sending the spool in %s again failed (%s: %s); tried again in %g s",
                          self._spool.folder if self._spool else "-", type(exc).__name__, exc,
                          every)  # fmt: skip

    def send_spooled(self) -> int:
        """If the broker answers, send again, oldest first, the spool's segments no process is
        writing or sending, and wait for their reports; what fails again is spooled again, in
        a newer segment, sealed at the end so that it can be taken too. Blocks. Returns how
        many segments were sent: 0 without a spool, or while the broker does not answer."""
        if self._spool is None or self._closed or not self._spool.has_segments():
            return 0
        try:
            self._producer.list_topics(self.topic, timeout=5.0)
        except KafkaException:
            return 0  # the broker does not answer yet
        self._spool.seal()
        sent = 0
        while not self._stopping.is_set():
            taken = self._spool.take()
            if taken is None or not self._send_again(taken):
                break
            sent += 1
        self._spool.seal()
        return sent

    def _send_again(self, taken: Taken) -> bool:
        """Produce a taken segment's records and wait for every report; each ends delivered or
        in a newer segment (as does what a closing emitter did not produce), and then the
        segment is deleted. If one could be neither (the spool full), the segment stays whole
        instead, for a later try: a repeat of the others, which the ledger drops, rather than
        a loss. Returns whether it was deleted."""
        outstanding, kept_all = 0, True
        lock = threading.Lock()  # reports come on any thread that polls

        def reported(err: KafkaError | None, msg: Message) -> None:
            nonlocal outstanding, kept_all
            settled = self._settle(err, msg)
            with lock:
                outstanding -= 1
                kept_all = kept_all and settled

        sent = kept_back = 0
        for key, value in taken.records():
            if len(key or b"") + len(value) > self._max_bytes:
                # kept by an emitter that sent larger messages: produce() refused it with a
                # KafkaException, which ended the spool's thread; the pipeline's DLQ says so
                log.warning("a message of %d bytes in %s is more than this emitter sends; sent "
                            "for the dead-letter queue", len(value), taken.path.name)  # fmt: skip
                value = self._oversized("a message kept in the spool", len(value), {})
            with lock:
                outstanding += 1
            if not self._stopping.is_set() and self._produce(key, value, reported, spill=False):
                sent += 1
                continue
            kept_back += 1
            settled = self._keep(key, value, "the emitter is closing")
            with lock:
                outstanding -= 1
                kept_all = kept_all and settled
        while True:  # a closing emitter purges its queue, so this ends
            with lock:
                if outstanding == 0:
                    break
            self._producer.poll(0.2)
        if not kept_all:
            log.error("%s is kept whole for a later try: the spool could not take back what "
                      "failed again", taken.path.name)  # fmt: skip
            taken.release()
            return False
        taken.done()
        back = f" ({kept_back} kept back: the emitter is closing)" if kept_back else ""
        log.info("sent again %d event(s) kept in %s%s", sent, taken.path.name, back)
        return True

    def _close_at_exit(self) -> None:
        if self._stopping.is_set():
            return  # closed already
        try:
            self.close(timeout=5.0)
        except DeliveryError as exc:
            log.error("at exit: %s", exc)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding deliveries; return how many are still in flight."""
        if self._closed:
            return 0  # close() settled everything
        return self._kafka.flush(timeout)

    def close(self, timeout: float = 60.0) -> None:
        """Flush, for at most ``timeout`` seconds; then what is still in flight is given up,
        or with a spool kept there for the next emitter on its folder, and the producer's
        connections and threads are released. Raises DeliveryError if anything failed or was
        given up."""
        with self._gate:
            self._stopping.set()
            # an emit past its check queues before the flush; one waiting for room gives up
            self._gate.wait_for(lambda: self._emitting == 0, timeout)
        self._kafka.close()  # the producer flushed is the one closed
        remaining = self.flush(timeout)
        self._say_failed()  # what failed since the last line said so
        failed_before = self.failed
        if remaining:
            # each reported as purged: spooled, or counted as failed; left queued, they were
            # counted as lost and yet might be delivered later, by a producer no one polled
            with self._lock:
                self._giving_up = True
            self._producer.purge()
            self._producer.flush(timeout)
        given_up = self.failed - failed_before
        if given_up:
            log.error("%d event(s) still in flight after %g s given up", given_up, timeout)
        if self._spool is not None:
            if self._resender is not None:
                self._resender.join(timeout)
            self._spool.close()
            if self._spool.has_segments():
                log.warning(
                    "events the broker did not take are kept in %s (%d bytes) for the next "
                    "emitter there",
                    self._spool.folder,
                    self._spool.size,
                )
        if self._server is not None:
            self._server.join(timeout)
        polled = self._resender or self._server
        if not self._closed and not (polled and polled.is_alive()):
            self._producer.close()  # its threads stop trying the broker, and logging it
            self._closed = True
        if self.failed:
            why = [f"{given_up} still in flight after {timeout:g} s"] if given_up else []
            if failed_before:
                why.append(self._last_error or "")
            raise DeliveryError(self.failed, "; ".join(why))


# how often an emitter without a spool's thread serves its reports while the agent idles
SERVE_SECONDS = 1.0


def _serve(ref: weakref.ref[Emitter]) -> None:
    """The thread of an emitter without a spool's: its delivery reports and librdkafka's lines
    served every SERVE_SECONDS (else only at the agent's next emit, or at close: a failure was
    said, and an event too large for the topic sent for the DLQ, when the agent next emitted)
    until it is closed. It holds the emitter weakly: one dropped unclosed is collected."""
    emitter = ref()
    while emitter is not None:
        stopping = emitter._stopping
        del emitter  # held only while it polls, not while the thread waits
        if stopping.wait(SERVE_SECONDS):
            return
        emitter = ref()
        if emitter is not None:
            emitter._producer.poll(0)


_default: Emitter | None = None
_default_lock = threading.Lock()


def configure(emitter: Emitter) -> None:
    """Use ``emitter`` for module-level ``emit``."""
    global _default
    with _default_lock:
        _default = emitter


def emit(event: Event | Mapping[str, Any]) -> None:
    """Emit with the process-wide emitter (built from ``VIGIL_*`` settings on first use, with
    the spool of ``VIGIL_SDK_SPOOL_DIR`` if set, and flushed at exit)."""
    global _default
    with _default_lock:
        if _default is None:
            settings = Settings.from_env()
            _default = Emitter.from_settings(
                settings,
                spool=settings.sdk_spool,
                spool_max_bytes=settings.sdk_spool_max_bytes,
            )
            atexit.register(_default.close)
        emitter = _default
    emitter.emit(event)
