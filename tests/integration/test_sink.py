"""Sinks against the real engine: a batch is stored once however it is retried or re-cut."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from pipeline.codec import DEAD_LETTER_SCHEMA, EVENT_SCHEMA, Registry
from pipeline.dlq import dead_letter, dlq_id
from pipeline.events import (
    Cost,
    Enrichment,
    Event,
    Interaction,
    InvalidEvent,
    Redaction,
    event_from_avro,
    event_to_avro,
)
from pipeline.handoff import HandOff
from pipeline.ledger import Retention, chain_of, verify
from pipeline.owner import OwnerServer, find_owner
from pipeline.rows import Origin
from pipeline.sink import (
    MAX_TS_RANGES,
    ChainEnds,
    DlqSink,
    LedgerSink,
    Message,
    _scoped_chunks,
    dedup_token,
    origin_condition,
    stored_keys,
    ts_ranges,
)
from pipeline.store import (
    DEFAULT_QUERY_BYTES,
    MAX_QUERY_BYTES,
    ClickHouseStore,
    StoreError,
    long_query_size,
)
from pipeline.validate import Limits, route
from tests.integration.conftest import RecordingStore, clean_messages, tenant_messages

pytestmark = pytest.mark.integration
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def _messages_with_ids(registry: Registry, ids: list[str]) -> list[Message]:
    one = clean_messages(registry, range(1), ts=NOW)[0]
    base = event_from_avro(registry.decode(one.value, EVENT_SCHEMA))
    return [
        Message(
            Origin("clean", 0, i),
            b"acme/bot",
            registry.encode(EVENT_SCHEMA, event_to_avro(dataclasses.replace(base, event_id=e))),
        )
        for i, e in enumerate(ids)
    ]


def _messages_at(registry: Registry, events: list[tuple[str, datetime]]) -> list[Message]:
    """One message per (event_id, ts), at offsets 0, 1, 2..."""
    base = event_from_avro(
        registry.decode(clean_messages(registry, range(1), ts=NOW)[0].value, EVENT_SCHEMA)
    )
    return [
        Message(
            Origin("clean", 0, i),
            b"acme/bot",
            registry.encode(
                EVENT_SCHEMA, event_to_avro(dataclasses.replace(base, event_id=e, ts=ts))
            ),
        )
        for i, (e, ts) in enumerate(events)
    ]


def _stored(store: ClickHouseStore) -> tuple[int, int]:
    total, distinct = store.query_rows("SELECT count(), uniqExact(event_id) FROM vigil.audit_log")[
        0
    ]
    return int(total), int(distinct)


def test_retried_and_recut_batches_are_stored_once(
    store: ClickHouseStore, registry: Registry
) -> None:
    sink = LedgerSink(store, registry, clock=lambda: NOW)
    first = sink.write(clean_messages(registry, range(0, 100), ts=NOW))
    assert (first.inserted, first.duplicates) == (100, 0)
    again = sink.write(clean_messages(registry, range(0, 100), ts=NOW))  # a retry of the same batch
    assert again.inserted == 0 and _stored(store) == (100, 100)
    recut = sink.write(
        clean_messages(registry, range(50, 180), ts=NOW)
    )  # re-read after a crash, cut differently
    assert (recut.inserted, recut.duplicates) == (80, 50)
    repeated_in_topic = sink.write(
        clean_messages(registry, range(0, 10), partition=1, ts=NOW)
    )  # same events at new offsets
    assert repeated_in_topic.inserted == 0
    assert _stored(store) == (180, 180)


def test_the_ledger_takes_the_events_a_validator_in_its_process_handed_over(
    store: ClickHouseStore, registry: Registry
) -> None:
    """What the hand-off holds is stored without a decode; what it does not is decoded."""
    events = [m.value for m in clean_messages(registry, range(10), ts=NOW)]
    built = {v: event_from_avro(registry.decode(v, EVENT_SCHEMA)) for v in events}
    handoff = HandOff()
    handoff.put([(v, built[v]) for v in events[:6]])  # the other four: another worker's, say
    batch = Message(Origin("clean", 1, 5), b"acme/bot", registry.encode_batch(events))
    result = LedgerSink(store, registry, clock=lambda: NOW, handoff=handoff).write([batch])

    assert (result.inserted, handoff.taken, handoff.missed, len(handoff)) == (10, 6, 4, 0)
    assert [e is built[v] for e, v in zip(result.stored, events, strict=True)] == [True] * 6 + [
        False
    ] * 4
    assert [e.event_id for e in result.stored] == [built[v].event_id for v in events]
    assert _stored(store) == (10, 10) and verify(store, Retention(), now=NOW).ok


def test_undecodable_clean_messages_are_returned_for_the_dlq(
    store: ClickHouseStore, registry: Registry
) -> None:
    good = clean_messages(registry, range(3), ts=NOW)
    junk = Message(Origin("clean", 0, 3), None, b"\x00\x00\x00\x00\x01garbage")
    result = LedgerSink(store, registry).write([*good, junk])
    assert result.inserted == 3
    assert [(m.origin.offset, e.code) for m, e in result.rejected] == [(3, "corrupt_avro")]


def test_an_amount_the_ledger_cannot_hold_is_rejected_alone(
    store: ClickHouseStore, registry: Registry
) -> None:
    """An event that skipped validation with a cost beyond Decimal(18, 9): its insert would
    fail the whole batch on every retry, and the ledger stop. It is rejected alone, named, and
    the rest of its batch stored."""
    good = [m.value for m in clean_messages(registry, range(3), ts=NOW)]
    base = event_from_avro(registry.decode(good[0], EVENT_SCHEMA))
    huge = dataclasses.replace(base, event_id="huge", kind="cost", body=Cost(1e10))
    value = registry.encode(EVENT_SCHEMA, event_to_avro(huge))
    batch = Message(
        Origin("clean", 0, 7), b"acme", registry.encode_batch([good[0], value, *good[1:]])
    )
    result = LedgerSink(store, registry).write([batch])
    assert result.inserted == 3
    ((rejected, error),) = result.rejected
    assert (rejected.value, rejected.origin.index, error.code) == (value, 1, "out_of_range")
    assert str(error).startswith(
        "event 2 of 4 in an EventBatch: amount: 10000000000.0 is not below"
    )
    assert _stored(store) == (3, 3)


def test_a_count_measure_or_amount_no_column_or_hash_holds_is_rejected_alone(
    store: ClickHouseStore, registry: Registry
) -> None:
    """Events that skipped validation: a negative token count failed the whole insert (a
    UInt64 column) on every retry; a NaN latency raised ValueError out of the row's hash, which
    stopped the worker at each restart; a cost that is no number raised InvalidOperation."""
    good = [m.value for m in clean_messages(registry, range(2), ts=NOW)]
    base = event_from_avro(registry.decode(good[0], EVENT_SCHEMA))
    assert isinstance(base.body, Interaction)
    forged = [
        dataclasses.replace(base, event_id="neg", body=dataclasses.replace(
            base.body, input_tokens=-5)),
        dataclasses.replace(base, event_id="nan", body=dataclasses.replace(
            base.body, latency_ms=float("nan"))),
        dataclasses.replace(base, event_id="word", enrichment=Enrichment("priced", "cheap")),
        dataclasses.replace(base, event_id="count", redactions=(Redaction("input_text", "email",
                                                                          -1),)),
    ]  # fmt: skip
    values = [registry.encode(EVENT_SCHEMA, event_to_avro(e)) for e in forged]
    batch = Message(Origin("clean", 0, 8), b"acme", registry.encode_batch([*values, *good]))
    result = LedgerSink(store, registry).write([batch])
    assert result.inserted == 2
    assert [(m.origin.index, e.code) for m, e in result.rejected] == [
        (0, "out_of_range"), (1, "not_finite"), (2, "bad_value"), (3, "out_of_range")]  # fmt: skip
    assert [str(e).split(": ", 1)[1] for _, e in result.rejected] == [
        "input_tokens: -5 is not a count the ledger's UInt64 column holds",
        "latency_ms: nan is not a finite number",
        "cost_usd: 'cheap' is not a number",
        "redactions: a count of -1 is not one the ledger's UInt32 holds",
    ]
    assert _stored(store) == (2, 2) and verify(store, Retention(), now=NOW).ok


def test_a_negative_zero_amount_is_stored_as_zero_and_verifies(
    store: ClickHouseStore, registry: Registry
) -> None:
    """round(-0.0001, 2) is -0.0: it passes validation, and was hashed as -0 but stored (and
    read back) as 0, so verify reported an untouched row as modified."""
    now = datetime.now(UTC)
    refund = Event(event_id="refund", kind="cost", ts=now, tenant_id="acme", agent_id="bot",
                   body=Cost(round(-0.0001, 2)))  # fmt: skip
    call = dataclasses.replace(refund, event_id="call", kind="interaction", body=Interaction(
        "openai", "gpt-4o", input_tokens=3, reported_cost_usd=-0.0))  # fmt: skip
    clean = [
        route(registry.encode_event(e), b"acme/bot", Origin("raw", 0, i), registry, Limits(), now)
        for i, e in enumerate((refund, call))
    ]
    assert [r.target for r in clean] == ["clean", "clean"]
    batch = Message(Origin("clean", 0, 1), b"acme", registry.encode_batch([r.value for r in clean]))
    assert LedgerSink(store, registry).write([batch]).inserted == 2
    assert verify(store, Retention(), now=now).ok
    amounts = store.query_rows("SELECT toString(amount), toString(reported_cost_usd) FROM "
                               "vigil.audit_log ORDER BY event_id")  # fmt: skip
    assert amounts == [(None, "0"), ("0", None)]  # call, refund


def test_the_events_of_an_event_batch_are_stored_with_the_batch_origin(
    store: ClickHouseStore, registry: Registry
) -> None:
    events = [m.value for m in clean_messages(registry, range(5), ts=NOW)]
    bad_event = registry.encode_batch([b"\x00\x00\x00\x00\x04cut"])  # a batch, not an event
    truncated = events[0][:-3]
    batch = Message(Origin("clean", 2, 40), b"acme/bot", registry.encode_batch(
        [*events[:2], bad_event, *events[2:], truncated]
    ))  # fmt: skip
    old_style = Message(
        Origin("clean", 2, 41), b"acme/bot", clean_messages(registry, range(9, 10), ts=NOW)[0].value
    )
    corrupt = Message(Origin("clean", 2, 42), b"acme/bot", registry.encode_batch(events)[:-9])
    result = LedgerSink(store, registry, clock=lambda: NOW).write([batch, old_style, corrupt])

    assert result.inserted == 6 and [e.event_id for e in result.stored] == [
        "e-0'\\",
        "e-1'\\",
        "e-2'\\",
        "e-3'\\",
        "e-4'\\",
        "e-9'\\",
    ]
    rows = store.query_rows(
        "SELECT event_id, source_partition, source_offset FROM vigil.audit_log ORDER BY event_id"
    )
    assert [(r[1], r[2]) for r in rows] == [(2, 40)] * 5 + [(2, 41)]
    # a batch's bad events are rejected one by one, each with its own bytes, place and dead
    # letter; a batch that does not decode is rejected whole
    assert [(m.origin.offset, m.origin.index, m.value, e.code) for m, e in result.rejected] == [
        (40, 2, bad_event, "wrong_schema"),
        (40, 6, truncated, "corrupt_avro"),
        (42, None, corrupt.value, "corrupt_avro"),
    ]
    assert str(result.rejected[1][1]).startswith("event 7 of 7 in an EventBatch: payload: ")
    letters = [
        dead_letter(m.value, m.key, m.origin, e, stage="ledger", received_at=NOW)
        for m, e in result.rejected
    ]
    assert len({letter["dlq_id"] for letter in letters}) == 3
    assert letters[2]["dlq_id"] == dlq_id(Origin("clean", 2, 42), "ledger")  # as it always was


def test_dead_letters_are_stored_once_with_raw_bytes(
    store: ClickHouseStore, registry: Registry
) -> None:
    payload = bytes(range(256))
    letters = [
        Message(
            Origin("dlq", 0, i),
            b"acme/x",
            registry.encode(
                DEAD_LETTER_SCHEMA,
                dead_letter(
                    payload,
                    b"acme/x",
                    Origin("raw", 1, 100 + i),
                    InvalidEvent("bad_magic", "payload: magic byte is 7"),
                    stage="validate",
                    received_at=NOW,
                ),
            ),
        )
        for i in range(5)
    ]
    not_a_letter = Message(Origin("dlq", 0, 5), None, b"something else entirely")
    sink = DlqSink(store, registry, clock=lambda: NOW)
    assert sink.write([*letters, not_a_letter]).inserted == 6
    assert sink.write(letters).inserted == 0
    rows = store.query_rows(
        "SELECT reason_code, lower(hex(payload)), origin_topic, origin_offset, tenant_hint, stage "
        "FROM vigil.dlq ORDER BY origin_topic, origin_offset"
    )
    assert [(r[0], r[2], r[3]) for r in rows] == [("bad_magic", "dlq", 5)] + [
        ("bad_magic", "raw", 100 + i) for i in range(5)
    ]
    assert rows[1][1] == payload.hex(), "raw bytes are kept exactly"
    assert rows[1][4] == "acme" and rows[1][5] == "validate"
    assert rows[0][1] == b"something else entirely".hex() and rows[0][5] == "dlq"


def test_a_letter_the_dlq_cannot_hold_is_stored_as_one_about_itself(
    store: ClickHouseStore, registry: Registry
) -> None:
    """A record of the dead-letter schema that Vigil did not write, with a negative origin
    offset: its row would fail the whole batch's insert on every retry, and the DLQ stop.
    It is stored as a letter about itself, beside the batch's good letter."""

    def letter(offset: int) -> bytes:
        record = dead_letter(b"x", b"acme/x", Origin("raw", 1, 7),
                             InvalidEvent("bad_magic", "payload: magic byte is 7"),
                             stage="validate", received_at=NOW)  # fmt: skip
        return registry.encode(DEAD_LETTER_SCHEMA, {**record, "origin_offset": offset})

    messages = [Message(Origin("dlq", 0, 0), b"acme/x", letter(7)),
                Message(Origin("dlq", 0, 1), b"acme/x", letter(-1))]  # fmt: skip
    assert DlqSink(store, registry, clock=lambda: NOW).write(messages).inserted == 2
    rows = store.query_rows(
        "SELECT origin_topic, origin_offset, stage, reason_code, reason FROM vigil.dlq "
        "ORDER BY origin_topic"
    )
    assert rows == [
        ("dlq", 1, "dlq", "out_of_range", "origin_offset: -1 must not be negative"),
        ("raw", 7, "validate", "bad_magic", "payload: magic byte is 7"),
    ]


