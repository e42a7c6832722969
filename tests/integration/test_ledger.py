"""The hash-chained ledger against the real engine: chains written by the ledger sink verify
clean, survive restarts and retries, and every tampering of the stored rows is detected."""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from pipeline.alerting import (
    ALERT_COLUMNS,
    DELIVERY_COLUMNS,
    Route,
    alert_row,
    pending_rows,
)
from pipeline.alerts import Alert
from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.config import load_config
from pipeline.enrich import enrich
from pipeline.events import Actor, Decision, Eval, Event, Interaction, Unit, event_to_avro
from pipeline.ledger import (
    CHAINED_COLUMNS,
    LEDGER_COLUMNS,
    AnchorHead,
    Chain,
    Retention,
    apply_retention,
    make_anchor,
    read_anchor,
    row_hash,
    verify,
)
from pipeline.rows import DLQ_COLUMNS, Origin
from pipeline.sink import LedgerSink, Message
from pipeline.store import ClickHouseStore
from pipeline.trail import Selector, trail
from pipeline.validate import Limits, route
from tests.pii_samples import email

pytestmark = pytest.mark.integration
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
NO_RETENTION = Retention()
_I = {c: i for i, c in enumerate(LEDGER_COLUMNS)}


def _events(rng: random.Random, n: int, prefix: str) -> list[Event]:
    """A mixed workload over two months and three tenants, with PII for the redact stage."""
    events: list[Event] = []
    for i in range(n):
        tenant = rng.choice(("acme", "globex", "initech"))
        ts = NOW - timedelta(days=rng.choice((0, 0, 1, 30)), minutes=rng.randint(0, 600))
        unit = Unit("ticket", f"T-{rng.randint(1, 40)}")
        base = Event(
            event_id=f"{prefix}-{i}",
            kind="interaction",
            ts=ts.replace(microsecond=rng.randint(0, 999_999)),
            tenant_id=tenant,
            agent_id="support-bot",
            trace_id=f"{rng.getrandbits(128):032x}",
            unit=unit,
            actor=Actor(f"user-{rng.randint(1, 9)}", "customer"),
            attributes={"n": str(i), "step": rng.choice(("plan", "act"))},
            body=Interaction(
                "openai",
                rng.choice(("gpt-4o", "gpt-4o-mini", "no-such-model")),
                input_tokens=rng.randint(1, 5000),
                output_tokens=rng.randint(1, 900),
                latency_ms=rng.uniform(10, 9000),
                input_text=f"Reach me at {email(rng)} please",
                output_text="Done.",
                reported_cost_usd=round(rng.uniform(0, 0.2), 7) if rng.random() < 0.5 else None,
            ),
        )
        roll = rng.random()
        if roll < 0.15:
            base = dataclasses.replace(
                base, kind="eval", body=Eval("faithfulness", rng.random(), 0.8, "online")
            )
        elif roll < 0.25:
            body = Decision(f"{prefix}-{max(0, i - 1)}", "approved", "rev-1", "looks right")
            base = dataclasses.replace(base, kind="decision", body=body)
        events.append(base)
    return events


def _messages(registry: Registry, events: list[Event], first_offset: int) -> list[Message]:
    """The clean-topic messages the validate stage would produce, over three partitions."""
    config = load_config(None, {})
    out = []
    for offset, event in enumerate(events, start=first_offset):
        raw = registry.encode(EVENT_SCHEMA, event_to_avro(event))
        origin = Origin("vigil.events.clean", offset % 3, offset)
        routed = route(
            raw,
            b"k",
            origin,
            registry,
            Limits(),
            NOW,
            config.policy_for,
            lambda e: enrich(e, config.catalog, config.agents),
        )
        assert routed.target == "clean", routed.reason_code
        out.append(Message(origin, routed.key, routed.value))
    return out


def _write(store: ClickHouseStore, registry: Registry, messages: list[Message]) -> None:
    sink = LedgerSink(store, registry, clock=lambda: NOW + timedelta(microseconds=123_456))
    for i in range(0, len(messages), 40):
        sink.write(messages[i : i + 40])


