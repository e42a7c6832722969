"""The audit trail read from the real engine: a user's events and every evaluation and decision
about them, in time order, counted and costed as they are read."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from pipeline import trail
from pipeline.codec import Registry
from pipeline.config import load_config
from pipeline.enrich import enrich
from pipeline.events import Actor, Decision, Eval, Event, Interaction
from pipeline.rows import Origin
from pipeline.sink import LedgerSink, Message
from pipeline.store import ClickHouseStore
from pipeline.trail import Selector, render

pytestmark = pytest.mark.integration
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
CONFIG = load_config(None, {})


def _interaction(event_id: str, tenant: str, user: str, at: timedelta, tokens: int) -> Event:
    return Event(
        event_id=event_id,
        kind="interaction",
        ts=T0 + at,
        tenant_id=tenant,
        agent_id="support-bot",
        trace_id=f"trace-{event_id}",
        actor=Actor(user, "customer"),
        body=Interaction("openai", "gpt-4o", input_tokens=tokens, output_tokens=tokens // 10,
                         input_text=f"question {event_id}", output_text="answer"),
    )  # fmt: skip


def _about(event_id: str, kind: str, subject: str, reviewer: str, at: timedelta) -> Event:
    body = (
        Decision(subject, "approved", reviewer, "fine")
        if kind == "decision"
        else Eval("faithfulness", 0.5, 0.8, "online", subject_event_id=subject)
    )
    return Event(event_id=event_id, kind=kind, ts=T0 + at, tenant_id="acme",
                 agent_id="judge", trace_id=f"trace-{event_id}", body=body)  # fmt: skip


def _store(store: ClickHouseStore, registry: Registry, events: list[Event], at: datetime) -> None:
    sink = LedgerSink(store, registry, clock=lambda: at)
    enriched = [enrich(e, CONFIG.catalog, CONFIG.agents) for e in events]
    sink.write([
        Message(Origin("clean", 0, i), f"{e.tenant_id}/{e.agent_id}".encode(),
                registry.encode_event(e))
        for i, e in enumerate(enriched, int(at.timestamp()))
    ])  # fmt: skip


def _ids(store: ClickHouseStore, selector: Selector) -> list[str]:
    return [r["event_id"] for r in trail.trail(store, selector)[1]]


def test_a_users_trail_is_their_events_and_what_was_decided_about_them_in_time_order(
    store: ClickHouseStore, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = [
        _interaction("ana-2", "acme", "ana", timedelta(minutes=2), 900),
        _interaction("ana-1", "acme", "ana", timedelta(minutes=1), 400),
        _interaction("ana-3", "globex", "ana", timedelta(days=1, minutes=3), 100),
        _interaction("bo-1", "acme", "bo", timedelta(minutes=1), 50),  # someone else's
        # about ana's first: an evaluation and a decision recorded in traces of their own, the
        # decision at the very millisecond of what it decides
        _about("eval-1", "eval", "ana-1", "", timedelta(minutes=4)),
        _about("a-review", "decision", "ana-1", "rev-9", timedelta(minutes=1)),
        _about("dec-bo", "decision", "bo-1", "rev-9", timedelta(minutes=5)),  # about bo's
        # ana reviews bo's: a decision she made is in her trail
        _about("dec-ana", "decision", "bo-1", "ana", timedelta(minutes=6)),
    ]
    _store(store, registry, events, T0 + timedelta(hours=1))
    ana = Selector("user", "ana")

    about, records = trail.trail(store, ana)
    read = list(records)

    monkeypatch.setattr(trail, "TRAIL_RUN", 2)  # sorted in runs of two, spilled and merged
    assert trail.trail(store, ana)[0] == about and list(trail.trail(store, ana)[1]) == read

    assert [r["event_id"] for r in read] == ["ana-1", "a-review", "ana-2", "eval-1", "dec-ana",
                                             "ana-3"]  # fmt: skip
    assert read[0]["ts"] == T0 + timedelta(minutes=1) and read[0]["input_tokens"] == 400
    assert about is not None
    assert (about.events, about.tenants) == (6, ("acme", "globex"))
    assert (about.first, about.last) == (
        T0 + timedelta(minutes=1),
        T0 + timedelta(days=1, minutes=3),
    )
    costs = [Decimal(r["cost_usd"]) for r in read if r["cost_usd"] is not None]
    assert len(costs) == 3 and about.cost == sum(costs) > 0  # the three interactions, priced
    text = "".join(render(ana, about, read))
    lines = text.splitlines()
    assert lines[0] == (
        f"Trail of user ana: tenant acme, globex, 6 events, 2026-11-20 09:01:00 to 2026-11-21 "
        f"09:03:00 UTC, cost ${about.cost:.6f}"
    )  # the last event on another day: its date
    assert lines[1].startswith("  09:01:00.000  interaction  support-bot")
    assert lines[-4:-1] == [
        "  2026-11-21",
        "  09:03:00.000  interaction  support-bot  gpt-4o chat  100 in / 10 out tokens  "
        f"${Decimal(read[-1]['cost_usd']):.6f}  ok",
        "                input from ana: question ana-3",
    ]
    assert "APPROVED by ana on bo-1" in text and "input from ana: question ana-1" in text
    assert "bo-1" not in [r["event_id"] for r in read]
    # one tenant's trail of the user
    assert _ids(store, Selector("user", "ana", "globex")) == ["ana-3"]
    nobody = Selector("user", "nobody")
    about, records = trail.trail(store, nobody)
    assert about is None and list(records) == []
    assert list(render(nobody, about, records)) == ["No events for user nobody.\n"]


def test_a_trail_is_read_whole_before_it_is_given(
    store: ClickHouseStore, registry: Registry
) -> None:
    """The summary is counted from the rows listed, all read before the first is given: the
    store is free while the trail is written out, a reader that stops early (stdout closed
    under `| head`) leaves nothing open, and events stored meanwhile are in neither."""
    events = [_interaction(f"ana-{i}", "acme", "ana", timedelta(seconds=i), 10) for i in range(50)]
    _store(store, registry, events, T0 + timedelta(hours=1))
    about, records = trail.trail(store, Selector("user", "ana"))
    assert about is not None and about.events == 50
    later = [_interaction("ana-x", "acme", "ana", timedelta(seconds=-1), 10)]  # before them all
    _store(store, registry, later, T0 + timedelta(hours=2))
    assert next(records)["event_id"] == "ana-0"
    records.close()
    assert store.query_rows("SELECT count() FROM vigil.audit_log") == [(51,)]
    assert _ids(store, Selector("user", "ana"))[:2] == ["ana-x", "ana-0"]


def test_decisions_about_a_selected_event_are_found_in_any_trace(
    store: ClickHouseStore, registry: Registry
) -> None:
    """A trace's trail takes the decision recorded outside it, and not another tenant's event
    of the same id."""
    mine = _interaction("x-1", "acme", "ana", timedelta(minutes=1), 10)
    other = dataclasses.replace(mine, tenant_id="globex", trace_id="trace-other")
    review = _about("dec-1", "decision", "x-1", "rev-9", timedelta(minutes=2))
    _store(store, registry, [mine, other, review], T0 + timedelta(hours=1))
    trace = Selector("trace", "trace-x-1")
    assert [(r["tenant_id"], r["event_id"]) for r in trail.trail(store, trace)[1]] == [
        ("acme", "x-1"), ("acme", "dec-1")
    ]  # fmt: skip


def test_a_trails_heading_counts_what_has_no_price(
    store: ClickHouseStore, registry: Registry
) -> None:
    """Its cost is what was priced; an interaction of a model the catalog does not know adds
    nothing to it, and the heading says how many such there are."""
    priced = _interaction("p-1", "acme", "ana", timedelta(minutes=1), 1000)
    unknown = dataclasses.replace(
        _interaction("u-1", "acme", "ana", timedelta(minutes=2), 1000),
        body=Interaction("openai", "no-such-model", input_tokens=1000, output_tokens=100),
    )
    _store(store, registry, [priced, unknown], T0 + timedelta(hours=1))
    ana = Selector("user", "ana")
    about, records = trail.trail(store, ana)
    read = list(records)
    assert about is not None and about.unpriced == 1
    assert about.cost == Decimal(read[0]["cost_usd"]) > 0 and read[1]["cost_usd"] is None
    heading = next(render(ana, about, read))
    assert heading.endswith(f"cost ${about.cost:.6f} (1 unpriced)\n")
    assert "cost unknown_model" in "".join(render(ana, about, read))