def test_a_letter_vigil_did_not_write_brings_no_pii_into_storage(
    store: ClickHouseStore, registry: Registry
) -> None:
    """The DLQ sink stores whatever is on the DLQ topic: a letter another producer wrote, its
    payload and reason never scrubbed, is scrubbed before it is stored. One of Vigil's own is
    stored as it was made."""
    made = dead_letter(b"contact jane.doe@example.com", b"acme/x", Origin("raw", 1, 7),
                       InvalidEvent("bad_magic", "from jane.doe@example.com"),
                       stage="validate", received_at=NOW)  # fmt: skip
    foreign = {**made, "origin_offset": 8, "dlq_id": "foreign",
               "payload": b"contact jane.doe@example.com", "reason": "from jane.doe@example.com"}  # fmt: skip
    messages = [Message(Origin("dlq", 0, i), b"acme/x", registry.encode(DEAD_LETTER_SCHEMA, r))
                for i, r in enumerate([made, foreign])]  # fmt: skip
    assert DlqSink(store, registry, clock=lambda: NOW).write(messages).inserted == 2
    rows = store.query_rows("SELECT payload, reason FROM vigil.dlq ORDER BY origin_offset")
    assert rows[0] == (made["payload"].decode(), made["reason"])
    assert rows[1] == rows[0]
    assert "jane.doe" not in str(rows)