@pytest.fixture
def ledger(store: ClickHouseStore, registry: Registry) -> ClickHouseStore:
    rng = random.Random(5)
    _write(store, registry, _messages(registry, _events(rng, 300, "ev"), 0))
    return store


def _rows(store: ClickHouseStore, where: str = "1") -> list[tuple[Any, ...]]:
    return store.query_rows(
        f"SELECT {', '.join(LEDGER_COLUMNS)} FROM vigil.audit_log WHERE {where} "
        "ORDER BY tenant_id, source_partition, toYYYYMM(ts), chain_seq"
    )


def test_chains_are_contiguous_and_verify_clean(ledger: ClickHouseStore) -> None:
    rows = _rows(ledger)
    assert len(rows) == 300
    by_chain: dict[tuple[Any, ...], list[int]] = {}
    for r in rows:
        by_chain.setdefault((r[_I["tenant_id"]], r[_I["source_partition"]], r[_I["ts"]].month), [])
        by_chain[(r[_I["tenant_id"]], r[_I["source_partition"]], r[_I["ts"]].month)].append(
            r[_I["chain_seq"]]
        )
    assert len(by_chain) >= 12  # 3 tenants x 3 partitions x 2 months
    for seqs in by_chain.values():
        assert seqs == list(range(1, len(seqs) + 1))
    # every stored row hashes to its row_hash, read natively from the engine
    assert all(row_hash(r[:-1]) == r[-1] for r in rows)
    verdict = verify(ledger, NO_RETENTION, now=NOW)
    assert verdict.ok, verdict.breaks[:3]
    assert (verdict.rows, verdict.chains) == (300, len(by_chain))


def test_a_restarted_writer_and_a_retried_batch_continue_the_chain(
    ledger: ClickHouseStore, registry: Registry
) -> None:
    more = _messages(registry, _events(random.Random(6), 120, "more"), 300)
    sink = LedgerSink(ledger, registry, clock=lambda: NOW)  # a new process: no memory of heads
    sink.write(more[:60])
    assert sink.write(more[:60]).inserted == 0  # the retry of a batch that did land
    assert sink.write(more[30:]).inserted == 60  # re-read after a crash, cut differently
    verdict = verify(ledger, NO_RETENTION, now=NOW)
    assert verdict.ok and verdict.rows == 420, verdict.breaks[:3]


def test_chains_continue_from_the_ledger_when_the_heads_table_missed_inserts(
    ledger: ClickHouseStore, registry: Registry
) -> None:
    """An insert can land in audit_log and fail in the heads table's view: the writer then
    finds where the chains end in the ledger itself, and does not fork them."""
    ledger.command("TRUNCATE TABLE vigil.audit_chain_heads")
    more = _messages(registry, _events(random.Random(8), 90, "after"), 300)
    assert LedgerSink(ledger, registry, clock=lambda: NOW).write(more).inserted == 90
    seqs = ledger.query_rows(
        "SELECT count(), uniqExact(tenant_id, source_partition, toYYYYMM(ts), chain_seq) "
        "FROM vigil.audit_log"
    )
    assert seqs == [(390, 390)]  # no seq taken twice in a chain
    verdict = verify(ledger, NO_RETENTION, now=NOW)
    assert verdict.ok and verdict.rows == 390, verdict.breaks[:3]


def test_a_batch_touching_thousands_of_chains_continues_each_of_them(
    store: ClickHouseStore, registry: Registry
) -> None:
    """200 tenants over 12 partitions in one batch: 200 table partitions (ClickHouse refuses
    more than 100 in an insert by default) and 2,400 chains, more than one query may name."""
    base = _events(random.Random(7), 1, "many")[0]

    def batch(first: int) -> list[Message]:
        events = [
            dataclasses.replace(base, event_id=f"many-{first + i}", tenant_id=f"t-{i // 12:03d}")
            for i in range(2400)
        ]
        return [
            Message(Origin("vigil.events.clean", i % 12, first + i), b"k",
                    registry.encode(EVENT_SCHEMA, event_to_avro(e)))
            for i, e in enumerate(events)
        ]  # fmt: skip

    sink = LedgerSink(store, registry, clock=lambda: NOW)
    assert sink.write(batch(0)).inserted == 2400
    assert sink.write(batch(2400)).inserted == 2400  # every chain's head found and continued
    assert store.query_rows(
        "SELECT chain_seq, count() FROM vigil.audit_log GROUP BY chain_seq ORDER BY chain_seq"
    ) == [(1, 2400), (2, 2400)]
    verdict = verify(store, NO_RETENTION, now=NOW)
    assert verdict.ok and (verdict.rows, verdict.chains) == (4800, 2400), verdict.breaks[:3]


