"""The store role's ledger agent across a rebalance (``pipeline/fence.py``): the worker's own
agent, built by ``build_app``, writing to the real engine, fed through Faust's in-memory test
channel. A rebalance is played as Faust plays it: the flow suspended, the revocation signal
sent, a new consumer generation, the flow resumed.

Another worker now owns what was fetched before the rebalance and reads it again from the last
commit; if this one wrote it too, the ledger would hold it twice, chained after heads each
writer had not seen. At the end: what follows a landed insert, at a stop and at a rebalance,
and a message on clean without a value, which the agent once crashed on."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
import pytest
from confluent_kafka import Producer

import pipeline.fence
import pipeline.worker
from pipeline.codec import DEAD_LETTER_SCHEMA, Registry
from pipeline.config import load_config
from pipeline.ledger import Retention, verify
from pipeline.logs import RDKAFKA_LOGGER
from pipeline.producer import KafkaSender
from pipeline.settings import Settings
from pipeline.store import ClickHouseStore, StoreError
from pipeline.topics import ensure_topics
from pipeline.worker import SESSION_TIMEOUT_SECONDS, build_app
from tests.conftest import ROOT
from tests.integration.conftest import (
    RecordingStore,
    SharedServer,
    alert_states_rebuilt,
    clean_messages,
    count,
    member_settings,
    two_halves,
    until,
)

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


class GatedStore(RecordingStore):
    """The real store, whose ledger inserts wait until ``release`` is set (``held`` is set as
    one starts), and the next of which fails after that if ``fail_next``."""

    def __init__(self, store: ClickHouseStore) -> None:
        super().__init__(store)
        self.held = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail_next = False

    def insert(self, table: str, rows: Any, columns: Any, dedup_token: str) -> None:
        if table == "vigil.audit_log":
            self.held.set()
            self.release.wait(30)
            if self.fail_next:
                self.fail_next = False
                self.inserted.append(table)
                raise StoreError("ClickHouse is away (injected)")
        super().insert(table, rows, columns, dedup_token)


def _ledger_app(
    tmp_path: Path, store: Any, sender: KafkaSender, batch: int
) -> tuple[faust.App, Any]:
    """The store role's app and its ledger agent, whose batches are handed to the sink once
    they hold ``batch`` events and never for want of time, so a test decides what a batch is."""
    settings = Settings.from_env({
        "VIGIL_HOME": str(tmp_path / "home"), "VIGIL_SINK_BATCH_SIZE": str(batch),
        "VIGIL_SINK_FLUSH_SECONDS": "60",
    })  # fmt: skip
    config = load_config(ROOT / "vigil.yaml", os.environ)
    app = build_app(settings, config, store, Registry.load(), None, None, sender, "store")
    # the in-memory channel has no broker to confirm this worker's membership: confirmed
    # throughout, unless a test says otherwise
    _confirmed(app, math.inf)
    ledger = next(agent for name, agent in app.agents.items() if name.endswith(".ledger"))
    return app, ledger


def _confirmed(app: faust.App, at: float) -> None:
    """As if the broker had last confirmed ``app``'s membership at ``time.monotonic()`` ``at``."""
    app.consumer._thread.last_confirmed = at


async def _put(agent: Any, values: list[bytes], first: int) -> list[Any]:
    """Deliver ``values`` as the messages at offsets ``first``... of partition 0, in the
    consumer's current generation; the Faust events delivered."""
    events = []
    for offset, value in enumerate(values, start=first):
        agent.sent_offset = offset
        events.append(await agent.put(value, key=b"acme/bot", partition=0, wait=False))
    return events


async def _rebalance(app: faust.App) -> None:
    """Faust's order: the flow suspended, the revocation signal awaited, a new generation
    assigned, the flow resumed."""
    app.flow_control.suspend()
    await app.on_partitions_revoked.send(set())
    app.consumer_generation_id += 1
    app.flow_control.resume()


def _stored_ids(store: ClickHouseStore) -> list[str]:
    rows = store.query_rows("SELECT event_id FROM vigil.audit_log ORDER BY event_id")
    return [str(r[0]) for r in rows]


def _ids(first: int, last: int) -> list[str]:
    return sorted(f"e-{i}'\\" for i in range(first, last))


