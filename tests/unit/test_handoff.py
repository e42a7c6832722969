"""The hand-off from validate to the ledger: what it holds is what decoding would give."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.config import load_config
from pipeline.enrich import enrich
from pipeline.events import Event, Interaction, event_from_avro
from pipeline.handoff import HandOff, wait_for_room
from pipeline.ledger import CHAINED_COLUMNS, row_hash
from pipeline.rows import Origin, audit_row
from pipeline.validate import Limits, route
from tests import pii_samples

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def test_the_events_validate_hands_over_give_the_rows_their_bytes_decode_to() -> None:
    registry = Registry.load()
    config = load_config(ROOT / "vigil.yaml", {})

    def enrich_with(event: Event) -> Event:
        return enrich(event, config.catalog, config.agents)

    handoff = HandOff()
    published = []
    for i, raw in enumerate(pii_samples.raw_workload(registry, NOW)):
        routed = route(raw, None, Origin("raw", 0, i), registry, Limits(), NOW,
                       config.policy_for, enrich_with)  # fmt: skip
        assert routed.event is not None, routed.reason_code
        published.append((routed.value, routed.event))
    handoff.put(published)

    origin, stored_at = Origin("clean", 3, 77), NOW + timedelta(seconds=2)
    for value, built in published:
        decoded = event_from_avro(registry.decode(value, EVENT_SCHEMA))
        handed = handoff.take(value)
        assert handed is built and handed == decoded
        row = audit_row(handed, origin, stored_at)
        assert row == audit_row(decoded, origin, stored_at)
        chained = (*row, 1, "0" * 64)
        assert len(chained) == len(CHAINED_COLUMNS)
        assert row_hash(chained) == row_hash((*audit_row(decoded, origin, stored_at), 1, "0" * 64))
    # the workload reached every part of the event that redact and enrich change
    built_events = [e for _, e in published]
    assert sum(1 for e in built_events if e.redactions) == 80
    assert {e.enrichment.cost_status for e in built_events if e.enrichment} >= {"priced"}
    assert any(e.enrichment.cost_usd for e in built_events if e.enrichment)
    assert handoff.taken == len(published) and handoff.missed == 0 and len(handoff) == 0


def _event(i: int) -> Event:
    return Event(f"e-{i}", "interaction", NOW, "acme", "bot", Interaction("openai", "gpt-4o"))


def test_an_event_is_taken_once_and_what_was_not_held_is_missed() -> None:
    handoff = HandOff()
    handoff.put([(b"one", _event(1)), (b"two", _event(2))])
    assert handoff.take(b"two") == _event(2)
    assert handoff.take(b"two") is None  # once
    assert handoff.take(b"three") is None
    assert (handoff.taken, handoff.missed, len(handoff)) == (1, 2, 1)


def test_beyond_its_limits_it_holds_the_oldest_events_which_the_ledger_reads_next() -> None:
    by_count = HandOff(max_events=3)
    by_count.put([(f"e{i}".encode(), _event(i)) for i in range(5)])
    assert [by_count.take(f"e{i}".encode()) is not None for i in range(5)] == [
        True, True, True, False, False,
    ]  # fmt: skip
    by_count.put([(b"later", _event(9))])  # what was taken made room
    assert by_count.take(b"later") == _event(9)

    by_bytes = HandOff(max_bytes=100)
    by_bytes.put([(b"a" * 60, _event(1)), (b"b" * 60, _event(2))])
    by_bytes.put([(b"c" * 40, _event(3))])
    assert len(by_bytes) == 2 and by_bytes.take(b"b" * 60) is None
    assert by_bytes.take(b"a" * 60) == _event(1) and by_bytes.take(b"c" * 40) == _event(3)
    by_bytes.put([(b"d" * 100, _event(4))])  # taking gave the bytes back
    assert by_bytes.take(b"d" * 100) == _event(4)


def test_what_no_ledger_takes_is_dropped_after_its_time() -> None:
    now = [0.0]
    handoff = HandOff(max_events=2, max_age=30.0, clock=lambda: now[0])
    handoff.put([(b"other-workers-1", _event(1)), (b"other-workers-2", _event(2))])
    now[0] = 20.0
    handoff.put([(b"mine", _event(3))])  # full: not held
    assert handoff.take(b"mine") is None
    now[0] = 31.0
    handoff.put([(b"mine", _event(3)), (b"again", _event(4))])
    assert len(handoff) == 2 and handoff.take(b"other-workers-1") is None
    assert handoff.take(b"mine") == _event(3) and handoff.take(b"again") == _event(4)


def test_the_same_bytes_are_held_once() -> None:
    handoff = HandOff(max_bytes=10)
    handoff.put([(b"12345", _event(1)), (b"12345", _event(1)), (b"67890", _event(2))])
    assert len(handoff) == 2
    assert handoff.take(b"12345") == _event(1) and handoff.take(b"12345") is None


def test_validate_waits_for_room_only_while_the_ledger_is_taking_events() -> None:
    now = [0.0]
    handoff = HandOff(max_events=10, max_bytes=1000, clock=lambda: now[0])
    handoff.put([(f"e{i}".encode(), _event(i)) for i in range(10)])
    assert not handoff.waits(1, 2)  # full, but no ledger has taken anything: nothing to wait for
    assert handoff.take(b"missing") is None
    assert not handoff.waits(1, 2)  # a miss is not taking (a retried insert finds its events gone)
    assert handoff.take(b"e0") == _event(0)  # the ledger takes, at 0 s
    assert not handoff.waits(1, 2)  # room for one
    assert handoff.waits(2, 4)  # not for two
    assert handoff.waits(1, 999)  # nor for that many bytes
    now[0] = 4.9
    assert handoff.waits(2, 4)
    now[0] = 5.1  # the ledger took nothing for PATIENCE_SECONDS: it is not taking these
    assert not handoff.waits(2, 4)
    assert handoff.take(b"e1") == _event(1)
    assert handoff.waits(3, 6)  # taking again
    assert not HandOff(clock=lambda: now[0]).waits(10**6, 10**9)  # empty: never waits


def test_wait_for_room_returns_once_the_ledger_has_made_it() -> None:
    handoff = HandOff(max_events=4)
    handoff.put([(f"e{i}".encode(), _event(i)) for i in range(4)])
    assert handoff.take(b"e0") is not None

    async def validate_then_ledger() -> tuple[bool, float]:
        start = time.monotonic()
        waiting = asyncio.create_task(wait_for_room(handoff, 2, 4))
        await asyncio.sleep(0.2)
        still_waiting = not waiting.done()
        threading.Thread(target=handoff.take, args=(b"e1",)).start()  # the ledger's thread
        await asyncio.wait_for(waiting, 2.0)
        return still_waiting, time.monotonic() - start

    still_waiting, waited = asyncio.run(validate_then_ledger())
    assert still_waiting and 0.2 <= waited < 2.0


def test_events_another_workers_ledger_reads_do_not_fill_it_while_validate_waits() -> None:
    """Two workers of the ``all`` role share a ClickHouse server: half of what one validates
    goes to clean partitions the other's ledger reads. Its own ledger takes its half, one batch
    behind; the other half is dropped once the ledger has taken events put after it, so it never
    fills the hand-off and validate never waits on it."""
    now = [0.0]
    handoff = HandOff(max_events=20, max_age=30.0, passed=2.0, clock=lambda: now[0])
    batches = [[(f"{who}{k}-{i}".encode(), _event(i)) for who in ("mine", "theirs") for i in
                range(2)] for k in range(40)]  # fmt: skip
    for k, batch in enumerate(batches):
        now[0] = k * 0.5
        assert not handoff.waits(len(batch), 4 * len(batch)), f"batch {k} waits"
        handoff.put(batch)
        if k:  # the ledger takes its own events of the batch before
            assert [handoff.take(f"mine{k - 1}-{i}".encode()) for i in range(2)] == [
                _event(0), _event(1)]  # fmt: skip
    assert handoff.missed == 0 and handoff.take(b"theirs0-0") is None
    assert len(handoff) == 16  # theirs of the last 3 s (7 batches), and the last batch's own