def _store_as(store: ClickHouseStore, rows: list[tuple[Any, ...]]) -> None:
    """Make the stored ledger exactly ``rows``: the end state of a tampering (the heads table
    is restored to what the writer left and sees the forged inserts, as it would)."""
    store.command("TRUNCATE TABLE vigil.audit_log")
    store.command("TRUNCATE TABLE vigil.audit_chain_heads")
    store.command(
        "INSERT INTO vigil.audit_chain_heads SELECT * FROM vigil.audit_chain_heads_pristine "
        "SETTINGS insert_deduplicate = 0"
    )
    store.insert("vigil.audit_log", rows, LEDGER_COLUMNS, f"state-{random.random()}")


def _rehash(row: list[Any]) -> tuple[Any, ...]:
    return (*row[:-1], row_hash(row[:-1]))


_MUTABLE = [c for c in CHAINED_COLUMNS if c not in ("tenant_id", "source_partition", "ts")]


def _change(column: str, value: Any, rng: random.Random) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.randint(1, 5)
    if isinstance(value, float):
        return value * 1.5 + 1
    if isinstance(value, Decimal):
        return value + Decimal("0.000000001")
    if isinstance(value, datetime):
        return value + timedelta(milliseconds=rng.randint(1, 3))
    if isinstance(value, dict):
        return {**value, "approved_by": "mallory"}
    if isinstance(value, list):  # redactions: hide that something was found
        return [*value, {"field": "input_text", "type": "email", "count": 1}]
    if value is None:
        return {"latency_ms": 1.0, "value": 1.0, "score": 1.0, "threshold": 1.0}.get(
            column, Decimal("1") if column.endswith("usd") or column == "amount" else "x"
        )
    return str(value) + "x"