def test_stored_keys_finds_any_key_and_asks_within_the_query_size(
    store: ClickHouseStore, registry: Registry, tmp_path: Path
) -> None:
    odd = ["a,b", "it's", "back\\slash", "nul\x00byte", "é€😀", "", "x" * 256]
    # 2.3 MB of keys in all, 4.6 MB as hex: keys take half a query, so three queries at least
    long_ones = [f"{i:04d}" + "€" * 252 for i in range(3000)]
    ids = odd + long_ones
    assert sum(2 * len(k.encode()) for k in ids) > MAX_QUERY_BYTES
    assert store.long_query() == (MAX_QUERY_BYTES, {"max_query_size": MAX_QUERY_BYTES})
    messages = _messages_with_ids(registry, [event_id for event_id in ids if event_id])
    assert LedgerSink(store, registry, clock=lambda: NOW).write(messages).inserted == len(ids) - 1
    asked = [*ids, "a", "b", "nul", "€", "missing"]
    found = stored_keys(store, "vigil.audit_log", "event_id", asked, "tenant_id = 'acme'")
    assert found == {event_id for event_id in ids if event_id}
    assert stored_keys(store, "vigil.audit_log", "event_id", asked, "tenant_id = 'other'") == set()

    # a store that may not raise max_query_size (the owner's endpoint takes no settings) is
    # asked at ClickHouse's default size, in some 35 queries here
    owner = OwnerServer(store, tmp_path / "home").start()
    try:
        remote = find_owner(tmp_path / "home")
        assert remote is not None and remote.long_query() == (DEFAULT_QUERY_BYTES, {})
        found = stored_keys(remote, "vigil.audit_log", "event_id", asked, "tenant_id = 'acme'")
        assert found == {event_id for event_id in ids if event_id}
    finally:
        owner.close()


