"""The Faust worker: the topology, top to bottom. Agents only wire stages to topics and sinks.

    vigil.events.raw  --validate-->  vigil.events.clean  --ledger-->  vigil.audit_log
                           \\------>  vigil.events.dlq   --dlq----->  vigil.dlq
    what the ledger stored  --rollups (1-minute windows)-->  vigil.rollups
                            --alert evaluators-->  vigil.alerts (table and topic), webhooks

A worker runs one of three roles (``vigil worker --role``):
- ``all`` (the default): every agent in one process;
- ``store``: the ledger and DLQ agents, the lag sampler; it owns ClickHouse;
- ``validate``: the validate agent alone; it never opens ClickHouse, so any number of them can
  run beside one ``store`` process, on this machine or others (they share the raw group).
One process runs Python on one core at a time (the GIL). Split in two, validate and store use
both cores of a 2-core machine: 1.5-2.8x the events/s of one process (docs/benchmarks.md).

Emitters publish one event per raw message, so validate reads raw in batches with
confluent-kafka (``pipeline.batchconsumer``, in the raw group ``raw_group``), not through a
Faust stream, whose per-message delivery cost more than validation. Validate publishes clean
events in EventBatch messages, one or more per key (the tenant: ``validate.clean_key``) and
batch (``validate.clean_batches``): the ledger, a Faust agent, then pays Faust's per-message
delivery once per batch, not per event.

Every agent takes a batch without acknowledging it, does its work, waits until the work is
durable (sends delivered, insert committed), and only then acknowledges (validate: commits),
so offsets never pass an event that is not safely stored. Faust consumes and commits clean and
DLQ; what the agents publish goes through one confluent-kafka producer (``pipeline.producer``),
awaited per batch. Processing is at-least-once; sinks are idempotent.
A failing ClickHouse is retried with backoff and holds consumption (backpressure): the
backlog stays in Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import aiokafka
import faust
import mode
from confluent_kafka import KafkaException
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.utils.futures import notify

from pipeline.access import apply_policies
from pipeline.acls import prepare as prepare_kafka
from pipeline.alerting import (
    ALERT_COLUMNS,
    ALERT_DELIVERY_TABLE,
    ALERT_TABLE,
    CAUGHT_UP_COLUMNS,
    CAUGHT_UP_TABLE,
    DELIVERY_COLUMNS,
    CaughtUp,
    HeldAlerts,
    Notifier,
    alert_json,
    alert_row,
    pending_rows,
    replay_ledger,
    unraised,
)
from pipeline.alerts import Alert, AlertRules, Evaluator
from pipeline.batchconsumer import BatchConsumer, adopt_offsets
from pipeline.certs import ServedCertificate, kafka_expiries, say_expiring
from pipeline.check import grants_at_start, sizes_at_start
from pipeline.codec import DEAD_LETTER_SCHEMA, Registry
from pipeline.config import Config, load_config
from pipeline.detectors import BACKTRACK_ADVICE, CUSTOM_PATTERN_SECONDS
from pipeline.dlq import dead_letter, kept_payload
from pipeline.enrich import enrich
from pipeline.events import Event
from pipeline.fence import Fence, Moved
from pipeline.handoff import HandOff, wait_for_room
from pipeline.health import HealthServer, WorkerStatus
from pipeline.lag import (
    LAG_COLUMNS,
    LAG_TABLE,
    Gap,
    caught_up_groups,
    consumer_lag,
    lag_groups,
    raw_group,
)
from pipeline.logs import hold_back_repeats
from pipeline.owner import OwnerServer
from pipeline.producer import MESSAGE_BYTES, KafkaSender, Unavailable
from pipeline.progress import Progress
from pipeline.redact import Policy
from pipeline.rollup import Rollups
from pipeline.rows import Origin
from pipeline.services import WORKER_READY
from pipeline.settings import WORKER_ROLES, ConfigError, Settings
from pipeline.sink import DlqSink, LedgerSink, Message, WriteResult
from pipeline.store import (
    ClickHouseStore,
    StoreError,
    connect,
    ensure_not_owned,
    migrate,
    require_migrated,
)
from pipeline.topics import FRAMING_BYTES, batch_bytes, event_bytes, message_bytes_again
from pipeline.validate import clean_batch_bytes, clean_batches, route

log = logging.getLogger("vigil.worker")
VALIDATE_BATCH = 2000
VALIDATE_WITHIN = 0.1
# What one batch may hold in message bytes, whatever its count of events: a batch is full at
# its count of events or at this many bytes, whichever comes first (``BatchConsumer.take`` for
# validate, ``batch_weight`` for the sinks). Prompts with retrieved context make events of
# 50-100 KB: LedgerSink.write alone peaked at 2.0 GB with 5,000 such events an insert, at
# 0.93 GB with 650 (docs/benchmarks.md, "Large events").
VALIDATE_BATCH_BYTES = 16 * 1024 * 1024
SINK_BATCH_BYTES = 32 * 1024 * 1024
# how long a lag sample waits for each of Kafka's answers
LAG_TIMEOUT_SECONDS = 10.0
# The Kafka session timeout of the worker's consumer: a member silent for longer leaves its
# group, which gives its partitions to another. The store agents write only while the broker
# confirmed this worker's membership within half of it (``Fence``), and the ledger trusts the
# chain ends it remembers only this long after its last insert (``sink.ChainEnds``).
SESSION_TIMEOUT_SECONDS = 10.0
# How long a stopping worker waits for its last commit of clean and DLQ offsets. It takes
# milliseconds when the broker answers; when it does not, the worker stops anyway.
FINAL_COMMIT_SECONDS = 5.0
# How long the Kafka consumer of clean and the DLQ may take to stop (leave its group, close its
# fetcher) before its connections are closed under it: a broker that does not answer held it
# for aiokafka's request timeout
CONSUMER_STOP_SECONDS = 10.0
# How long a stopping worker waits for the insert in flight before it leaves its group, after
# which its partitions go to other workers (``_Consumer.on_stop``): an insert of a full batch
# takes about a second here.
FINAL_WRITE_SECONDS = 30.0
# How long a rebalance, or a stopping worker, waits for what follows an insert that landed (its
# dead letters, rollups, alerts and acknowledgement: milliseconds while Kafka and ClickHouse
# answer) before it gives the partitions up; at a rebalance the step finishes afterwards
# (``Fence.revoked``).
LANDED_STEP_SECONDS = 5.0
# How long a stopping worker waits for the raw consumer to commit its last batch and leave its
# group. librdkafka's commit and close wait for the group coordinator: with the broker down
# they took about 10 s, and once a SIGTERM waited on them until the worker was killed.
RAW_CLOSE_SECONDS = 10.0
# How many clean-topic messages the store side holds fetched, ahead of the ledger. Faust's
# default (stream_buffer_maxsize, 4,096) counts messages; a clean message is an EventBatch of
# up to 192 KiB, so while the ledger waits (ClickHouse down) with a backlog on the topic, that
# default would let about 800 MB pile up in memory. Fetching pauses at 80% of this.
CLEAN_BUFFER = 256
# How long a fetch may wait at the broker for data. Faust fixes it at 1,500 ms. aiokafka leaves
# a partition whose fetched records are not yet consumed out of the next fetch, so that fetch
# asks only for the idle partitions (the DLQ, say) and waits the whole time while new events
# pile up on the busy ones. After a stall the worker then fetched every ~1.5 s and a queue of
# ~3 s never drained (measured: docs/benchmarks.md, "Freshness after a stall").
FETCH_MAX_WAIT_MS = 100
# The cyclic garbage collector's thresholds in the worker (Python's default: 700, 10, 10). The
# young generation is collected once the objects allocated since the last collection, less those
# freed, pass the first threshold, and a batch keeps its events, rows and messages alive until it
# is stored: each collection walked them, still in use. LedgerSink.write took 84 us an event at the
# default, 61 at 100,000, 59 with the collector off; at 100,000 a collection still ran in 18 of the
# split store process's 21 batches of a drain (35 ms each, 3.2 us an event), at 300,000 none did
# (docs/benchmarks.md, "The garbage collector between batches"). What the batches allocate is freed
# by reference counts: at 100,000 the collections found about 700 objects in cycles in that drain.
# The other two thresholds stay Python's: with rarer full collections too (100,000 / 50 / 100) the
# 10-minute soak's RSS was 60 MB higher and still climbing (before each insert's reference cycle
# was broken, store._release).
GC_THRESHOLDS = (300_000, 10, 10)
# How long a thread holds the GIL before another that wants it is let in (Python's default:
# 5 ms). Validate (on the event loop) and the ledger (in its executor) both run Python for as
# long as they have events, so they handed the GIL to each other 200 times a second. At 50 ms
# a 60,000-event drain ran 6-12% faster, at 20 ms about half of that, at 200 ms no more
# (docs/benchmarks.md, "One scan for redaction, a flat enrichment writer, and the GIL's switch
# interval"); what a hand-over costs (the handshake, caches the other thread refilled) was not
# broken down. A thread waking from I/O waits at most this long while both run: well within
# freshness's seconds and a 10 s session timeout.
SWITCH_INTERVAL_SECONDS = 0.05
# What a sink's rows stored and repeats dropped count as in the worker's progress line
# (``pipeline.progress``); what a sink rejects (only the ledger does) goes to the DLQ.
SINK_COUNTS = {
    "ledger": ("stored", "repeats dropped"),
    "dlq": ("dead letters stored", "dead letters repeated"),
}
_T = TypeVar("_T")
_Record = tuple[str, bytes | None, bytes]  # a topic, a key and a value, to publish


def consumer_group(settings: Settings, role: str) -> str:
    """The Faust app id of a role: the base group, whose Faust consumer reads clean and DLQ.
    The validate role reads raw only, outside Faust, so its app joins no group; it is named
    after the raw group."""
    return raw_group(settings) if role == "validate" else settings.consumer_group


def read_groups(settings: Settings, role: str) -> list[tuple[str, tuple[str, ...]]]:
    """(group, topics) a role reads: raw in the raw group (``all`` and ``validate``), clean and
    the DLQ in the base group (``all`` and ``store``)."""
    validate, store = lag_groups(settings)
    return {"validate": [validate], "store": [store]}.get(role, [store, validate])


def say_deleted_unread(settings: Settings, role: str) -> None:
    """Log at ERROR each partition the role reads whose committed offset the topic's retention
    has deleted past (the worker was down, or behind, for longer than the topic keeps
    messages): the messages between were lost unread, and the group's consumer will read on
    from the first one kept, as ``auto.offset.reset`` says."""
    for group, topics in read_groups(settings, role):
        try:
            _, gaps = consumer_lag(settings.kafka, group, topics)
        except KafkaException as exc:
            log.warning("group %s's offsets not checked against the topics' retention: %s",
                        group, exc)  # fmt: skip
            continue
        for gap in gaps:
            log.error("%s", gap.said(group))


def batch_weight(events: int, size: int, batch_events: int, batch_bytes: int) -> int:
    """A message's share of a batch that is full at ``batch_events`` events or ``batch_bytes``
    bytes, whichever comes first: its events, or its bytes counted in units of
    ``batch_bytes / batch_events``, whichever is more."""
    unit = max(1, batch_bytes // batch_events)
    return max(events, -(-size // unit))


def _message(event: Any) -> Message:
    m = event.message
    return Message(Origin(m.topic, m.partition, m.offset), m.key, _value(event))


def _value(event: Any) -> bytes:
    """A Faust event's message value; a tombstone's (null) as empty bytes, which the sinks
    reject to the DLQ as truncated, as the raw consumer does (``BatchConsumer``)."""
    value: bytes | None = event.message.value
    return value or b""


# Failed attempts the worker retried, by what failed: this process's, for its /metrics
# (``pipeline.health``, on another thread: every key is here from the start, so the mapping
# never changes size while it is read)
RETRIED: Counter[str] = Counter({"insert": 0, "publish": 0, "alert state": 0})


async def _until_done(
    what: str,
    attempt: Callable[[], Awaitable[_T]],
    errors: tuple[type[Exception], ...],
    counted_as: str,
) -> _T:
    """Await ``attempt()`` until it succeeds, backing off from 0.5 s up to 30 s on ``errors``,
    each failure counted in RETRIED under ``counted_as``; meanwhile nothing is acknowledged,
    so the backlog waits in Kafka."""
    delay = 0.5
    while True:
        try:
            return await attempt()
        except errors as exc:
            RETRIED[counted_as] += 1
            log.warning("%s failed, retrying in %.1fs: %s", what, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def _publish(
    sender: KafkaSender,
    records: Sequence[_Record],
    remade: Callable[[], Awaitable[Sequence[_Record]]] | None = None,
) -> None:
    """Publish until the broker holds every record. A repeat after a partial failure is
    harmless: the sinks drop what is already stored. With ``remade``, a refusal of a record as
    larger than its topic takes has the records made again by it for the next try."""
    pending = records

    async def attempt() -> None:
        nonlocal pending
        try:
            await sender.send(pending)
        except Unavailable as exc:
            if exc.too_large and remade is not None:
                pending = await remade()
            raise  # counted, and tried again after the back-off

    await _until_done(f"publishing {len(records)} records", attempt, (Unavailable,), "publish")


async def _pipelined(
    batches: AsyncIterator[list[_T]], work: Callable[[list[_T]], Awaitable[None]]
) -> None:
    """Hand each batch of ``batches`` to ``work``, which acknowledges (or commits) it once
    durable. One batch in flight: the next batch is taken while ``work`` runs, and ``work``
    runs on one batch at a time, in order.

    If ``work`` fails, this raises its error at once, even while no next batch comes, so the
    agent crashes (and the worker stops) rather than sit idle with a batch unacknowledged."""
    agent = asyncio.current_task()
    in_flight: asyncio.Future[None] | None = None

    def wake_on_failure(done: asyncio.Future[None]) -> None:
        if agent is not None and not done.cancelled() and done.exception() is not None:
            agent.cancel()  # interrupts the wait for the next batch; re-raised below

    try:
        async for batch in batches:
            if in_flight is not None:
                await in_flight
            in_flight = asyncio.ensure_future(work(batch))
            in_flight.add_done_callback(wake_on_failure)
    except asyncio.CancelledError:
        failure = None
        if in_flight is not None and in_flight.done() and not in_flight.cancelled():
            failure = in_flight.exception()
        if failure is None:
            raise  # a real cancellation: shutdown or rebalance
        raise failure from None


async def _ack(stream: Any, batch: Sequence[Any]) -> None:
    for event in batch:
        await stream.ack(event)


async def _retrying(
    executor: ThreadPoolExecutor,
    what: str,
    rows: int,
    call: Callable[[], _T],
    fence: Fence | None = None,
    batch: Sequence[Any] = (),
    landed: Callable[[_T], Awaitable[None]] | None = None,
) -> _T:
    """Run ``call`` (a blocking ClickHouse write) on the executor until it succeeds. With a
    ``fence``, every attempt first checks that this worker still holds ``batch``'s partitions
    (``Fence.write``), and Moved is raised once it does not; ``landed(result)`` then follows
    the attempt that succeeds, even if this is cancelled meanwhile."""
    attempt: Callable[[], Awaitable[_T]]
    if fence is None:
        attempt = partial(asyncio.get_running_loop().run_in_executor, executor, call)
    else:
        attempt = partial(fence.write, batch, executor, call, landed)
    return await _until_done(f"{what}: insert of {rows} rows", attempt, (StoreError,), "insert")


def _record_heartbeats(coordinator: Any, confirmed: Callable[[float], None]) -> None:
    """After each heartbeat of aiokafka's group ``coordinator`` that the broker answered
    without error, call ``confirmed`` with the ``time.monotonic()`` it was sent at: the broker
    counted this consumer a member of its group, in the generation it knows, when it received
    it, which was no sooner."""
    heartbeat = coordinator._do_heartbeat

    async def recorded() -> Any:
        sent = time.monotonic()
        succeeded = await heartbeat()
        if succeeded:
            confirmed(sent)
        return succeeded

    coordinator._do_heartbeat = recorded


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    # time.monotonic() when the broker last confirmed this consumer a member of its group: the
    # last heartbeat it answered, or the last assignment (0.0: neither yet). Written on this
    # thread, read on the event loop's (one float).
    last_confirmed = 0.0

    def _create_worker_consumer(
        self, transport: faust_aiokafka.Transport
    ) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when the consumer starts
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        coordinator = getattr(self._consumer, "_coordinator", None)  # made by its start
        if not hasattr(coordinator, "_do_heartbeat"):
            # without the record, every write would wait for a confirmation that never comes
            raise RuntimeError(
                "aiokafka's group coordinator has no _do_heartbeat to record heartbeats by: "
                "install the aiokafka version pyproject.toml pins"
            )
        _record_heartbeats(coordinator, partial(setattr, self, "last_confirmed"))

    async def on_partitions_assigned(self, assigned: set[Any], generation_id: int = 0) -> None:
        # called once the broker has answered this member's SyncGroup: the group's first
        # heartbeat comes only a heartbeat interval later
        self.last_confirmed = time.monotonic()
        await super().on_partitions_assigned(assigned, generation_id)

    async def on_thread_stop(self) -> None:
        """Stop the consumer within CONSUMER_STOP_SECONDS, also while the broker is unreachable
        or does not answer.

        A broker that takes connections and answers nothing (a network partition that drops
        packets, a frozen host) held the stop for aiokafka's request timeout: its leave-group
        and the last commit waited on it, Faust gave the consumer thread 60 s, and the thread
        kept the process alive after that, about 90 s in all, where an orchestrator kills after
        30. Past the bound, the client's connections are closed, which fails what still waits
        on them. What the last commit would have covered is read again after a restart."""
        try:
            await asyncio.wait_for(self._stop_consumer(), CONSUMER_STOP_SECONDS)
        except TimeoutError:
            log.warning("the Kafka consumer did not stop within %.0f s (the broker does not "
                        "answer); its connections are closed", CONSUMER_STOP_SECONDS)  # fmt: skip
            if self._consumer is not None:
                await self._consumer._client.close()

    async def _stop_consumer(self) -> None:
        """aiokafka's ``Fetcher.close`` cancels its fetch tasks and awaits them; one that waits
        out its retry backoff after a failed fetch (the broker is down) ends in CancelledError,
        which escapes ``close``. Faust's consumer thread then never reported that it had
        stopped, and the worker did not exit on SIGTERM until something killed it. What
        ``stop`` did not reach after the fetcher is closing the client's connections."""
        try:
            await super().on_thread_stop()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this stop was cancelled (by its bound): not the fetcher's leftover
            log.info("Kafka consumer stopped while a fetch was still retrying")
            if self._consumer is not None:
                await self._consumer._client.close()