def _chain(row: tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    return (row[_I["tenant_id"]], row[_I["source_partition"]], row[_I["ts"]].month)


def _tamper(
    pristine: list[tuple[Any, ...]], rng: random.Random
) -> tuple[list[tuple[Any, ...]], str, bool]:
    """One random tampering an attacker with write access could do to the stored rows.

    Returns the tampered rows, the break kind it must be reported as ("any" where several
    describe it), and whether it touched the last row of a chain (which only an anchor taken
    before can reveal when the attacker also recomputes the hash)."""
    rows = list(pristine)
    i = rng.randrange(len(rows))
    row = list(rows[i])
    chain = [r for r in rows if _chain(r) == _chain(row)]
    tail = row[_I["chain_seq"]] == chain[-1][_I["chain_seq"]]
    what = rng.choice(("update", "update_rehash", "delete", "delete_tail", "forge", "swap"))
    if what in ("update", "update_rehash"):
        column = rng.choice([*_MUTABLE, "row_hash", "ts", "tenant_id", "source_partition"])
        c = _I[column]
        if column == "tenant_id":
            row[c] = rng.choice([t for t in ("acme", "globex", "initech") if t != row[c]])
        elif column == "ts":
            row[c] = row[c] - timedelta(days=rng.choice((0, 0, 40)), milliseconds=1)
        elif column == "source_partition":
            row[c] = (row[c] + 1) % 3
        else:
            row[c] = _change(column, row[c], rng)
        rehash = what == "update_rehash" and column != "row_hash"
        rows[i] = _rehash(row) if rehash else tuple(row)
        moved = column in ("tenant_id", "source_partition", "ts", "chain_seq", "prev_hash")
        return rows, "any" if rehash or moved else "modified", tail
    if what == "delete":
        del rows[i]
        return rows, "deleted", tail
    if what == "delete_tail":
        rows.remove(chain[-1])
        return rows, "deleted", True
    if what == "forge":
        forged = list(row)
        forged[_I["event_id"]] = f"forged-{rng.getrandbits(32)}"
        forged[_I["output_text"]] = "Approved by the compliance team."
        forged[_I["chain_seq"]] = rng.choice(chain)[_I["chain_seq"]]
        rows.append(_rehash(forged))
        return rows, "inserted", False
    others = [r for r in chain if r[_I["chain_seq"]] != row[_I["chain_seq"]]]
    if not others:  # a chain of one row: push it forward instead
        row[_I["chain_seq"]] += 1
        rows[i] = tuple(row)
        return rows, "any", True
    other = list(rng.choice(others))
    j = rows.index(tuple(other))
    row[_I["chain_seq"]], other[_I["chain_seq"]] = other[_I["chain_seq"]], row[_I["chain_seq"]]
    rows[i], rows[j] = tuple(row), tuple(other)
    return rows, "reordered", tail or other[_I["chain_seq"]] == chain[-1][_I["chain_seq"]]


def test_every_random_tampering_is_detected(ledger: ClickHouseStore) -> None:
    ledger.command("CREATE TABLE vigil.audit_chain_heads_pristine AS vigil.audit_chain_heads")
    ledger.command(
        "INSERT INTO vigil.audit_chain_heads_pristine SELECT * FROM vigil.audit_chain_heads"
    )
    anchor = read_anchor(make_anchor(ledger, NOW), "anchor.json")
    pristine = _rows(ledger)
    rng = random.Random(20261122)
    kinds: Counter[str] = Counter()
    for attempt in range(200):
        rows, expected, tail = _tamper(pristine, rng)
        _store_as(ledger, rows)
        verdict = verify(ledger, NO_RETENTION, anchor=anchor, now=NOW)
        assert not verdict.ok, f"tampering {attempt} ({expected}) went undetected"
        if expected != "any":
            assert expected in {b.kind for b in verdict.breaks}, (attempt, verdict.breaks)
        if not tail:  # inside a chain the chain alone is enough
            assert not verify(ledger, NO_RETENTION, now=NOW).ok, (attempt, expected)
        kinds[expected] += 1
    _store_as(ledger, pristine)
    assert verify(ledger, NO_RETENTION, anchor=anchor, now=NOW).ok  # untouched: clean again
    assert set(kinds) >= {"modified", "deleted", "inserted", "reordered"}, kinds


def test_an_anchor_proves_the_history_before_it(ledger: ClickHouseStore) -> None:
    anchor = make_anchor(ledger, NOW)
    heads = read_anchor(anchor, "anchor.json")
    assert verify(ledger, NO_RETENTION, anchor=heads, now=NOW).ok
    # an attacker rewrites a whole chain consistently (every hash recomputed) from its start:
    # the chain alone verifies, the anchor does not
    target = heads[0]
    rows = _rows(
        ledger,
        f"tenant_id = '{target.chain.tenant}' AND source_partition = {target.chain.partition} "
        f"AND toYYYYMM(ts) = {target.chain.month}",
    )
    prev = rows[0][_I["prev_hash"]]
    forged = []
    for r in rows:
        row = list(r)
        row[_I["prev_hash"]] = prev
        if r is rows[0]:
            row[_I["output_text"]] = "rewritten"
        forged.append(_rehash(row))
        prev = forged[-1][-1]
    ledger.command(
        f"ALTER TABLE vigil.audit_log DELETE WHERE event_id IN "
        f"({', '.join(repr(r[_I['event_id']]) for r in rows)}) SETTINGS mutations_sync = 2"
    )
    ledger.insert("vigil.audit_log", forged, LEDGER_COLUMNS, "forged")
    assert verify(ledger, NO_RETENTION, now=NOW).ok
    verdict = verify(ledger, NO_RETENTION, anchor=heads, now=NOW)
    assert not verdict.ok and verdict.breaks[0].kind == "modified"
    # an edited anchor is refused
    anchor["heads"][0]["seq"] += 1
    with pytest.raises(ValueError, match="digest does not match"):
        read_anchor(anchor, "anchor.json")
    # and one that is not an anchor is named for what it lacks (it was a TypeError's repr)
    for not_one in ([], {"heads": 5, "digest": "x"}, {"heads": []}):
        with pytest.raises(ValueError, match=r"anchor\.json: not a Vigil anchor: expected an obj"):
            read_anchor(not_one, "anchor.json")
    with pytest.raises(ValueError, match=r"heads\[1\] is not a chain head \(tenant, partition"):
        read_anchor({**anchor, "heads": [anchor["heads"][0], {"tenant": "acme"}]}, "anchor.json")


def test_expired_months_are_expired_not_tampering(ledger: ClickHouseStore) -> None:
    later = NOW + timedelta(days=15)  # the October chains are past a 30-day retention by then
    retention = Retention({"acme": 30, "globex": 30}, held_tenants=frozenset({"globex"}))
    ledger.command(
        "ALTER TABLE vigil.audit_log DELETE WHERE toYYYYMM(ts) = 202610 "
        "AND tenant_id IN ('acme', 'globex') SETTINGS mutations_sync = 2"
    )
    verdict = verify(ledger, retention, now=later)
    assert {b.chain.tenant for b in verdict.breaks} == {"globex"}  # globex is on legal hold
    assert {b.kind for b in verdict.breaks} == {"deleted"}
    assert verdict.expired_chains >= 1 and verdict.expired_rows > 0
    assert verify(ledger, Retention({"acme": 30, "globex": 30}), now=later).ok
    # before the retention period is over the same deletion is tampering
    assert not verify(ledger, Retention({"acme": 30, "globex": 30}), now=NOW).ok


def test_the_ttl_expires_whole_months_and_keeps_held_units(ledger: ClickHouseStore) -> None:
    held = _rows(ledger, "tenant_id = 'acme' AND toYYYYMM(ts) = 202610")[0]
    unit = ("acme", held[_I["unit_type"]], held[_I["unit_id"]])
    # ClickHouse expires by its own clock, not NOW: keep acme's rows for as many days as have
    # passed since October ended, so October is just expired and November (ending a month
    # later) is not, whatever the date the test runs on
    days = (datetime.now(UTC).date() - date(2026, 11, 1)).days
    retention = Retention({"acme": days}, held_units=frozenset({unit}))
    assert apply_retention(ledger, retention)
    assert not apply_retention(ledger, retention)  # installed once, not rewritten at every start
    ledger.command("OPTIMIZE TABLE vigil.audit_log FINAL")
    left = ledger.query_rows(
        "SELECT toYYYYMM(ts), countIf((unit_type, unit_id) = "
        f"('{unit[1]}', '{unit[2]}')), count() FROM vigil.audit_log WHERE tenant_id = 'acme' "
        "GROUP BY 1 ORDER BY 1"
    )
    october, november = left
    assert october[0] == 202610 and october[1] == october[2] > 0  # only the held unit is left
    assert november[0] == 202611 and november[2] > november[1]  # this month is not expired
    assert (
        int(
            ledger.query_rows("SELECT count() FROM vigil.audit_log WHERE tenant_id != 'acme'")[0][0]
        )
        > 0
    )
    assert verify(ledger, retention, now=datetime.now(UTC)).ok


def _retain_30_days_but_held(store: ClickHouseStore) -> None:
    """Install 30 days for acme, globex (held) and umbrella (a unit held); none for initech."""
    retention = Retention(
        {"acme": 30, "globex": 30, "umbrella": 30},
        held_tenants=frozenset({"globex"}),
        held_units=frozenset({("umbrella", "ticket", "T-1")}),
    )
    assert apply_retention(store, retention)
    assert not apply_retention(store, retention)  # installed once


def test_dead_letters_expire_with_their_tenants_retention(store: ClickHouseStore) -> None:
    """A tenant's dead letters do not outlive its retention; a held tenant's, one with a unit
    on hold, and letters that name no tenant with a retention are kept."""
    now = datetime.now(UTC)
    tenants = ("acme", "globex", "initech", "umbrella", "")
    letters = [(f"{t or 'none'}-{age}", "validate", "bad", "bad", "raw", 0, i, "k", t, "",
                "x", 1, now - timedelta(days=age), now)
               for i, t in enumerate(tenants) for age in (1, 40)]  # fmt: skip
    store.insert("vigil.dlq", letters, DLQ_COLUMNS, "dlq-retention")
    _retain_30_days_but_held(store)
    store.command("OPTIMIZE TABLE vigil.dlq FINAL")
    kept = {r[0] for r in store.query_rows("SELECT dlq_id FROM vigil.dlq")}
    assert kept == {letter[0] for letter in letters} - {"acme-40"}


def test_alerts_and_their_deliveries_expire_with_their_tenants_ledger_months(
    store: ClickHouseStore,
) -> None:
    """A 30-day tenant's alerts of a month that ended more than 30 days ago expire, with their
    webhook deliveries; this month's are kept, as are a held tenant's, one's with a unit on
    hold, and those of a tenant with no retention."""
    now = datetime.now(UTC)
    alerts, owed = [], []
    for tenant in ("acme", "globex", "initech", "umbrella"):
        for age in (0, 70):  # this month; a month that ended 39 days ago or more
            fired = Alert("budget_threshold", {"tenant": tenant}, now - timedelta(days=age),
                          "spend_usd", 1.0, 1.0, "crossed")  # fmt: skip
            alerts.append(alert_row(fired, now))
            owed += pending_rows([fired], [Route("http://hooks.example/x", name="x")], now)
    store.insert("vigil.alerts", alerts, ALERT_COLUMNS, "alerts-retention")
    store.insert("vigil.alert_deliveries", owed, DELIVERY_COLUMNS, "owed-retention")
    _retain_30_days_but_held(store)
    for table in ("alerts", "alert_deliveries"):
        store.command(f"OPTIMIZE TABLE vigil.{table} FINAL")
        kept = store.query_rows(f"SELECT tenant_id, fired_at < now() - INTERVAL 60 DAY "
                                f"FROM vigil.{table} ORDER BY 1, 2")  # fmt: skip
        assert kept == [("acme", False), ("globex", False), ("globex", True),
                        ("initech", False), ("initech", True), ("umbrella", False),
                        ("umbrella", True)], table  # fmt: skip


def _chain_of_heads(heads: list[AnchorHead]) -> set[Chain]:
    return {h.chain for h in heads}


@pytest.fixture
def remote_ledger(ledger: ClickHouseStore, tmp_path: Any) -> Iterator[Any]:
    """The same ledger read through the owner endpoint (JSON), as other processes read it."""
    from pipeline.owner import OwnerServer, find_owner

    owner = OwnerServer(ledger, tmp_path).start()
    try:
        yield find_owner(tmp_path)
    finally:
        owner.close()


def test_verify_through_the_owner_endpoint_reads_the_same_hashes(remote_ledger: Any) -> None:
    verdict = verify(remote_ledger, NO_RETENTION, now=NOW)
    assert verdict.ok and verdict.rows == 300, verdict.breaks[:3]
    assert _chain_of_heads(read_anchor(make_anchor(remote_ledger, NOW), "-"))


def test_chains_continue_when_partitions_move_between_workers(
    kafka_bootstrap: str, store: ClickHouseStore, registry: Registry
) -> None:
    """Two ledger writers in one consumer group on the real broker: the second joins midway
    and the first leaves, so partitions change hands twice, mid-chain. Both write to the one
    store, as two workers share a ClickHouse server."""
    import threading
    import uuid

    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    topic = f"ledger-rebalance-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])[topic].result()
    events = _events(random.Random(9), 5000, "rb")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 20})

    def produce(part: list[Event], first: int) -> None:
        for i, event in enumerate(part, start=first):
            value = registry.encode(EVENT_SCHEMA, event_to_avro(dataclasses.replace(event, ts=NOW)))
            producer.produce(topic, value=value, partition=i % 4)
        assert producer.flush(60) == 0

    written: dict[str, set[int]] = {"a": set(), "b": set()}
    assigned = {"a": threading.Event(), "b": threading.Event()}
    stop = {"a": threading.Event(), "b": threading.Event()}

    def run(name: str) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": kafka_bootstrap,
                "group.id": f"{topic}-ledger",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe(
            [topic], on_assign=lambda c, parts: assigned[name].set() if parts else None
        )
        sink = LedgerSink(store, registry, clock=lambda: NOW)
        try:
            while not stop[name].is_set():
                batch = [m for m in consumer.consume(150, timeout=0.2) if m.error() is None]
                if batch:
                    messages = [
                        Message(Origin(topic, m.partition(), m.offset()), m.key(), m.value())  # type: ignore[arg-type]
                        for m in batch
                    ]
                    sink.write(messages)
                    consumer.commit(asynchronous=False)
                    written[name].update(m.origin.partition for m in messages)
        finally:
            consumer.close()

    def stored() -> int:
        return int(store.query_rows("SELECT count() FROM vigil.audit_log")[0][0])

    def wait_stored(n: int) -> None:
        deadline = time.monotonic() + 120
        while stored() < n and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stored() == n

    a = threading.Thread(target=run, args=("a",))
    a.start()
    produce(events[:2000], 0)
    wait_stored(2000)  # the first worker wrote every partition
    b = threading.Thread(target=run, args=("b",))
    b.start()
    assert assigned["b"].wait(60)  # the group rebalanced: some partitions moved to b
    produce(events[2000:4000], 2000)
    wait_stored(4000)
    stop["a"].set()  # the first worker leaves: b takes its partitions back over
    a.join()
    produce(events[4000:], 4000)
    wait_stored(5000)
    stop["b"].set()
    b.join()
    assert written["a"] & written["b"] and written["b"] == {0, 1, 2, 3}, written
    total, distinct = store.query_rows("SELECT count(), uniqExact(event_id) FROM vigil.audit_log")[
        0
    ]
    assert (int(total), int(distinct)) == (5000, 5000)
    verdict = verify(store, NO_RETENTION, now=NOW)
    assert verdict.ok and verdict.rows == 5000, verdict.breaks[:3]