@pytest.mark.parametrize(
    ("current", "maximum", "readonly", "allowed"),
    [
        (DEFAULT_QUERY_BYTES, None, 0, MAX_QUERY_BYTES),  # no constraint: raised
        (DEFAULT_QUERY_BYTES, "", 0, MAX_QUERY_BYTES),
        (DEFAULT_QUERY_BYTES, "1048576", 0, 1_048_576),  # up to the profile's constraint
        (DEFAULT_QUERY_BYTES, "1048576", 1, DEFAULT_QUERY_BYTES),  # may not be changed
        (8 * MAX_QUERY_BYTES, None, 0, 8 * MAX_QUERY_BYTES),  # never lowered
    ],
)
def test_the_duplicate_check_raises_the_query_size_only_as_far_as_allowed(
    current: int, maximum: str | None, readonly: int, allowed: int
) -> None:
    assert long_query_size(current, maximum, readonly) == allowed


def test_dedup_token_names_each_partition_range() -> None:
    msgs = [Message(Origin("t", p, o), None, b"") for p, o in [(1, 5), (0, 9), (1, 3), (0, 7)]]
    assert dedup_token(msgs) == "t:0:7-9,t:1:3-5"


def test_a_batch_of_long_ids_larger_than_one_query_can_carry(
    store: ClickHouseStore, registry: Registry
) -> None:
    """5,000 ids of 60 characters do not fit in one ClickHouse query at its default size
    (256 KiB)."""
    sink = LedgerSink(store, registry, clock=lambda: NOW)
    messages = [
        dataclasses.replace(m, value=registry.encode(
            EVENT_SCHEMA,
            event_to_avro(dataclasses.replace(
                event_from_avro(registry.decode(m.value, EVENT_SCHEMA)),
                event_id=f"run-20261122060610-2a60-{i:036d}",
            )),
        ))
        for i, m in enumerate(clean_messages(registry, range(5000), ts=NOW))
    ]  # fmt: skip
    assert sink.write(messages).inserted == 5000
    assert sink.write(messages).duplicates == 5000
    assert _stored(store) == (5000, 5000)