def test_what_a_batch_fetched_before_a_rebalance_is_left_to_the_partitions_owner(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vigil.worker")
    registry = Registry.load()
    app, ledger = _ledger_app(tmp_path, store, sender, batch=20)
    before = [m.value for m in clean_messages(registry, range(0, 10), ts=NOW)]
    after = [m.value for m in clean_messages(registry, range(10, 20), ts=NOW)]

    async def run() -> list[Any]:
        async with ledger.test_context() as agent:
            old = await _put(agent, before, 0)
            await until(lambda: agent.processed_offset >= 10, "the agent's batch to take them")
            await _rebalance(app)
            # fetched after the rebalance: they fill the same batch, handed to the sink
            new = await _put(agent, after, 10)
            await until(lambda: all(e.message.acked for e in new), "the new generation")
            return old

    old = asyncio.run(run())
    assert _stored_ids(store) == _ids(10, 20)
    assert not any(e.message.acked for e in old)  # a commit never passes them unstored
    assert "10 of 20 messages were fetched before a rebalance" in caplog.text  # one batch
    assert verify(store, Retention()).ok


def _held_insert(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path, fail: bool
) -> tuple[GatedStore, faust.App, Any, list[bytes]]:
    """A ledger app whose first insert is held until released (and then fails, if ``fail``),
    and the 10 clean messages that make its first batch."""
    gated = GatedStore(store)
    gated.release.clear()
    gated.fail_next = fail
    app, ledger = _ledger_app(tmp_path, gated, sender, batch=10)
    values = [m.value for m in clean_messages(Registry.load(), range(0, 10), ts=NOW)]
    return gated, app, ledger, values


def test_the_revocation_waits_for_the_insert_in_flight(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path
) -> None:
    gated, app, ledger, values = _held_insert(store, sender, tmp_path, fail=False)

    async def run() -> None:
        async with ledger.test_context() as agent:
            events = await _put(agent, values, 0)
            await until(gated.held.is_set, "the insert")
            rebalance = asyncio.ensure_future(_rebalance(app))
            await asyncio.sleep(0.5)
            assert not rebalance.done()  # the partitions are not given up mid-insert
            gated.release.set()
            await asyncio.wait_for(rebalance, 30)
            # the insert landed before the new owner could read the partition again
            assert _stored_ids(store) == _ids(0, 10)
            await until(lambda: all(e.message.acked for e in events), "the acks")

    asyncio.run(run())
    assert gated.inserted == ["vigil.audit_log"]


def test_a_write_is_not_retried_once_its_partitions_moved(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path
) -> None:
    gated, app, ledger, values = _held_insert(store, sender, tmp_path, fail=True)

    async def run() -> list[Any]:
        async with ledger.test_context() as agent:
            events = await _put(agent, values, 0)
            await until(gated.held.is_set, "the first attempt")
            # a rebalance while the attempt is in flight; the attempt then fails, and its retry
            # (after 0.5 s) would come after the rebalance
            rebalance = asyncio.ensure_future(_rebalance(app))
            await asyncio.sleep(0.2)
            gated.release.set()
            await asyncio.wait_for(rebalance, 30)
            await asyncio.sleep(2.0)  # past the retry's back-off
            return events

    events = asyncio.run(run())
    assert gated.inserted == ["vigil.audit_log"]  # the one attempt that failed, no retry
    assert count(store, "SELECT count() FROM vigil.audit_log") == 0
    assert not any(e.message.acked for e in events)


def test_an_insert_that_outlives_the_confirmed_membership_says_so(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An insert begun while the membership was confirmed, still running when the broker has
    not confirmed it for the session timeout: nothing in this process can stop it, so once it
    ends the worker warns that the partitions may have moved meanwhile and names the check.
    An insert that ends in time says nothing."""
    caplog.set_level(logging.WARNING, "vigil.worker")
    gated, app, ledger, values = _held_insert(store, sender, tmp_path, fail=False)
    more = [m.value for m in clean_messages(Registry.load(), range(10, 20), ts=NOW)]

    async def run() -> None:
        async with ledger.test_context() as agent:
            _confirmed(app, time.monotonic())
            events = await _put(agent, values, 0)
            await until(gated.held.is_set, "the insert")
            # the worker froze mid-insert: no heartbeat for longer than the session timeout
            _confirmed(app, time.monotonic() - SESSION_TIMEOUT_SECONDS - 1)
            gated.release.set()
            await until(lambda: all(e.message.acked for e in events), "the acks")
            assert "may have moved while it ran" in caplog.text
            assert "vigil audit verify" in caplog.text
            caplog.clear()
            _confirmed(app, time.monotonic())  # answered again
            later = await _put(agent, more, 10)
            await until(lambda: all(e.message.acked for e in later), "the next batch's acks")

    asyncio.run(run())
    assert "may have moved while it ran" not in caplog.text
    assert _stored_ids(store) == _ids(0, 20)


def test_a_write_waits_until_the_broker_confirms_the_membership_again(
    store: ClickHouseStore,
    sender: KafkaSender,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker whose broker has answered no heartbeat for half the session timeout may have
    lost its partitions without knowing: its batch waits, saying so again while it does, and is
    written once the broker answers again in the same generation."""
    caplog.set_level(logging.INFO, "vigil.worker")
    monkeypatch.setattr(pipeline.fence, "WAITING_WARNING_SECONDS", 0.4)
    recording = RecordingStore(store)
    app, ledger = _ledger_app(tmp_path, recording, sender, batch=10)
    values = [m.value for m in clean_messages(Registry.load(), range(0, 10), ts=NOW)]

    async def run() -> None:
        async with ledger.test_context() as agent:
            _confirmed(app, time.monotonic() - SESSION_TIMEOUT_SECONDS / 2)
            events = await _put(agent, values, 0)
            await until(lambda: "writes wait for it" in caplog.text, "the wait")
            await asyncio.sleep(1.0)
            assert "vigil.audit_log" not in recording.inserted
            assert not any(e.message.acked for e in events)
            assert caplog.text.count("writes wait for it") >= 2  # every 0.4 s of waiting
            _confirmed(app, time.monotonic())  # a heartbeat answered
            await until(lambda: all(e.message.acked for e in events), "the acks")

    asyncio.run(run())
    assert _stored_ids(store) == _ids(0, 10)
    assert "confirmed this worker's membership again" in caplog.text


def test_a_write_that_waits_for_the_broker_is_left_to_the_owner_after_a_rebalance(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path
) -> None:
    """The broker answers at last with a new generation: the partitions may be another
    worker's by now, so what waited is not written, nor acknowledged."""
    recording = RecordingStore(store)
    app, ledger = _ledger_app(tmp_path, recording, sender, batch=10)
    registry = Registry.load()
    before = [m.value for m in clean_messages(registry, range(0, 10), ts=NOW)]
    after = [m.value for m in clean_messages(registry, range(10, 20), ts=NOW)]

    async def run() -> list[Any]:
        async with ledger.test_context() as agent:
            _confirmed(app, 0.0)  # never, as before the first heartbeat of a worker cut off
            old = await _put(agent, before, 0)
            await asyncio.sleep(1.0)
            assert "vigil.audit_log" not in recording.inserted
            await _rebalance(app)
            _confirmed(app, time.monotonic())  # the assignment that ends a rebalance
            new = await _put(agent, after, 10)
            await until(lambda: all(e.message.acked for e in new), "the new generation")
            return old

    old = asyncio.run(run())
    assert _stored_ids(store) == _ids(10, 20)
    assert not any(e.message.acked for e in old)
    assert verify(store, Retention()).ok


def test_two_workers_share_the_clean_partitions_through_rebalances(
    kafka_bootstrap: str,
    store: ClickHouseStore,
    sender: KafkaSender,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two store-role workers in one consumer group on the real broker, one server, while
    clean events keep coming: B joins while A writes (A's inserts take 2 s), then A stops just
    as an insert of its own begins (5 s). Each event is stored once and every chain verifies.
    Without the fence (checked), the ledger held 5-9% of the events twice, each repeat a second
    row at a taken ``chain_seq``; without the wait before A leaves, A's last insert landed
    after B had read its partitions: repeats, or a chain forked at one seq (checked). While
    both hold part of clean, each rebuilds its alert state for the tenants of the partitions it
    holds; B, alone again, for all four. B's heartbeats are recorded and its ledger remembers its chain ends (without the
    record, checked: every insert asked for heads)."""
    caplog.set_level(logging.INFO, "vigil.alerts")
    prefix = f"fence-{uuid.uuid4().hex[:8]}"
    registry = Registry.load()
    config = load_config(ROOT / "vigil.yaml", os.environ)
    turn = threading.Lock()
    server_a = SharedServer(store, turn, insert_seconds=2.0)
    server_b = SharedServer(store, turn, insert_seconds=0.2)

    def settings(name: str) -> Settings:
        return member_settings(tmp_path / name, kafka_bootstrap, prefix)

    def worker(name: str, server: SharedServer) -> faust.App:
        return build_app(settings(name), config, server, registry, config.rules, None, sender,
                         "store")  # fmt: skip

    a, b = worker("a", server_a), worker("b", server_b)
    ensure_topics(settings("topics"))
    clean = settings("clean").topics.clean
    feeding = threading.Event()
    feeding.set()
    sent = [0]

    def feed() -> None:  # 2,000 events a second over the four partitions, one a message
        producer = Producer(
            {"bootstrap.servers": kafka_bootstrap, "linger.ms": 5, "logger": RDKAFKA_LOGGER}
        )
        while feeding.is_set():
            first = sent[0]
            for p in range(4):
                for m in clean_messages(registry, range(first + p, first + 200, 4), p, ts=NOW):
                    producer.produce(clean, registry.encode_batch([m.value]), b"k", partition=p)
            assert producer.flush(30) == 0
            sent[0] = first + 200
            time.sleep(0.1)

    def stored() -> int:
        return count(store, "SELECT count() FROM vigil.audit_log")

    async def run() -> None:
        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            await a.start()
            await until(lambda: stored() > 0, "A's first insert", 60)
            caplog.clear()
            await b.start()  # a rebalance while A writes
            await until(lambda: bool(b.consumer.assignment()), "B's partitions", 60)
            # confirmed by its assignment, before the first heartbeat (2 s after it): its first
            # batch does not wait for that
            assert b.consumer.since_confirmed() < 2.0
            await asyncio.sleep(4)
            # A's and B's, at the rebalance B joined: between them, every partition
            await until(
                lambda: bool(two_halves(alert_states_rebuilt(caplog), {0, 1, 2, 3})),
                "A's and B's alert states",
            )
            server_a.insert_seconds = 5.0
            server_a.began.clear()
            await until(server_a.began.is_set, "an insert of A's", 60)
            await a.stop()  # another rebalance, with A's insert in flight
            caplog.clear()  # what B says from now on, alone in the group
            await asyncio.sleep(4)
            await until(
                lambda: {0, 1, 2, 3} in alert_states_rebuilt(caplog), "B's alert state of all four"
            )
            # the broker confirms B's membership by heartbeats, so B's ledger goes on from the
            # chain ends it remembers: it asks for heads on a generation's first batch only
            assert b.consumer.since_confirmed() < SESSION_TIMEOUT_SECONDS / 2
            assert server_b.heads_queries < server_b.ledger_inserts / 2, vars(server_b)
        finally:
            feeding.clear()
            feeder.join()
        await until(lambda: stored() >= sent[0], "B's last insert", 120)
        await b.stop()

    asyncio.run(run())
    assert store.query_rows("SELECT count(), uniqExact(event_id) FROM vigil.audit_log")[0] == (
        sent[0],
        sent[0],
    )
    assert verify(store, Retention()).ok


def test_a_worker_cut_off_from_the_broker_begins_no_insert_until_it_answers(
    store: ClickHouseStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real broker frozen (SIGSTOP) for longer than the session timeout, under a worker
    with a backlog fetched and ClickHouse up: past half the session timeout without an
    answered heartbeat, no ledger insert begins, though without the wait (checked) the
    worker went on through the batches it held; once the broker is back, every event is stored
    once and every chain verifies."""
    import signal

    from pipeline.devkafka import LocalKafka, fetch_jars
    from pipeline.services import free_port

    caplog.set_level(logging.WARNING, "vigil.worker")
    home = tmp_path / "home"
    home.mkdir()
    broker = LocalKafka(tmp_path / "kafka", fetch_jars(Settings.from_env({}).cache_dir),
                        free_port(2))  # fmt: skip
    broker.start()
    settings = Settings.from_env({
        "VIGIL_HOME": str(home), "VIGIL_KAFKA_BOOTSTRAP": broker.bootstrap,
        "VIGIL_PARTITIONS": "2", "VIGIL_SINK_BATCH_SIZE": "20",
    })  # fmt: skip
    registry = Registry.load()
    config = load_config(ROOT / "vigil.yaml", os.environ)
    # one insert a second, 20 events each: the worker holds a backlog of many batches fetched
    server = SharedServer(store, threading.Lock(), insert_seconds=1.0)
    began = server.began_at
    total = 600
    try:
        ensure_topics(settings)
        kafka_sender = KafkaSender(settings.kafka)
        app = build_app(settings, config, server, registry, None, None, kafka_sender, "store")
        producer = Producer({"bootstrap.servers": broker.bootstrap, "logger": RDKAFKA_LOGGER})
        for p in range(2):
            for m in clean_messages(registry, range(p, total, 2), p, ts=NOW):
                producer.produce(settings.topics.clean, registry.encode_batch([m.value]), b"k",
                                 partition=p)  # fmt: skip
        assert producer.flush(30) == 0
        pid = broker.pid()
        assert pid is not None

        async def run() -> tuple[float, float]:
            await app.start()
            try:
                await until(lambda: len(began) >= 3, "the worker's first inserts")
                os.kill(pid, signal.SIGSTOP)  # the broker stops answering; ClickHouse does not
                frozen = time.monotonic()
                try:
                    await asyncio.sleep(SESSION_TIMEOUT_SECONDS + 4)
                finally:
                    os.kill(pid, signal.SIGCONT)
                thawed = time.monotonic()
                server.insert_seconds = 0.0
                await until(
                    lambda: count(store, "SELECT count() FROM vigil.audit_log") >= total,
                    "the backlog stored after the broker came back",
                    120,
                )
                return frozen, thawed
            finally:
                await app.stop()
                kafka_sender.close(timeout=5)

        frozen, thawed = asyncio.run(run())
    finally:
        broker.stop()
    # an attempt that passed the fence just before the membership went stale (at most half the
    # session timeout after the freeze) may begin a moment later: a second's margin
    silent = [t - frozen for t in began if frozen + SESSION_TIMEOUT_SECONDS / 2 + 1 < t < thawed]
    assert not silent, f"inserts began {silent} s into the broker's freeze"
    assert "has not confirmed this worker's group membership" in caplog.text
    assert store.query_rows("SELECT count(), uniqExact(event_id) FROM vigil.audit_log")[0] == (
        total,
        total,
    )
    assert verify(store, Retention()).ok


class RecordingSender:
    """The real sender, remembering the records it was asked to send (and their topics)."""

    def __init__(self, sender: KafkaSender) -> None:
        self.sender = sender
        self.records: list[tuple[str, bytes | None, bytes]] = []

    @property
    def topics(self) -> list[str]:
        return [topic for topic, _key, _value in self.records]

    async def send(self, records: Any) -> None:
        self.records += records
        await self.sender.send(records)


def test_a_stopping_worker_finishes_what_follows_an_insert_that_landed(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path
) -> None:
    """A worker stops while its ledger agent waits for the insert in flight (the agent has
    taken its next batch): the agent is cancelled first, the insert lands after that. What
    follows a landed insert still runs before the worker leaves its group (``Fence.revoked``):
    the batch's rollups are published and its events acknowledged, so the last commit passes
    them. The batch taken next, never written, stays unacknowledged."""
    gated = GatedStore(store)
    gated.release.clear()
    recording = RecordingSender(sender)
    app, ledger = _ledger_app(tmp_path, gated, recording, batch=10)  # type: ignore[arg-type]
    registry = Registry.load()
    # the first batch closes a window: half of it ten minutes before the rest
    earlier = clean_messages(registry, range(0, 5), ts=NOW - timedelta(minutes=10))
    values = [m.value for m in earlier + clean_messages(registry, range(5, 20), ts=NOW)]

    async def run() -> tuple[list[Any], list[Any]]:
        async with ledger.test_context() as agent:
            events = await _put(agent, values, 0)
            await until(gated.held.is_set, "the first insert")
            await until(lambda: agent.processed_offset >= 19, "the next batch taken")
            await agent.stop()  # as a stopping worker stops its agents, before it leaves
            gated.release.set()
            await asyncio.wait_for(app.fence.revoked(), 30)
            return events[:10], events[10:]

    written, taken = asyncio.run(run())
    assert _stored_ids(store) == _ids(0, 10)
    assert all(e.message.acked for e in written)
    assert not any(e.message.acked for e in taken)
    assert recording.topics == ["vigil.rollups"]  # the earlier window's


class HeldSender(RecordingSender):
    """A recording sender whose sends wait until ``release`` is set."""

    def __init__(self, sender: KafkaSender) -> None:
        super().__init__(sender)
        self.release = asyncio.Event()

    async def send(self, records: Any) -> None:
        await self.release.wait()
        await super().send(records)


def test_a_rebalance_waits_a_bounded_time_for_what_follows_an_insert(
    store: ClickHouseStore,
    sender: KafkaSender,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What follows a landed insert may retry Kafka or ClickHouse for as long as they are
    away: a rebalance waits for it ``LANDED_STEP_SECONDS``, says so, and goes on; the step
    finishes afterwards."""
    caplog.set_level(logging.WARNING, "vigil.worker")
    monkeypatch.setattr(pipeline.worker, "LANDED_STEP_SECONDS", 0.5)
    held = HeldSender(sender)
    app, ledger = _ledger_app(tmp_path, store, held, batch=10)  # type: ignore[arg-type]
    registry = Registry.load()
    earlier = clean_messages(registry, range(0, 5), ts=NOW - timedelta(minutes=10))
    values = [m.value for m in earlier + clean_messages(registry, range(5, 10), ts=NOW)]

    async def run() -> None:
        async with ledger.test_context() as agent:
            events = await _put(agent, values, 0)
            await until(lambda: count(store, "SELECT count() FROM vigil.audit_log") == 10,
                        "the insert")  # fmt: skip
            await asyncio.wait_for(_rebalance(app), 5)  # not held by the rollups' send
            assert "did not finish within" in caplog.text
            assert not any(e.message.acked for e in events)
            held.release.set()
            await until(lambda: all(e.message.acked for e in events), "the step, afterwards")

    asyncio.run(run())
    assert held.topics == ["vigil.rollups"]


def test_a_write_that_fails_after_its_agent_stopped_says_so(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody awaits an insert whose agent was cancelled while it ran: if it fails, the worker
    says so, and its batch stays unacknowledged, read again from the last commit."""
    caplog.set_level(logging.WARNING, "vigil.worker")
    gated, app, ledger, values = _held_insert(store, sender, tmp_path, fail=True)
    values += [m.value for m in clean_messages(Registry.load(), range(10, 20), ts=NOW)]

    async def run() -> list[Any]:
        async with ledger.test_context() as agent:
            events = await _put(agent, values, 0)
            await until(gated.held.is_set, "the insert")
            await until(lambda: agent.processed_offset >= 19, "the next batch taken")
            await agent.stop()
            gated.release.set()
            await asyncio.wait_for(app.fence.revoked(), 30)
            return events

    events = asyncio.run(run())
    assert "a write of 10 messages failed after its agent had stopped" in caplog.text
    assert "injected" in caplog.text
    assert not any(e.message.acked for e in events)
    assert count(store, "SELECT count() FROM vigil.audit_log") == 0


def test_a_message_without_a_value_is_dead_lettered_not_a_crash(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path
) -> None:
    """A tombstone (a message whose value is null, as a compaction tool or a careless producer
    writes) on clean, between events: the ledger agent weighed every message by its length, and
    crashed on it, again after every restart. It is now one message of nothing, rejected to
    the DLQ, and the events around it are stored and acknowledged."""
    recording = RecordingSender(sender)
    _app, ledger = _ledger_app(tmp_path, store, recording, batch=3)  # type: ignore[arg-type]
    values = [m.value for m in clean_messages(Registry.load(), range(0, 2), ts=NOW)]

    async def run() -> list[Any]:
        async with ledger.test_context() as agent:
            events = await _put(agent, [values[0], None, values[1]], 0)  # type: ignore[list-item]
            await until(lambda: all(e.message.acked for e in events), "the acks")
            return events

    asyncio.run(run())
    assert _stored_ids(store) == _ids(0, 2)
    ((topic, _key, value),) = recording.records
    letter = Registry.load().decode(value, DEAD_LETTER_SCHEMA)
    assert (topic, letter["stage"], letter["reason_code"], letter["origin_offset"]) == (
        "vigil.events.dlq", "ledger", "truncated", 1,
    )  # fmt: skip