def test_event_ids_are_deduplicated_within_a_tenant_not_across_tenants(
    store: ClickHouseStore, registry: Registry
) -> None:
    """Producers choose event ids, so two tenants can pick the same one: neither may hide the
    other's event, in the ledger or in a trail."""
    base = _events(random.Random(9), 1, "same")[0]
    acme = dataclasses.replace(base, tenant_id="acme", trace_id="a" * 32)
    globex = dataclasses.replace(base, tenant_id="globex", trace_id="b" * 32)
    review = Event(
        event_id="review-1",
        kind="decision",
        ts=base.ts + timedelta(seconds=1),
        tenant_id="globex",
        agent_id="support-bot",
        body=Decision(base.event_id, "rejected", "rev-2", "wrong"),
    )
    sink = LedgerSink(store, registry, clock=lambda: NOW)
    first = sink.write(_messages(registry, [acme, globex, review], 0))
    assert (first.inserted, first.duplicates) == (3, 0)
    assert [(e.tenant_id, e.event_id) for e in first.stored] == [
        ("acme", base.event_id), ("globex", base.event_id), ("globex", "review-1")
    ]  # fmt: skip
    # re-delivered at other offsets, one of them twice in the batch: all dropped
    again = sink.write(_messages(registry, [globex, acme, globex], 10))
    assert (again.inserted, again.duplicates) == (0, 3)
    assert store.query_rows(
        "SELECT tenant_id, count() FROM vigil.audit_log WHERE event_id = "
        f"'{base.event_id}' GROUP BY tenant_id ORDER BY tenant_id"
    ) == [("acme", 1), ("globex", 1)]
    # globex's review of its event is in globex's trail, not in acme's
    _, acme_trail = trail(store, Selector("trace", "a" * 32))
    _, globex_trail = trail(store, Selector("trace", "b" * 32))
    assert [r["event_id"] for r in acme_trail] == [base.event_id]
    assert [r["event_id"] for r in globex_trail] == [base.event_id, "review-1"]