def test_a_repeat_is_found_within_the_dedup_window_of_its_ts(
    store: ClickHouseStore, registry: Registry
) -> None:
    """Repeats are looked up among stored events within the window of their own ts, in as many
    ranges of ts as a batch spreads over (more than MAX_TS_RANGES are joined)."""
    sink = LedgerSink(store, registry, clock=lambda: NOW, dedup_window=timedelta(minutes=10))
    spread = [(f"h-{h}", NOW - timedelta(hours=h)) for h in range(2 * MAX_TS_RANGES)]
    history = [("now", NOW), ("last-month", NOW - timedelta(days=30)), *spread]
    assert sink.write(_messages_at(registry, history)).inserted == len(history)

    # the whole history again, mixed with new events, in another order
    again = sink.write(_messages_at(registry, [("new-1", NOW), *reversed(history), ("new-2", NOW)]))
    assert (again.inserted, again.duplicates) == (2, len(history))
    assert {e.event_id for e in again.stored} == {"new-1", "new-2"}

    # an event rebuilt with a later ts by its client: a repeat within the window...
    late = sink.write(_messages_at(registry, [("now", NOW + timedelta(minutes=9, seconds=59))]))
    assert (late.inserted, late.duplicates) == (0, 1)
    # ...and, as documented, a new event beyond it
    beyond = sink.write(_messages_at(registry, [("now", NOW + timedelta(minutes=10, seconds=1))]))
    assert (beyond.inserted, beyond.duplicates) == (1, 0)
    assert _stored(store) == (len(history) + 3, len(history) + 2)