async def _finish(coro: Coroutine[Any, Any, Any], blocked_on: Any) -> Any:
    """Run the rest of ``coro``, which suspended on ``blocked_on`` (what it yielded) at its
    first step, as a Task would: wait for that future, resume, repeat. If this is cancelled
    meanwhile, the cancellation is thrown into ``coro`` at the point where it waits."""
    try:
        while True:
            try:
                if blocked_on is None:  # a bare yield (asyncio.sleep(0)): one turn of the loop
                    await asyncio.sleep(0)
                else:
                    blocked_on._asyncio_future_blocking = False
                    await asyncio.wait((blocked_on,))
            except BaseException as exc:  # handed to the coroutine, as a Task does
                blocked_on = coro.throw(exc)
            else:
                blocked_on = coro.send(None)
    except StopIteration as done:
        return done.value


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def since_confirmed(self) -> float:
        """Seconds since the broker last confirmed this worker a member of its group."""
        return time.monotonic() - cast(_ConsumerThread, self._thread).last_confirmed

    async def on_stop(self) -> None:
        """Faust's last commit on stop, given ``FINAL_COMMIT_SECONDS``. aiokafka retries a
        commit until a group coordinator answers, so while the broker was down the worker waited
        for it forever on SIGTERM. What that commit would have covered is read again after the
        restart, and the sinks store it once.

        The commit is left running, not cancelled: Faust's commit takes a cancelled wait for an
        earlier commit as the cue to start another (``maybe_wait_for_commit_to_finish``), and
        the worker's shutdown cancels whatever is still running at the end.

        Before that, the store agents' insert in flight is given ``FINAL_WRITE_SECONDS`` to
        land, and what follows it ``LANDED_STEP_SECONDS`` more (``Fence.revoked``): the agents
        are stopped first, and the insert went on after the worker had left its group, while
        another worker read the same events again; once it lands, its rollups and alerts are
        published and its batch acknowledged, so this commit passes it (with the broker down,
        neither the publishing nor the commit can land, and the stop does not wait long). A
        rebuild of the alert state in progress is given up (``HeldAlerts.revoked``): the
        interpreter's exit would wait for its replay to end."""
        alerts = getattr(self.app, "alerts", None)
        if alerts is not None:
            alerts.revoked()
        fence = getattr(self.app, "fence", None)
        if fence is not None:
            try:
                await asyncio.wait_for(fence.revoked(LANDED_STEP_SECONDS), FINAL_WRITE_SECONDS)
            except TimeoutError:
                log.warning("the insert in flight (or what follows it) did not finish within "
                            "%.0fs; the worker leaves its group before it is done",
                            FINAL_WRITE_SECONDS)  # fmt: skip
        commit = asyncio.ensure_future(super().on_stop())
        done, _ = await asyncio.wait((commit,), timeout=FINAL_COMMIT_SECONDS)
        if done:
            commit.result()  # its error, if any, as Faust's own on_stop would raise it
        else:
            log.warning("the last commit of group %s did not finish within %.0fs; what it "
                        "covered is read again on restart", self.app.conf.id,
                        FINAL_COMMIT_SECONDS)  # fmt: skip

    async def wait_first(self, *coros: Any, timeout: Any = None) -> mode.services.WaitResults:
        """Deliver a fetched message without four tasks when delivery does not block.

        Faust's fetch loop hands every message to its stream through
        ``wait_first(deliver(message), suspend_flow.wait())`` so that a rebalance can abandon
        a delivery stuck on a full stream buffer. That creates four tasks and an
        ``asyncio.wait`` per message: a third of what a do-nothing agent costs (about 16,000
        -> 24,000-26,000 events/s without it, docs/benchmarks.md). Here the delivery runs its
        first step at once; nearly always it finishes there (the buffer has room). If it
        suspends instead, its rest goes through Faust's own ``wait_first``, exactly as before."""
        if len(coros) == 2 and timeout is None and inspect.iscoroutine(coros[0]):
            delivery, suspended = coros
            if not self.suspend_flow.is_set():
                try:
                    blocked_on = delivery.send(None)
                except StopIteration as done:
                    suspended.close()  # never started
                    return mode.services.WaitResults([delivery], [done.value], False)
                except BaseException:
                    suspended.close()
                    raise
                coros = (_finish(delivery, blocked_on), suspended)
        return await super().wait_first(*coros, timeout=timeout)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class WorkerStream(faust.Stream):  # type: ignore[type-arg]
    """faust.Stream with a take whose batches are full by weight rather than by count."""

    def noack_take_weighted(
        self, max_weight: int, within: float, weight: Callable[[Any], int]
    ) -> AsyncGenerator[list[Any], None]:
        """Faust's ``noack_take``: events in batches, none acknowledged, a batch yielded once
        ``within`` seconds pass or it is full; but full once its events' ``weight`` adds up to
        ``max_weight``, not once it holds ``max_`` events. The worker weighs a message by the
        events it carries (a clean message is an EventBatch) or by its bytes, whichever is more
        (``batch_weight``)."""
        batches = self._take_weighted(max_weight, within, weight)
        self._active_agens.add(batches)  # closed on stop, as Faust does with its own takes
        return batches

    async def _take_weighted(
        self, max_weight: int, within: float, weight: Callable[[Any], int]
    ) -> AsyncGenerator[list[Any], None]:
        buffer: list[Any] = []
        weighed = 0
        full = asyncio.Event()
        consumed = asyncio.Event()
        consuming: asyncio.Future[None] | None = None

        async def add_to_buffer(value: Any) -> Any:
            # Runs in the stream's passive drainer for every event, as Faust's take does.
            nonlocal consuming, weighed
            try:
                if consuming is not None:  # the batch is being handed out: wait for that
                    try:
                        await consuming
                    finally:
                        consuming = None
                event = self.current_event
                if event is None:
                    raise RuntimeError("take buffer found current_event is None")
                buffer.append(event)
                weighed += weight(event)
                if weighed >= max_weight:
                    full.set()
                    consumed.clear()
                    await self.wait(consumed)  # type: ignore[arg-type]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.exception("Error adding to take buffer: %r", exc)
                await self.crash(exc)
            return value

        acks_were_enabled = self.enable_acks
        self.enable_acks = False
        self.add_processor(add_to_buffer)
        self._enable_passive(aiter(self.channel))  # type: ignore[arg-type]
        try:
            while not self.should_stop:
                await self.wait_for_stopped(full, timeout=within)  # type: ignore[arg-type]
                if buffer:
                    consuming = self.loop.create_future()
                    try:
                        yield list(buffer)
                    finally:
                        buffer.clear()
                        weighed = 0
                        notify(consuming)
                        full.clear()
                        consumed.set()
        finally:
            self.enable_acks = acks_were_enabled
            self._processors.remove(add_to_buffer)