def test_a_batch_of_several_tenants_is_checked_in_one_query_each_tenant_within_its_own(
    store: ClickHouseStore, registry: Registry
) -> None:
    """Every tenant's keys in one duplicate check, yet an id stored by one tenant never hides
    another tenant's event with the same id."""
    batch = partial(tenant_messages, registry)
    recording = RecordingStore(store)
    sink = LedgerSink(recording, registry, clock=lambda: NOW)  # type: ignore[arg-type]
    first = [("acme", "e-1", NOW), ("globex", "e-2", NOW), ("initech", "e-3", NOW)]
    assert sink.write(batch(first)).inserted == 3

    recording.queries.clear()
    again = sink.write(batch([
        *first,  # all three repeats
        ("acme", "e-2", NOW), ("globex", "e-1", NOW),  # the ids of other tenants
        ("initech", "e-1", NOW - timedelta(hours=1)),  # acme's id, in another window
    ]))  # fmt: skip
    assert (again.inserted, again.duplicates) == (3, 3)
    assert {(e.tenant_id, e.event_id) for e in again.stored} == {
        ("acme", "e-2"),
        ("globex", "e-1"),
        ("initech", "e-1"),
    }
    checks = [q for q in recording.queries if "FROM vigil.audit_log WHERE" in q and " IN (" in q]
    assert len(checks) == 1, recording.queries
    assert _stored(store) == (6, 3)


def test_the_duplicate_check_counts_a_scope_condition_once_a_query() -> None:
    clauses = {"a": "x" * 96, "b": "y" * 46}  # 100 and 50 bytes with the " OR " that joins them
    a1, a2, b3, b4, b5 = keys = [("a", "k1"), ("a", "k2"), ("b", "k3"), ("b", "k4"), ("b", "k5")]
    # a hexed key takes 5 bytes: 100 + 2 * 5 + 50 + 3 * 5 = 175
    assert list(_scoped_chunks(keys, clauses, 175)) == [keys]
    assert list(_scoped_chunks(keys, clauses, 174)) == [[a1, a2, b3, b4], [b5]]
    assert list(_scoped_chunks(keys, clauses, 120)) == [[a1, a2], [b3, b4, b5]]
    # what does not fit in a query at all is asked alone
    assert list(_scoped_chunks(keys, clauses, 50)) == [[k] for k in keys]


def test_ts_ranges_merge_what_overlaps_and_join_the_closest_beyond_the_limit() -> None:
    assert ts_ranges([], 10) == []
    assert ts_ranges([100, 5, 115, 100], 10) == [(0, 15), (90, 125)]
    assert ts_ranges([1_000, 1_020], 10) == [(990, 1_030)]  # touching ranges merge
    # one more range than allowed, each 1,000 apart except one pair 500 apart: that pair joins
    times = [i * 1_000 for i in range(MAX_TS_RANGES)] + [MAX_TS_RANGES * 1_000 - 500]
    ranges = ts_ranges(times, 10)
    assert len(ranges) == MAX_TS_RANGES
    assert ranges[-1] == ((MAX_TS_RANGES - 1) * 1_000 - 10, MAX_TS_RANGES * 1_000 - 490)
    assert all(any(lo <= max(t - 10, 0) and t + 10 <= hi for lo, hi in ranges) for t in times)


def test_a_dead_letter_is_looked_for_among_the_letters_of_its_origin(
    store: ClickHouseStore, registry: Registry
) -> None:
    def letters(origins: list[Origin], received_at: datetime) -> list[Message]:
        return [
            Message(Origin("dlq", 0, i), None, registry.encode(DEAD_LETTER_SCHEMA, dead_letter(
                b"\x07", None, origin, InvalidEvent("bad_magic", "payload: magic byte is 7"),
                stage="validate", received_at=received_at,
            )))
            for i, origin in enumerate(origins)
        ]  # fmt: skip

    sink = DlqSink(store, registry, clock=lambda: NOW)
    first = [Origin("raw", p, offset) for p in (0, 1) for offset in range(100, 200, 10)]
    assert sink.write(letters(first, NOW)).inserted == 20
    # validated again after a crash, hours later: the same places, cut together with new ones
    again = [*first[5:], Origin("raw", 0, 500), Origin("raw", 2, 100)]
    result = sink.write(letters(again, NOW + timedelta(hours=3)))
    assert (result.inserted, result.duplicates) == (2, 15)
    assert store.query_rows("SELECT count(), uniqExact(dlq_id) FROM vigil.dlq") == [(22, 22)]
    # the lookup skips the granules of other offsets through the migration's index
    where = origin_condition([("raw", 0, 150), ("raw", 0, 500), ("raw", 2, 100)])
    assert where.count(" OR ") == 1 and "origin_offset BETWEEN 150 AND 500" in where
    plan = "\n".join(
        str(r[0])
        for r in store.query_rows(f"EXPLAIN indexes = 1 SELECT 1 FROM vigil.dlq WHERE {where}")
    )
    assert "idx_origin_offset" in plan


MONTHS = (NOW, NOW - timedelta(days=31))  # the ledger's partitions: November, October


def _three_tenants(prefix: str, n: int) -> list[tuple[str, str, datetime]]:
    """``n`` events each of three tenants, in November and October by turns."""
    tenants = ("acme", "globex", "initech")
    return [(t, f"{prefix}-{t}-{i}", MONTHS[i % 2]) for i in range(n) for t in tenants]


class _LandsOneMonth(RecordingStore):
    """The real store, whose next ledger insert (once ``armed``) lands only the rows of
    ``month`` (YYYYMM) and then fails: ClickHouse writes an insert one partition (a month) at a
    time, so a server that fails midway, or a connection lost after part of it, leaves some of
    them stored."""

    def __init__(self, store: ClickHouseStore, month: int, *, armed: bool = True) -> None:
        super().__init__(store)
        self.month = month
        self.armed = armed

    def insert(self, table: str, rows: Any, columns: Any, dedup_token: str) -> None:
        if not self.armed or table != LedgerSink.table:
            return super().insert(table, rows, columns, dedup_token)
        self.armed = False
        landed = [r for r in rows if chain_of(r).month == self.month]
        super().insert(table, landed, columns, dedup_token)
        raise StoreError("connection lost after the first partition was written")


def test_a_retry_stores_what_an_insert_that_failed_halfway_left_out(
    store: ClickHouseStore, registry: Registry
) -> None:
    """The retry carries the same dedup token but only the rows not stored yet, all in
    partitions the first attempt did not write: ClickHouse takes them (its token is bound to a
    partition) rather than dropping them as a repeat, which would lose them for good once the
    offsets are committed."""
    events = _three_tenants("h", 4)
    failing = _LandsOneMonth(store, 202610)
    sink = LedgerSink(failing, registry, clock=lambda: NOW)  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        sink.write(tenant_messages(registry, events))
    assert _stored(store) == (6, 6)  # October's partition landed

    retried = sink.write(tenant_messages(registry, events))  # the same batch, the same token
    assert (retried.inserted, retried.duplicates) == (6, 6)
    assert {(e.tenant_id, e.event_id) for e in retried.stored} == {
        (t, e) for t, e, ts in events if ts.month == 11
    }
    assert _stored(store) == (12, 12)
    verdict = verify(store, Retention(), now=NOW)
    assert verdict.ok and verdict.chains == 6, verdict.line()