class WorkerApp(faust.App):
    """faust.App whose Kafka consumer fetches with ``FETCH_MAX_WAIT_MS`` and hands a fetched
    message to its stream without tasks when that does not block (``_Consumer.wait_first``),
    which keeps no per-message statistics, and whose streams are ``WorkerStream``s (the
    weighted take ``_pipelined`` uses)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("Stream", WorkerStream)
        super().__init__(*args, **kwargs)
        self.fence: Fence | None = None  # the store agents' (``_add_store``)
        self.alerts: HeldAlerts | None = None  # theirs too, with alert rules
        self.receivers: list[Callable[..., Awaitable[None]]] = []  # its signals' (``_add_store``)

    def _new_transport(self) -> faust_aiokafka.Transport:
        return _Transport(self.conf.broker_consumer, self)

    def on_init_dependencies(self) -> Iterable[mode.ServiceT]:
        """Faust's Monitor is also a sensor that records statistics for every message in, event
        in and out and message acknowledged. Only Faust's web views read them, and the worker
        runs none; they cost about 4 µs a message at each hop (a do-nothing agent: 20,260 ->
        22,000 events/s). The monitor itself stays: the consumer reports offsets to it."""
        dependencies = super().on_init_dependencies()
        self.sensors.remove(self.monitor)
        return dependencies


def build_app(
    settings: Settings,
    config: Config,
    store: ClickHouseStore | None,
    registry: Registry,
    rules: AlertRules | None,
    notifier: Notifier | None,
    sender: KafkaSender,
    role: str = "all",
    progress: Progress | None = None,
    status: WorkerStatus | None = None,
    sizes: Mapping[str, int] | None = None,
) -> faust.App:
    """The Faust app with the agents of ``role`` (``WORKER_ROLES``). ``store`` is used from one
    executor thread; the validate role has none. With ``rules``, every event the ledger stores is
    evaluated against them (``HeldAlerts``); the alerts are stored, published and handed to
    ``notifier``. ``sender`` publishes everything the agents send. The agents count what they
    do in ``progress``, logged every ``settings.progress_seconds``. ``status`` (what the
    worker's HTTP endpoint reports) learns when the agents start and each lag sample.
    ``sizes``: the topics' max.message.bytes as read at start (``check.sizes_at_start``), which
    the clean events and the dead letters are sized by (Kafka's default where not said)."""
    if role not in WORKER_ROLES:
        raise ValueError(f"worker role {role!r} is not one of {', '.join(WORKER_ROLES)}")
    if store is None and role != "validate":
        raise ValueError(f"the {role} role writes to ClickHouse and needs a store")
    app = WorkerApp(
        consumer_group(settings, role),
        broker=f"kafka://{settings.bootstrap}",
        broker_credentials=settings.kafka_security.faust_credentials(),
        store="memory://",
        datadir=str(settings.home / "faust"),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=SESSION_TIMEOUT_SECONDS,
        broker_heartbeat_interval=2.0,
        broker_commit_interval=1.0,
        producer_acks=-1,
        producer_compression_type="lz4",
        topic_allow_declare=False,
        topic_disable_leader=True,
        # unacknowledged events are simply re-read after a restart; do not wait for them
        stream_wait_empty=False,
        # an agent that crashes stops the worker (non-zero exit) instead of leaving it idle
        agent_supervisor=mode.CrashingSupervisor,
    )

    @app.task  # type: ignore[untyped-decorator]
    async def announce() -> None:
        log.info("%s role %s, consumer group %s", WORKER_READY, role, app.conf.id)
        if status is not None:
            status.loop = asyncio.get_running_loop()

    # one process runs both stages: the ledger takes validate's events as they were built
    handoff = HandOff() if role == "all" else None
    progress = progress if progress is not None else Progress()
    if handoff is not None:
        progress.track(lambda: {"handed over": handoff.taken, "decoded again": handoff.missed})

    @app.timer(settings.progress_seconds)  # type: ignore[untyped-decorator]
    async def report_progress() -> None:
        log_progress(progress)

    sizing = _Sizing(settings, sizes or {})  # read again by either stage on a refusal
    if role in ("all", "validate"):
        _add_validate(app, settings, config, registry, sender, handoff, progress, sizing)
    if role == "validate":
        # no Faust agent reads a topic: start no Faust consumer, join no group, and wait for
        # no partition assignment before starting the tasks
        app.producer_only = True
    if role in ("all", "store"):
        assert store is not None
        _add_store(
            app, settings, store, registry, rules, notifier, sender, handoff, progress, status,
            sizing, config.scrub,
        )  # fmt: skip
    return app


def log_progress(progress: Progress, final: bool = False) -> None:
    """Log ``progress`` at INFO, if there is anything new to say (``Progress.line``)."""
    line = progress.line(final)
    if line is not None:
        log.info("%s", line)


def _add_validate(
    app: faust.App,
    settings: Settings,
    config: Config,
    registry: Registry,
    sender: KafkaSender,
    handoff: HandOff | None,
    progress: Progress,
    sizing: _Sizing,
) -> None:
    """raw -> validate, redact, enrich -> clean or DLQ, sized by ``sizing``. The raw topic is
    read with confluent-kafka in batches (``BatchConsumer``), not through a Faust stream:
    emitters publish one event per message, and Faust's per-message delivery cost more than
    the validation itself. The clean events are also left in ``handoff``, if given."""
    topics = settings.topics
    limits = settings.limits

    def enrich_with(event: Event) -> Event:
        return enrich(event, config.catalog, config.agents)

    @app.task  # type: ignore[untyped-decorator]
    async def validate() -> None:
        raw = _RawTopic(settings)

        def routed(batch: list[Message]) -> tuple[list[_Record], int]:
            """The records ``batch`` makes, as ``sizing`` sizes them, and how many are clean
            events (those also left in the hand-off)."""
            now = datetime.now(UTC)
            clean: list[tuple[bytes | None, bytes]] = []
            built: list[tuple[bytes, Event]] = []
            records: list[_Record] = []
            for m in batch:
                one = route(
                    m.value, m.key, m.origin, registry, limits, now, config.policy_for,
                    enrich_with, sizing.clean_event, sizing.letter_keep, config.scrub,
                )  # fmt: skip
                if one.event is not None:  # clean
                    clean.append((one.key, one.value))
                    built.append((one.value, one.event))
                else:
                    records.append((topics.dlq, one.key, one.value))
            packed = clean_batches(clean, registry, max_bytes=sizing.batch_events)
            records += [(topics.clean, k, v) for k, v in packed]
            if handoff is not None:
                handoff.put(built)
            return records, len(built)

        async def validate_batch(batch: list[Message]) -> None:
            if handoff is not None:  # the ledger of this process is behind: let it catch up
                await wait_for_room(handoff, len(batch), sum(len(m.value) for m in batch))
            records, clean = routed(batch)

            async def remade() -> list[_Record]:  # a topic refused one as too large
                nonlocal clean
                await sizing.read_again()
                made, clean = routed(batch)
                return made

            await _publish(sender, records, remade)
            await raw.commit(batch)
            dead = len(batch) - clean
            progress.add({"validated": len(batch), "clean": clean, "to the DLQ": dead})

        try:
            await raw.open()
            batches = raw.batches(VALIDATE_BATCH, VALIDATE_BATCH_BYTES, VALIDATE_WITHIN)
            await _pipelined(batches, validate_batch)
        finally:
            await raw.close()


class _Sizing:
    """What the worker sizes its records by, from the topics' max.message.bytes (``said``, as
    read at start): the most bytes of one clean event and of one EventBatch's events, and how
    much of its input a dead letter keeps. ``read_again`` when a topic refused a record as
    larger than it takes (its limit lowered since)."""

    def __init__(self, settings: Settings, said: Mapping[str, int]) -> None:
        self._settings = settings
        self._said = dict(said)
        self._size()

    def _size(self) -> None:
        self.clean_event = clean_event_bytes(self._settings, self._said)
        self.batch_events = clean_batch_bytes(self.clean_event)
        self.letter_keep = kept_payload(self._said.get(self._settings.topics.dlq))

    async def read_again(self) -> None:
        """The clean topic's and the DLQ's limits read again (a WARNING says them); where the
        cluster does not say, as before."""
        topics = self._settings.topics
        names = [topics.clean, topics.dlq]
        self._said.update(await asyncio.to_thread(message_bytes_again, self._settings, names))
        self._size()


def clean_event_bytes(settings: Settings, sizes: Mapping[str, int]) -> int:
    """The most bytes one clean event may take: what a message of the clean topic may hold
    (``topics.event_bytes`` of ``sizes``, the topics' max.message.bytes as read), or of the
    sender if that is less. A larger event is a dead letter (``route``): sent, the broker
    refused it, and the worker publishing it retried it for ever."""
    clean = event_bytes(settings.topics.clean, sizes)
    return min(clean, MESSAGE_BYTES - FRAMING_BYTES)


class _RawTopic:
    """The raw topic's ``BatchConsumer`` in the raw group (``raw_group``), driven from asyncio:
    every call runs on one thread of its own, one at a time."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigil-raw")
        self._consumer: BatchConsumer | None = None

    async def _call(self, call: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def open(self) -> None:
        """Join the raw group; first, a group that never read raw resumes where the base group
        stopped (the ``all`` role read raw in the base group before this consumer existed)."""
        settings = self._settings
        group, topic = raw_group(settings), settings.topics.raw
        adopt = partial(adopt_offsets, settings.kafka, settings.consumer_group, group, topic)
        try:
            await self._call(adopt)
        except KafkaException as exc:  # then the raw group reads raw from its start: repeats
            log.warning("group %s did not take over the raw offsets of %s: %s", group,
                        settings.consumer_group, exc)  # fmt: skip
        config = {"fetch.wait.max.ms": FETCH_MAX_WAIT_MS}
        make = partial(BatchConsumer, settings.kafka, group, topic, config)
        self._consumer = await self._call(make)

    async def batches(
        self, max_events: int, max_bytes: int, within: float
    ) -> AsyncIterator[list[Message]]:
        assert self._consumer is not None
        take = partial(self._consumer.take, max_events, max_bytes, within)
        while True:
            batch = await self._call(take)
            if batch:
                yield batch

    async def commit(self, batch: list[Message]) -> None:
        assert self._consumer is not None
        await self._call(partial(self._consumer.commit, batch))

    async def close(self, timeout: float = RAW_CLOSE_SECONDS) -> None:
        """Wait for the last commit, leave the group, end the thread; give up after
        ``timeout`` seconds. Given up, the group sees this member leave when its session
        times out, and what it had not committed is read again (the sinks drop the repeats).
        The close runs on a daemon thread of its own, so one that never returns cannot keep
        the process from exiting. Raises what ``BatchConsumer.close`` raises."""
        consumer, self._consumer = self._consumer, None
        try:
            if consumer is not None:
                await self._call(_nothing)  # a take still running ends first: one call at a time
                try:
                    await asyncio.wait_for(_on_daemon_thread(consumer.close), timeout)
                except TimeoutError:
                    log.warning("%s did not commit and leave its group within %.0fs; what it "
                                "had not committed is read again", consumer, timeout)  # fmt: skip
        finally:
            self._thread.shutdown(wait=False)


def _nothing() -> None:
    pass


def _on_daemon_thread(call: Callable[[], None]) -> asyncio.Future[None]:
    """Run ``call`` on a new daemon thread; a future of its outcome, on the running loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():  # not given up on meanwhile
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            call()
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name="vigil-raw-close", daemon=True).start()
    return done


def _add_store(
    app: WorkerApp,
    settings: Settings,
    store: ClickHouseStore,
    registry: Registry,
    rules: AlertRules | None,
    notifier: Notifier | None,
    sender: KafkaSender,
    handoff: HandOff | None,
    progress: Progress,
    status: WorkerStatus | None,
    sizing: _Sizing,
    scrub_with: Policy,
) -> None:
    """clean -> ledger -> rollups and alerts; DLQ -> vigil.dlq; the lag sampler (whose rows
    ``status`` keeps, if given). The ledger takes from ``handoff``, if given, the events a
    validator in this process built. What the ledger rejects is a dead letter sized by
    ``sizing``; every dead letter is scrubbed with ``scrub_with`` (``Config.scrub``)."""
    topics = settings.topics

    def lettered(result: WriteResult, what: str) -> list[_Record]:
        """The dead letters of what the sink ``what`` rejected."""
        now = datetime.now(UTC)
        letters: list[_Record] = []
        for m, error in result.rejected:
            letter = dead_letter(m.value, m.key, m.origin, error, stage=what, received_at=now,
                                 keep=sizing.letter_keep, scrub_with=scrub_with)  # fmt: skip
            letters.append((topics.dlq, m.key, registry.encode(DEAD_LETTER_SCHEMA, letter)))
        return letters

    async def relettered(result: WriteResult, what: str) -> list[_Record]:
        await sizing.read_again()  # the DLQ refused a letter as too large
        return lettered(result, what)

    clean = app.topic(topics.clean, key_type=bytes, value_type=bytes)
    clean.maxsize = CLEAN_BUFFER  # app.topic takes maxsize but drops it (faust-streaming 0.15)
    dlq = app.topic(topics.dlq, key_type=bytes, value_type=bytes)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigil-clickhouse")
    ledger_sink = LedgerSink(
        store, registry, dedup_window=settings.ledger_dedup_window, handoff=handoff,
        remember_seconds=SESSION_TIMEOUT_SECONDS,
    )  # fmt: skip
    dlq_sink = DlqSink(store, registry, scrub_with=scrub_with)
    rollups = Rollups()

    # writes only for partitions this worker holds, while the broker confirms that it does
    # (pipeline/fence.py)
    def since_confirmed() -> float:
        return cast(_Consumer, app.consumer).since_confirmed()  # WorkerApp's (``_Transport``)

    fence = Fence(app, since_confirmed, SESSION_TIMEOUT_SECONDS / 2, SESSION_TIMEOUT_SECONDS)
    app.fence = fence  # awaited before the worker leaves its group (``_Consumer.on_stop``)

    async def rebuild(partitions: frozenset[int], superseded: Callable[[], bool]) -> Evaluator:
        """The alert state of the tenants of clean ``partitions``, from the ledger; what its
        replay fired that no worker raised (``unraised``) is raised now."""
        assert rules is not None

        def rebuilt() -> tuple[Evaluator, list[Alert]]:
            now = datetime.now(UTC)
            group = settings.consumer_group  # the store workers' (``CaughtUp``)
            replay = replay_ledger(store, rules, now, partitions, superseded, group)
            return replay.evaluator, unraised(store, replay, now)

        loop = asyncio.get_running_loop()
        attempt = partial(loop.run_in_executor, executor, rebuilt)
        evaluator, late = await _until_done(
            "rebuilding the alert state", attempt, (StoreError,), "alert state"
        )
        if late and not superseded():  # else the partitions' next owner raises them
            log.warning("%d alert(s) fired by stored events were never raised (their worker "
                        "stopped or lost the partition before raising them, or the rule is "
                        "new): raising them now", len(late))  # fmt: skip
            await raise_alerts(late)
        return evaluator

    alerts = HeldAlerts(rebuild) if rules is not None else None
    if alerts is not None and status is not None:
        status.late = alerts.late
    held_clean: list[int] = []  # the clean partitions of the last assignment, until revoked
    app.alerts = alerts  # its rebuild in progress is given up when the worker stops

    async def finish_writes(_app: Any, *_args: Any, **_kwargs: Any) -> None:
        """Give up partitions only once the insert in flight is done: the new owner reads
        them again and must find what it stored. A rebuild of their alert state in progress
        stops (a burst of rebalances runs one replay, not one each)."""
        held_clean.clear()  # another worker may hold partition 0 next: it sweeps then
        if alerts is not None:
            alerts.revoked()
        await fence.revoked(LANDED_STEP_SECONDS)

    async def rebuild_alert_state(_app: Any, assigned: Iterable[Any], **_kwargs: Any) -> None:
        """Evaluate the tenants of the clean partitions this worker now holds, from their
        history in the ledger (``HeldAlerts``); the ledger's writes wait for it."""
        held = [tp.partition for tp in assigned if tp.topic == topics.clean]
        held_clean[:] = held
        if alerts is not None:
            alerts.assigned(app.consumer_generation_id, held)

    # connected weakly and held by the app: Faust's signals keep a strong receiver for good (in a
    # registry the class's signal shares), and with it the app, its sender and its store
    app.receivers = [finish_writes, rebuild_alert_state]
    app.on_partitions_revoked.connect(finish_writes, weak=True)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(rebuild_alert_state, weak=True)  # type: ignore[arg-type]

    async def after_ledger(result: WriteResult, generation: int) -> None:
        """Roll up and evaluate exactly what the ledger just stored."""
        # by the state of the generation they were fetched in, unless a rebalance has begun
        # another, whose state is rebuilt from the ledger with them (``HeldAlerts.observe``)
        stored_at = result.ingested_at
        fired = alerts.observe(result.stored, generation, stored_at) if alerts is not None else []
        for event in result.stored:
            rollups.add(event, stored_at)
        records = [(topics.rollups, f"{r['tenant_id']}/{r['agent_id']}".encode(),
                    json.dumps(r).encode()) for r in rollups.close()]  # fmt: skip
        await _publish(sender, records)
        await raise_alerts(fired)

    async def raise_alerts(fired: Sequence[Alert]) -> None:
        """Store, publish and post the alerts the ledger's last write fired."""
        if not fired:
            return
        now = datetime.now(UTC)
        rows = [alert_row(a, now) for a in fired]
        if notifier is not None:  # owed first: an alert stored is never one nobody owes
            owed = pending_rows(fired, notifier.routes.values(), now)
            if owed:
                insert = partial(store.insert, ALERT_DELIVERY_TABLE, owed, DELIVERY_COLUMNS,
                                 f"owed-{rows[0][0]}")  # fmt: skip
                await _retrying(executor, "alert deliveries", len(owed), insert)
        insert = partial(store.insert, ALERT_TABLE, rows, ALERT_COLUMNS, f"alerts-{rows[0][0]}")
        await _retrying(executor, "alerts", len(rows), insert)
        await _publish(sender, [(topics.alerts, a.kind.encode(), alert_json(a)) for a in fired])
        for alert in fired:
            log.warning("alert %s: %s", alert.kind, alert.message)
            if notifier is not None:
                notifier.submit(alert)

    async def sink_batches(
        stream: Any,
        write: Callable[[Sequence[Message], int | None], WriteResult],
        what: str,
        after: Callable[[WriteResult, int], Awaitable[None]] | None = None,
        events_in: Callable[[bytes], int] = lambda _value: 1,
        ready: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """Write each batch (retrying until it lands; ``write`` is also told the consumer
        generation the batch was fetched in), dead-letter what the sink rejected, run ``after``
        on the result and that generation, and only then acknowledge the batch and count it in
        ``progress`` (``SINK_COUNTS[what]``). ``events_in``: how many rows a message makes.
        ``ready(generation)``: awaited before a batch of it is written. A batch is full at
        sink_batch_size rows or at SINK_BATCH_BYTES of messages, whichever comes first."""

        def weight(event: Any) -> int:
            value = _value(event)
            return batch_weight(
                events_in(value), len(value), settings.sink_batch_size, SINK_BATCH_BYTES
            )

        async def sink_batch(taken: list[Any]) -> None:
            # what was fetched before a rebalance, or failed to be written before one, is left
            # unacknowledged: its partition's owner now reads it again
            batch = await fence.current(taken)
            if len(batch) < len(taken):
                left = len(taken) - len(batch)
                log.info("%s: %d of %d messages were fetched before a rebalance; left to their "
                         "partitions' owner", what, left, len(taken))  # fmt: skip
            if not batch:
                return
            messages = [_message(e) for e in batch]
            rows = sum(events_in(m.value) for m in messages)
            generation = batch[0].message.generation_id
            if ready is not None:
                await ready(generation)

            async def landed(result: WriteResult) -> None:
                await _publish(sender, lettered(result, what), partial(relettered, result, what))
                if after is not None:
                    await after(result, generation)
                await _ack(stream, batch)
                stored, repeated = SINK_COUNTS[what]
                progress.add({stored: result.inserted, repeated: result.duplicates,
                              "rejected to the DLQ": len(result.rejected)})  # fmt: skip

            try:
                # every message of the batch is of the current generation (``fence.current``),
                # and each attempt begins only while the broker confirms this worker holds it
                # (``fence.write``): the ledger may go on from the chain ends it remembers.
                # What follows an insert that landed runs even if this agent is cancelled (a
                # stopping worker waits for it before its last commit).
                write_batch = partial(write, messages, generation)
                await _retrying(executor, what, rows, write_batch, fence, batch, landed)
            except Moved as moved:
                log.info("%s: %s; left to their partitions' owner", what, moved)

        size, within = settings.sink_batch_size, settings.sink_flush_seconds
        await _pipelined(stream.noack_take_weighted(size, within, weight), sink_batch)

    said_gaps: set[tuple[str, Gap]] = set()
    caught_up = CaughtUp(caught_up_groups(settings))

    if notifier is not None and notifier.routes:

        @app.timer(settings.alert_sweep_seconds)  # type: ignore[untyped-decorator]
        async def post_owed_alerts() -> None:
            """Post again what a webhook was owed and did not get (``Notifier.sweep``): on
            the worker holding clean partition 0, so one worker of several sweeps."""
            if 0 not in held_clean:
                notifier.owed_now = {}  # another worker sweeps, and says what is owed
                return
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(executor, notifier.sweep, store, datetime.now(UTC))
            except StoreError as exc:
                log.warning("owed alerts not swept: %s", exc)

    @app.timer(settings.lag_sample_seconds)  # type: ignore[untyped-decorator]
    async def record_lag() -> None:
        """Sample the groups' lag for the health dashboard, and name at ERROR, once, messages
        the topics' retention deleted before the groups committed them (a worker held up, on
        a ClickHouse outage say, for longer than a topic keeps messages); a failure only skips
        a sample. When the samples show every event sent before a time evaluated (``CaughtUp``),
        the windows of tenants that sent nothing since are judged (``HeldAlerts.caught_up``)."""
        loop = asyncio.get_running_loop()
        try:
            rows, at = [], datetime.now(UTC)  # one time for the sample (``CaughtUp``)
            for group, lagging in lag_groups(settings):
                # Kafka's answer off the ClickHouse thread: a slow broker never delays inserts
                sampled, gaps = await loop.run_in_executor(
                    None, consumer_lag, settings.kafka, group, lagging, LAG_TIMEOUT_SECONDS, at
                )
                rows += sampled
                for gap in gaps:
                    if (group, gap) not in said_gaps:  # it stays until the group reads on
                        said_gaps.add((group, gap))
                        log.error("%s", gap.said(group, running=True))
            if status is not None:
                status.lag = rows
            if rows:
                token = f"lag-{rows[0][0]}"
                await loop.run_in_executor(
                    executor, store.insert, LAG_TABLE, rows, LAG_COLUMNS, token
                )
        except (KafkaException, StoreError) as exc:
            log.warning("consumer lag not sampled: %s", exc)
            return
        quiet = caught_up.sample(rows)
        if quiet is None:
            return
        try:  # stored first, so a rebuild is told of it (``replay_ledger``)
            row = (at, settings.consumer_group, quiet)
            token = f"caught-up-{at}"
            await loop.run_in_executor(
                executor, store.insert, CAUGHT_UP_TABLE, [row], CAUGHT_UP_COLUMNS, token
            )
        except StoreError as exc:
            log.warning("caught-up time not stored, kept for the next lag sample: %s", exc)
            return
        caught_up.told(quiet)
        if status is not None:
            status.caught_up = quiet
        # judged by a worker that holds its partitions, as the broker confirmed lately
        # (``Fence``), not in a rebalance (``held_clean`` is cleared at the revocation)
        holds = held_clean and since_confirmed() < SESSION_TIMEOUT_SECONDS / 2
        if alerts is not None and holds:
            await raise_alerts(alerts.caught_up(quiet))

    @app.agent(clean, concurrency=1)
    async def ledger(stream: Any) -> None:
        # a clean message is an EventBatch: weighed by its events, so an insert holds up to
        # sink_batch_size events however the validator grouped them
        ready = alerts.ready if alerts is not None else None
        await sink_batches(
            stream, ledger_sink.write, "ledger", after_ledger, registry.event_count, ready
        )

    @app.agent(dlq, concurrency=1)
    async def dead_letters(stream: Any) -> None:
        # the DLQ sink rejects nothing: what is not a dead letter is stored as one about itself
        await sink_batches(stream, lambda messages, _generation: dlq_sink.write(messages), "dlq")


def _serve_health(status: WorkerStatus, settings: Settings) -> HealthServer | None:
    """The worker's HTTP endpoint on VIGIL_WORKER_HTTP_ADDRESS, if one is set. Raises
    ConfigError naming the variable when the address cannot be bound."""
    address = settings.worker_http
    if address is None:
        return None
    try:
        tls = None
        if settings.worker_tls is not None:  # each renewal of it served, unrestarted
            status.certificate = ServedCertificate(settings.worker_tls,
                                                   "VIGIL_WORKER_TLS_CERT_LOCATION")  # fmt: skip
            tls = status.certificate.context()
        return HealthServer(status, address, settings.metrics_token, tls).start()
    except OSError as exc:
        raise ConfigError(
            f"VIGIL_WORKER_HTTP_ADDRESS {address[0]}:{address[1]}: {exc.strerror or exc}"
        ) from None


def prepare_store(store: ClickHouseStore, config: Config) -> None:
    """Make ``store`` ready for a worker that owns it. The embedded store is the worker's own:
    it migrates it and applies vigil.yaml's retention and budgets. On a server the worker runs
    as ``vigil_writer``, which may not change the schema, the TTL or the roles: it only checks
    that ``vigil migrate`` (run with the administrative user) has applied every migration, and
    refuses to start otherwise; then logs each grant of ``vigil_writer`` its user lacks."""
    if store.embedded:
        migrate(store)
        apply_policies(store, config, server=False)
    else:
        require_migrated(store)
        grants_at_start(store)


class HangupSaid:
    """The worker's SIGHUP handler: it reads vigil.yaml (``path``) only at start, so it says
    whether the file has changed since (a restart applies it) and runs on."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.read = _digest(path)  # as at start

    def __call__(self, _signum: int, _frame: object) -> None:
        if self.path is None:
            now = "there is no policy file (VIGIL_CONFIG)"
        elif _digest(self.path) == self.read:
            now = f"{self.path} is as it was read at start"
        else:
            now = (f"{self.path} has changed since it was read at start: restart the worker to "
                   "apply it (SIGTERM stops it cleanly)")  # fmt: skip
        log.warning("SIGHUP: the worker reads vigil.yaml only at start; %s", now)


def _digest(path: Path | None) -> str | None:
    """The SHA-256 of file ``path``'s bytes; None where there is none, or it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else None
    except OSError:
        return None


def run_worker(settings: Settings, loglevel: str = "WARNING", role: str = "all") -> None:
    """``vigil worker``: run the agents of ``role`` until SIGTERM. The ``all`` and ``store``
    roles own ClickHouse: they make it ready (``prepare_store``), serve queries (embedded) and
    rebuild the alert state from it. The ``validate`` role never opens it.

    Blocks. Raises StoreError if the store cannot be opened or, on a server, is not migrated;
    TopicError if Kafka is absent; AclError if it authorizes requests and the worker's
    principal lacks an ACL it needs; ConfigError if VIGIL_WORKER_HTTP_ADDRESS cannot be bound.
    """
    from faust.worker import Worker

    class _Worker(Worker):
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            hold_back_repeats(logger)  # the clients' lines while Kafka or ClickHouse is down

    # the gateway reads vigil.yaml again at SIGHUP; the worker, whose stages and alert state
    # are built from it, only at start. A SIGHUP (a reloader's, sent to every Vigil process)
    # killed it mid-batch: now it is said, and the worker runs on
    signal.signal(signal.SIGHUP, HangupSaid(settings.config_path))
    registry = Registry.load()
    config = load_config(settings.config_path, os.environ)
    progress = Progress()
    status = WorkerStatus(progress, RETRIED)
    status.kafka_certificates = kafka_expiries(settings)
    health = _serve_health(status, settings)  # first: an address in use is named
    store = owner = notifier = None
    if role != "validate":
        # named here: chDB says only "Error initializing EmbeddedServer" (after a lock file's line)
        ensure_not_owned(settings, "one worker at a time writes to an embedded store")
        store = connect(settings.clickhouse_dsn)
        prepare_store(store, config)
    say_expiring(settings, "worker")
    for where in config.slow_patterns() if role != "store" else ():
        log.warning("%s may backtrack for a very long time on some texts: an event it runs past "
                    "%g s on goes to the DLQ (redaction_timeout): %s", where,
                    CUSTOM_PATTERN_SECONDS, BACKTRACK_ADVICE)  # fmt: skip
    config.compile_patterns()
    prepare_kafka(settings, "worker")
    sizes = sizes_at_start(settings, "worker")
    say_deleted_unread(settings, role)
    if store is not None:
        owner = (
            OwnerServer(store, settings.home, settings.served_query_seconds).start()
            if settings.embedded
            else None
        )
        notifier = Notifier(
            config.routes, partial(store.insert, ALERT_DELIVERY_TABLE, columns=DELIVERY_COLUMNS),
            timeout=settings.webhook_timeout_seconds,
            give_up_after=timedelta(hours=settings.alert_delivery_hours),
        )  # fmt: skip
        status.notified = notifier.counts
        status.owed = lambda: notifier.owed_now
    written = [sizes[t] for t in (settings.topics.clean, settings.topics.dlq) if t in sizes]
    sender = KafkaSender(settings.kafka, {"batch.size": batch_bytes(written)})
    status.renewals = lambda: sender.renewed
    rules = config.rules if store is not None else None
    app = build_app(
        settings, config, store, registry, rules, notifier, sender, role, progress, status, sizes
    )
    gc.freeze()  # what start-up built lives as long as the worker: keep it out of collections
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    try:
        _Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
    finally:
        log_progress(progress, final=True)
        if health is not None:
            health.close()
        sender.close(timeout=5.0)
        if notifier is not None:
            notifier.close(wait=False)
        if owner is not None:
            owner.close()
        if store is not None:
            store.close()