def _heads_queries(recording: RecordingStore) -> list[str]:
    return [q for q in recording.queries if "argMax(row_hash, chain_seq)" in q]


def test_a_writer_holding_its_partitions_reads_each_chain_head_once(
    store: ClickHouseStore, registry: Registry
) -> None:
    """Within one consumer generation the chains continue from the writer's own last insert;
    only a chain it has not written yet in it is looked up."""
    recording = RecordingStore(store)
    sink = LedgerSink(recording, registry, clock=lambda: NOW)  # type: ignore[arg-type]
    sink.write(tenant_messages(registry, _three_tenants("a", 4)), held=7)
    assert len(_heads_queries(recording)) == 1 and len(sink.ends) == 6

    recording.queries.clear()
    sink.write(tenant_messages(registry, _three_tenants("b", 4), first=12), held=7)
    assert _heads_queries(recording) == []

    recording.queries.clear()
    more = [*_three_tenants("c", 2), ("umbrella", "c-umbrella", NOW)]
    sink.write(tenant_messages(registry, more, first=24), held=7)
    (asked,) = _heads_queries(recording)
    assert "'umbrella'" in asked and "'acme'" not in asked
    verdict = verify(store, Retention(), now=NOW)
    assert verdict.ok and (verdict.rows, verdict.chains) == (31, 7), verdict.line()


def test_chain_ends_are_read_again_in_a_new_generation_and_after_a_failed_write(
    store: ClickHouseStore, registry: Registry
) -> None:
    """What the writer remembers is dropped when its generation changes (another worker may
    have written the partitions meanwhile) and when a write fails (the insert may have stored
    some chains' rows): either way its next batch would otherwise fork chains."""
    failing = _LandsOneMonth(store, 202610, armed=False)
    sink = LedgerSink(failing, registry, clock=lambda: NOW)  # type: ignore[arg-type]
    sink.write(tenant_messages(registry, _three_tenants("a", 3)), held=1)
    # the partition was another worker's for a generation, which extended every chain
    other = LedgerSink(store, registry, clock=lambda: NOW)
    other.write(tenant_messages(registry, _three_tenants("b", 3), first=9), held=1)
    sink.write(tenant_messages(registry, _three_tenants("c", 3), first=18), held=2)
    verdict = verify(store, Retention(), now=NOW)
    assert verdict.ok and verdict.rows == 27, verdict.line()

    failing.armed = True
    halfway = tenant_messages(registry, _three_tenants("d", 3), first=27)
    with pytest.raises(StoreError):
        sink.write(halfway, held=2)  # October's rows landed: its chains moved on
    assert sink.write(halfway, held=2).inserted == 6
    sink.write(tenant_messages(registry, _three_tenants("e", 3), first=36), held=2)
    verdict = verify(store, Retention(), now=NOW)
    assert verdict.ok and (verdict.rows, verdict.chains) == (45, 6), verdict.line()


def test_a_writer_silent_past_its_session_timeout_reads_its_chain_ends_again(
    store: ClickHouseStore, registry: Registry
) -> None:
    """A worker frozen for longer than its session timeout (a long pause, a starved VM) has
    lost its partitions to another worker, which extended the chains, and learns of it only
    later: in the same generation as far as it knows, its next batch follows the new owner's
    heads rather than the ones it remembers."""
    now = [0.0]
    sink = LedgerSink(store, registry, clock=lambda: NOW)
    sink.ends = ChainEnds(store, remember_seconds=10.0, clock=lambda: now[0])
    sink.write(tenant_messages(registry, _three_tenants("a", 2)), held=1)
    now[0] += 9.0  # within the session: what it remembers is still all there is
    sink.write(tenant_messages(registry, _three_tenants("b", 2), first=6), held=1)
    assert len(sink.ends) == 6

    other = LedgerSink(store, registry, clock=lambda: NOW)  # the new owner, meanwhile
    other.write(tenant_messages(registry, _three_tenants("c", 2), first=12))
    now[0] += 10.5
    sink.write(tenant_messages(registry, _three_tenants("d", 2), first=18), held=1)
    verdict = verify(store, Retention(), now=NOW)
    assert verdict.ok and (verdict.rows, verdict.chains) == (24, 6), verdict.line()
