"""Alerts with several store workers: clean is keyed by tenant, and each worker's alert state
is rebuilt from the ledger, for the tenants of the clean partitions it holds, at every
assignment (``pipeline.alerting.HeldAlerts``). On the real broker and engine."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
import pytest

from pipeline.alerting import (
    ALERT_COLUMNS,
    ALERT_TABLE,
    CAUGHT_UP_COLUMNS,
    CAUGHT_UP_TABLE,
    Superseded,
    alert_row,
    ledger_history,
    lookback,
    replay_ledger,
    stored_history,
    unraised,
)
from pipeline.alerts import (
    AlertRules,
    Budget,
    DriftMonitor,
    DriftWatch,
    EvalRule,
    Evaluator,
    as_stored,
    backtest,
)
from pipeline.codec import Registry
from pipeline.config import load_config
from pipeline.events import Cost, Decision, Drift, Enrichment, Eval, Event, Interaction
from pipeline.ledger import Retention, verify
from pipeline.producer import KafkaSender
from pipeline.rows import Origin
from pipeline.settings import Settings
from pipeline.sink import LedgerSink, Message
from pipeline.store import ClickHouseStore
from pipeline.topics import ensure_topics
from pipeline.validate import clean_key
from pipeline.worker import build_app
from tests.conftest import ROOT
from tests.integration.conftest import (
    SharedServer,
    alert_states_rebuilt,
    count,
    member_settings,
    two_halves,
    until,
)

pytestmark = pytest.mark.integration

_ids = iter(range(10**9))


def _spend(tenant: str, usd: float, ts: datetime, agent: str = "bot") -> Event:
    return Event(
        event_id=f"s-{next(_ids)}", kind="cost", ts=ts, tenant_id=tenant, agent_id=agent,
        body=Cost(usd), enrichment=Enrichment("non_token", f"{usd:.2f}"),
    )  # fmt: skip


def _store(
    store: ClickHouseStore, stored: Iterable[tuple[int, Event]], at: datetime | None = None
) -> None:
    """Write (clean partition, event) pairs through the ledger sink (``at``: when)."""
    registry = Registry.load()
    messages = [
        Message(Origin("vigil.events.clean", p, next(_ids)), clean_key(e), registry.encode_event(e))
        for p, e in stored
    ]
    ledger = LedgerSink(store, registry, clock=None if at is None else lambda: at)
    assert ledger.write(messages).inserted == len(messages)


def _poor_scores_before(hour: datetime) -> list[Event]:
    """acme's bot scored 0.3 five times in the five minutes before ``hour``, in time order."""
    return [
        Event(event_id=f"n-{next(_ids)}", kind="eval", ts=hour - timedelta(minutes=m),
              tenant_id="acme", agent_id="bot", body=Eval("faithfulness", 0.3),
              enrichment=Enrichment("stored", None))
        for m in range(5, 0, -1)
    ]  # fmt: skip


def _spent(evaluator: Evaluator) -> dict[str, float]:
    return {w.budget.tenant: w.state.spent for w in evaluator.budgets}


def _spend_of_many_agents(store: ClickHouseStore, now: datetime) -> AlertRules:
    """Store a cent of acme's spend by each of 2,500 agents, over clean's four partitions: the
    replay of acme's budget reads 2,500 rows. Returns that budget's rules."""
    _store(store, [(k % 4, _spend("acme", 0.01, now, agent=f"agent-{k}")) for k in range(2500)])
    return AlertRules(budgets=(Budget("acme", "month", 100.0),))


def _stop_at_second_look() -> Callable[[], bool]:
    """A rebuild's ``superseded`` that says stop the second time it is asked: after the first
    thousand events replayed (it is asked once before the ledger is read)."""
    looks: list[int] = []

    def superseded() -> bool:
        looks.append(1)
        return len(looks) == 2

    return superseded


def _held(watch: DriftWatch) -> dict[datetime, tuple[int, list[str]]]:
    """A drift monitor's samples, by stretch of time: how many, and those kept (in any order:
    the ledger orders the events of one instant as it likes)."""
    return {at: (s.seen, sorted(map(str, s.kept))) for at, s in watch.stretches.items()}


def test_the_state_of_some_partitions_has_the_whole_history_of_their_tenants(
    store: ClickHouseStore,
) -> None:
    """acme's events are in partitions 0 (stored before clean was keyed by tenant) and 1,
    globex's in 2: whoever holds a partition with a tenant's events replays all of them."""
    now = datetime.now(UTC)
    _store(store, [(0, _spend("acme", 3.0, now)), (1, _spend("acme", 2.0, now)),
                   (2, _spend("globex", 4.0, now))])  # fmt: skip
    rules = AlertRules(budgets=(Budget("acme", "month", 10.0), Budget("globex", "month", 10.0)))

    def spent(partitions: set[int] | None) -> dict[str, float]:
        return _spent(replay_ledger(store, rules, now, partitions).evaluator)

    assert spent({1}) == {"acme": 5.0, "globex": 0.0}
    assert spent({2, 3}) == {"acme": 0.0, "globex": 4.0}
    assert spent(set()) == {"acme": 0.0, "globex": 0.0}
    assert spent(None) == {"acme": 5.0, "globex": 4.0}


def test_a_rebuilt_state_has_each_tenants_trailing_day_for_the_spend_anomaly(
    store: ClickHouseStore,
) -> None:
    """With no budget, drift or eval rule, a rebuild still replays the day the spend anomaly
    compares an hour with: without it (checked), a worker was blind to anomalies for 12 hours
    after every start."""
    now = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    _store(store, [(0, _spend("acme", 1.0, now - timedelta(hours=h))) for h in range(1, 21)])
    evaluator = replay_ledger(store, AlertRules(), now, {0}).evaluator
    fired = evaluator.observe(_spend("acme", 10.0, now))
    assert [(a.kind, a.scope["tenant"]) for a in fired] == [("spend_anomaly", "acme")]


def test_the_spend_is_replayed_an_hour_of_an_agent_a_row_and_judged_as_its_events(
    store: ClickHouseStore,
) -> None:
    """Three days of spend of two tenants, their agents and teams, 2,400 events: the rebuild
    reads it as one cost an hour of an agent, and its budgets and spend anomaly stand where an
    evaluator fed every event stands: spent, buckets, levels and forecast fired, anomalous
    hours. The replay's Python grows with the hours, not the events."""
    rng = random.Random(7)
    now = datetime.now(UTC).replace(minute=50, second=0, microsecond=0)
    agents = [("acme", "bot", "support"), ("acme", "refunds", "payments"),
              ("globex", "triage", None)]  # fmt: skip
    events = []
    for k in range(2400):
        tenant, agent, team = agents[k % 3]
        ts = now - timedelta(minutes=rng.randrange(72 * 60))
        usd = round(rng.uniform(0.01, 2.0), 2)
        if k % 97 == 0 and ts > now - timedelta(hours=2):
            usd = 400.0  # an anomalous hour
        events.append(dataclasses.replace(
            _spend(tenant, usd, ts, agent),
            enrichment=Enrichment("non_token", f"{usd:.2f}", team=team),
        ))  # fmt: skip
    _store(store, [(0, e) for e in events])
    rules = AlertRules(budgets=(
        Budget("acme", "day", 150.0), Budget("acme", "month", 1000.0, team="payments"),
        Budget("globex", "week", 900.0, agent="triage"),
    ))  # fmt: skip
    replayed = list(stored_history(store, rules, now))
    assert len(replayed) <= 72 * 3 + 3 < len(events) / 10
    rebuilt = replay_ledger(store, rules, now).evaluator
    fed = Evaluator(rules)
    for event in sorted(events, key=lambda e: e.ts):
        if event.ts >= lookback(rules, now):
            fed.observe(event)
    for ours, theirs in zip(rebuilt.budgets, fed.budgets, strict=True):
        mine, other = ours.state, theirs.state
        assert mine.period_start == other.period_start
        assert mine.spent == pytest.approx(other.spent)
        assert mine.buckets == pytest.approx(other.buckets)
        assert (mine.levels_fired, mine.forecast_fired) == (
            other.levels_fired,
            other.forecast_fired,
        )
    assert rebuilt.anomaly.fired == fed.anomaly.fired
    assert {t: pytest.approx(h) for t, h in rebuilt.anomaly.hours.items()} == fed.anomaly.hours


def test_a_rebuild_no_longer_wanted_stops_between_events(store: ClickHouseStore) -> None:
    """2,500 agents' spend, replayed a row each: told to stop at its second look, the replay
    stops after a thousand events; told at its first, before reading the ledger."""
    now = datetime.now(UTC)
    rules = _spend_of_many_agents(store, now)
    with pytest.raises(Superseded, match="after 1000 events"):
        replay_ledger(store, rules, now, {0}, _stop_at_second_look())
    with pytest.raises(Superseded, match="before the ledger was read"):
        replay_ledger(store, rules, now, {0}, lambda: True)
    whole = replay_ledger(store, rules, now, {0}, lambda: False).evaluator
    assert _spent(whole) == {"acme": pytest.approx(25.0)}


def test_a_replay_given_up_while_its_samples_stream_lets_the_store_go(
    store: ClickHouseStore,
) -> None:
    """The drift samples are streamed from the ledger (a busy agent's day is millions of
    rows), which holds the store while they come. A replay given up half-way lets the store go:
    another thread's query is answered."""
    now = datetime.now(UTC)
    answers = [
        Event(event_id=f"a-{next(_ids)}", kind="interaction", ts=now - timedelta(seconds=k),
              tenant_id="acme", agent_id="support-bot", body=Interaction("openai", "gpt-4o",
              output_tokens=100 + k % 50), enrichment=Enrichment("stored", None))
        for k in range(2500)
    ]  # fmt: skip
    _store(store, [(0, e) for e in answers])
    rules = AlertRules(drift=(DriftMonitor("output_tokens", "ks", 0.3, timedelta(minutes=15),
                                           timedelta(hours=1), agent="support-bot"),))  # fmt: skip
    with pytest.raises(Superseded, match="after 1000 events"):
        replay_ledger(store, rules, now, None, _stop_at_second_look())
    answered: list[Any] = []
    other = threading.Thread(target=lambda: answered.append(store.query_rows("SELECT 7")))
    other.start()
    other.join(10)
    assert answered == [[(7,)]]


def test_each_drift_and_eval_rule_replays_only_what_it_reads(store: ClickHouseStore) -> None:
    """13 hours of three agents' interactions, evals and a drift metric. A drift monitor of
    support-bot's output tokens (15-minute windows, an hour's baseline) replays support-bot's
    interactions of the last hour and a half, not every agent's of the eval rule's 12.5 hours
    (before: 1,170 interactions where it reads 45); and the rebuilt monitors, fed the same next
    hour, fire what monitors fed every stored event fire."""
    rng = random.Random(11)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    agents = ("support-bot", "triage", "refunds")

    def event(kind: str, agent: str, ts: datetime, body: Any) -> Event:
        return Event(event_id=f"h-{next(_ids)}", kind=kind, ts=ts, tenant_id="acme",
                     agent_id=agent, body=body, enrichment=Enrichment("stored", None))  # fmt: skip

    def interaction(agent: str, ts: datetime, tokens: int) -> Event:
        return event(
            "interaction", agent, ts, Interaction("openai", "gpt-4o", output_tokens=tokens)
        )

    stored = []
    for k in range(390):  # every 2 minutes for 13 hours
        ts = now - timedelta(minutes=2 * k + 1)
        for agent in agents:
            stored.append(interaction(agent, ts, rng.randrange(100, 400)))
            if k % 5 == 0:
                stored.append(event("eval", agent, ts, Eval("faithfulness", rng.uniform(0.8, 1))))
                stored.append(event("drift", agent, ts, Drift("tone", category=rng.choice("ab"))))
    _store(store, [(0, e) for e in stored])
    rules = AlertRules(
        drift=(
            DriftMonitor("output_tokens", "ks", 0.45, timedelta(minutes=15), timedelta(hours=1),
                         agent="support-bot", min_samples=15),
            DriftMonitor("tone", "js", 0.2, timedelta(hours=1), timedelta(hours=3), min_samples=5),
        ),
        evals=(EvalRule("faithfulness", 0.75, timedelta(minutes=30)),),
    )  # fmt: skip
    read = [e for e in stored_history(store, rules, now) if e.kind != "cost"]
    since = {"interaction": now - timedelta(minutes=90), "drift": now - timedelta(hours=5),
             "eval": now - timedelta(hours=12, minutes=30)}  # fmt: skip
    wanted = [e for e in stored if e.ts >= since[e.kind]
              and (e.kind != "interaction" or e.agent_id == "support-bot")]  # fmt: skip
    assert sorted(e.event_id for e in read) == sorted(e.event_id for e in wanted)
    assert sum(e.kind == "interaction" for e in read) == 45

    rebuilt, fed = replay_ledger(store, rules, now).evaluator, Evaluator(rules)
    for e in sorted(stored, key=lambda e: e.ts):
        if e.ts >= lookback(rules, now):
            fed.observe(e)
    for ours, theirs in zip(rebuilt.drift, fed.drift, strict=True):
        assert (_held(ours), ours.window_start) == (_held(theirs), theirs.window_start)
    ((ours, theirs),) = zip(rebuilt.evals, fed.evals, strict=True)
    assert (ours.scores, ours.history, ours.window_start) == (
        theirs.scores,
        theirs.history,
        theirs.window_start,
    )
    # the next hour: support-bot's answers ten times as long, tone all "c", faithfulness 0.5
    coming = []
    for k in range(60):
        ts = now + timedelta(minutes=k)
        coming.append(interaction("support-bot", ts, rng.randrange(1000, 4000)))
        coming.append(event("drift", "triage", ts, Drift("tone", category="c")))
        coming.append(event("eval", "refunds", ts, Eval("faithfulness", 0.5)))
    coming.append(interaction("support-bot", now + timedelta(hours=2), 200))  # closes windows
    fired = [sorted((a.kind, a.metric, a.fired_at) for e in coming for a in w.observe(e))
             for w in (rebuilt, fed)]  # fmt: skip
    assert fired[0] == fired[1]
    assert {kind for kind, _, _ in fired[0]} == {"drift", "eval_regression"}


def test_a_replay_takes_each_event_no_later_than_it_was_stored(store: ClickHouseStore) -> None:
    """Three hours of batches, some events stamped up to 50 minutes ahead of when they were
    stored (producers' clocks running fast). The worker judged each no later than when it was
    stored (``as_stored``), and the replay takes each at least(ts, ingested_at): the rebuilt
    budget, drift and eval state is that of an evaluator fed each event as it was stored. Fed
    their own times, an evaluator stands elsewhere (checked), so the replay tells them apart."""
    rng = random.Random(5)
    now = datetime.now(UTC).replace(second=0, microsecond=0)

    def event(kind: str, agent: str, ts: datetime, body: Any, usd: float | None) -> Event:
        cost = None if usd is None else f"{usd:.2f}"
        return Event(event_id=f"f-{next(_ids)}", kind=kind, ts=ts, tenant_id="acme",
                     agent_id=agent, body=body, enrichment=Enrichment("stored", cost))  # fmt: skip

    batches: list[tuple[datetime, list[Event]]] = []
    for k in range(36):  # a batch every 5 minutes
        at = now - timedelta(minutes=5 * k + 1)
        events = []
        for j in range(12):
            ts = at - timedelta(seconds=rng.randrange(300))
            ts += timedelta(minutes=rng.choice((0, 0, 0, 20, 50)))  # a fast clock, or not
            agent = ("support-bot", "triage")[j % 2]
            tokens = rng.randrange(100, 400) * (3 if k < 6 else 1)
            answer = Interaction("openai", "gpt-4o", output_tokens=tokens)
            events.append(event("interaction", agent, ts, answer, 0.5))
            if j % 3 == 0:
                score = Eval("faithfulness", rng.uniform(0.5, 1) - (0.3 if k < 6 else 0))
                events.append(event("eval", agent, ts, score, None))
        batches.append((at, events))
        _store(store, [(0, e) for e in events], at)
    rules = AlertRules(
        budgets=(Budget("acme", "day", 30.0),),
        drift=(DriftMonitor("output_tokens", "ks", 0.3, timedelta(minutes=15), timedelta(hours=1),
                            min_samples=15),),
        evals=(EvalRule("faithfulness", 0.6, timedelta(minutes=30)),),
    )  # fmt: skip
    rebuilt = replay_ledger(store, rules, now).evaluator

    def fed(stored: bool) -> Evaluator:
        evaluator = Evaluator(rules)
        taken = [as_stored(e, at) if stored else e for at, events in batches for e in events]
        for e in sorted(taken, key=lambda e: e.ts):
            if lookback(rules, now) <= e.ts < now:
                evaluator.observe(e)
        return evaluator

    def state(evaluator: Evaluator) -> tuple[Any, ...]:
        (drift,), (ev,), (budget,) = evaluator.drift, evaluator.evals, evaluator.budgets
        return (
            _held(drift), drift.window_start, ev.window_start,
            # sums of the same scores, in the order the ledger gives events of one instant
            {k: [(end, round(m, 9)) for end, m in means] for k, means in ev.history.items()},
            {k: (round(t, 9), n) for k, (t, n) in ev.scores.items()},
            budget.state.period_start, round(budget.state.spent, 6),
            {h: round(v, 6) for h, v in budget.state.buckets.items()},
        )  # fmt: skip

    assert state(rebuilt) == state(fed(stored=True))
    assert state(rebuilt) != state(fed(stored=False))


def test_a_budget_level_crossed_but_never_raised_is_raised_at_the_rebuild(
    store: ClickHouseStore,
) -> None:
    """acme's $9 of a $10 day is stored, crossing 50% and 80%; only the 50% alert is in
    ``vigil.alerts`` (its worker stopped after storing the spend that crossed 80%, before
    raising it; the replay drops what it fires), and an 80% alert of yesterday's. The rebuilt
    state raises today's 80% late, once: then the table holds it."""
    now = datetime.now(UTC)
    _store(store, [(0, _spend("acme", 5.0, now)), (0, _spend("acme", 4.0, now)),
                   (0, _spend("globex", 1.0, now))])  # fmt: skip
    rules = AlertRules(budgets=(Budget("acme", "day", 10.0), Budget("globex", "day", 10.0)))
    live = Evaluator(rules)
    (half,) = live.observe(_spend("acme", 5.0, now))
    yesterday = dataclasses.replace(half, threshold=8.0, fired_at=now - timedelta(days=1))
    rows = [alert_row(half, now), alert_row(yesterday, now)]
    store.insert(ALERT_TABLE, rows, ALERT_COLUMNS, "raised-before")
    (late,) = unraised(store, replay_ledger(store, rules, now), now)
    assert (late.kind, late.scope, late.threshold, late.observed) == (
        "budget_threshold", {"tenant": "acme"}, 8.0, 9.0,
    )  # fmt: skip
    assert "is 90% spent ($9.00); raised late" in late.message
    store.insert(ALERT_TABLE, [alert_row(late, now)], ALERT_COLUMNS, "raised-late")
    assert unraised(store, replay_ledger(store, rules, now), now) == []


def test_a_replay_ends_told_of_the_latest_caught_up_time_its_workers_stored(
    store: ClickHouseStore,
) -> None:
    """Poor scores of acme's bot before an hour, and nothing of acme after them: the replay
    leaves their window open until ``vigil.caught_up`` holds a time of the store workers'
    group, after the window's end and the grace, before which their lag samples showed every
    event evaluated (as the worker that stored it judged the window then:
    ``Evaluator.caught_up``). One before the grace, or another group's, does not judge it."""
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    _store(store, [(0, e) for e in _poor_scores_before(hour)], hour)
    rules = AlertRules(evals=(EvalRule("faithfulness", 0.8),))

    def shown(caught_up: datetime, group: str = "g") -> None:
        row = (caught_up + timedelta(minutes=1), group, caught_up)  # shown by a later sample
        store.insert(CAUGHT_UP_TABLE, [row], CAUGHT_UP_COLUMNS, f"{group}-{caught_up}")

    def fired() -> list[tuple[str, datetime]]:
        replay = replay_ledger(store, rules, now, caught_up="g")
        return [(a.kind, a.fired_at) for a in replay.fired]

    assert fired() == []
    shown(hour + timedelta(minutes=4))  # before the grace (five minutes)
    shown(hour + timedelta(minutes=20), group="other")
    assert fired() == []
    shown(hour + timedelta(minutes=6))
    assert fired() == [("eval_regression", hour)]
    assert replay_ledger(store, rules, now).fired == []  # not told of them


def test_a_budget_forecast_never_raised_is_raised_at_the_rebuild(store: ClickHouseStore) -> None:
    """acme spent $20 a day from Monday to Friday of a week with a $100 budget: on Thursday,
    with $60 spent, the week was on course to breach it. The worker stored that spend and
    stopped before raising the forecast (and raised the levels); the rebuilt state raises the
    forecast late, once, as the worker would have made it."""
    monday = datetime(2026, 11, 16, tzinfo=UTC)
    now = monday + timedelta(days=5, hours=12)
    spend = [_spend("acme", 20.0, monday + timedelta(days=d, hours=10)) for d in range(5)]
    _store(store, [(0, e) for e in spend], now)
    rules = AlertRules(budgets=(Budget("acme", "week", 100.0),))
    evaluator = Evaluator(rules)
    live = [a for e in spend for a in evaluator.observe(e)]
    (forecast,) = [a for a in live if a.kind == "budget_forecast"]
    assert forecast.fired_at == monday + timedelta(days=3, hours=10)  # Thursday's spend
    levels = [a for a in live if a.kind == "budget_threshold"]
    store.insert(ALERT_TABLE, [alert_row(a, now) for a in levels], ALERT_COLUMNS, "levels")
    (late,) = unraised(store, replay_ledger(store, rules, now), now)
    assert (late.kind, late.scope, late.threshold) == ("budget_forecast", {"tenant": "acme"}, 100)
    assert late.observed == pytest.approx(forecast.observed)
    assert late.message == forecast.message + late.message.removeprefix(forecast.message)
    assert late.message.endswith("no alert of it had been stored")
    store.insert(ALERT_TABLE, [alert_row(late, now)], ALERT_COLUMNS, "raised-late")
    assert unraised(store, replay_ledger(store, rules, now), now) == []
    # a forecast of a period that is over is not raised: a day budget's replay reads the day
    # before, whose forecast (six hours of $12 against $100) no alert holds
    day = AlertRules(budgets=(Budget("globex", "day", 100.0),))
    friday = monday + timedelta(days=4)
    _store(store, [(0, _spend("globex", 12.0, friday + timedelta(hours=h))) for h in range(8)],
           friday + timedelta(hours=8))  # fmt: skip
    replay = replay_ledger(store, day, friday + timedelta(days=1, hours=1))
    assert [a.kind for a in replay.fired if a.kind == "budget_forecast"] == ["budget_forecast"]
    late_kinds = [a.kind for a in unraised(store, replay, friday + timedelta(days=1, hours=1))]
    assert "budget_forecast" not in late_kinds and late_kinds  # its levels crossed are facts


def test_a_recent_window_alert_never_raised_is_raised_at_the_rebuild(
    store: ClickHouseStore,
) -> None:
    """Eight hours of bot's faithfulness scores, good but for the last complete hour's: its
    window's regression, fired by the replay, is not in ``vigil.alerts`` and is raised late.
    Not once an alert of bot's regression is stored within the cooldown before it (that one
    held it back), nor once the window is older than the cooldown."""
    now = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    hour = now.replace(minute=0)

    def score(at: datetime, value: float) -> Event:
        return Event(event_id=f"q-{next(_ids)}", kind="eval", ts=at, tenant_id="acme",
                     agent_id="bot", body=Eval("faithfulness", value),
                     enrichment=Enrichment("stored", None))  # fmt: skip

    scores = [score(hour - timedelta(hours=h) + timedelta(minutes=m), 0.3 if h == 1 else 0.9)
              for h in range(1, 9) for m in range(0, 60, 10)]  # fmt: skip
    scores.append(score(now, 0.9))  # the current hour: closes the last one
    _store(store, [(0, e) for e in scores], now)
    rules = AlertRules(evals=(EvalRule("faithfulness", 0.5),), cooldown=timedelta(hours=6))
    replay = replay_ledger(store, rules, now)
    assert [(a.kind, a.fired_at) for a in replay.fired] == [("eval_regression", hour)]
    (late,) = unraised(store, replay, now)
    assert late.fired_at == hour and late.message.endswith("no alert of it had been stored")
    # an alert of the same kind and scope two hours before it: the cooldown held this one back
    earlier = dataclasses.replace(late, fired_at=hour - timedelta(hours=2), message="earlier")
    store.insert(ALERT_TABLE, [alert_row(earlier, now)], ALERT_COLUMNS, "earlier")
    assert unraised(store, replay, now) == []
    # past the cooldown, not raised late
    assert unraised(store, replay, now + timedelta(hours=6)) == []


def test_a_window_whose_scores_stopped_is_judged_by_its_tenants_clock_in_the_replay(
    store: ClickHouseStore,
) -> None:
    """bot's poor scores of the last complete hour, and none since; acme's other agent spends
    after it. A rebuild judges that window once the spend passes its end and the grace, as the
    worker does, and raises it late when no alert of it is stored."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    scores = _poor_scores_before(hour)
    now = hour + timedelta(minutes=30)
    _store(store, [(0, e) for e in scores], now)
    rules = AlertRules(evals=(EvalRule("faithfulness", 0.5),), window_grace=timedelta(minutes=5))
    _store(store, [(0, _spend("acme", 0.01, hour + timedelta(minutes=4), agent="other"))], now)
    assert replay_ledger(store, rules, now).fired == []
    _store(store, [(0, _spend("acme", 0.01, hour + timedelta(minutes=5), agent="other"))], now)
    replay = replay_ledger(store, rules, now)
    assert [(a.kind, a.fired_at) for a in replay.fired] == [("eval_regression", hour)]
    (late,) = unraised(store, replay, now)
    assert "over 5 scores" in late.message and late.message.endswith("had been stored")


def test_a_decision_moves_its_tenants_clock_in_a_backtest_as_in_the_worker(
    store: ClickHouseStore,
) -> None:
    """bot's poor scores of the last complete hour, and none since; acme's only event after
    them a reviewer's decision past the window's end and the grace. The worker's evaluator
    judges the window at the decision; so does ``vigil alerts backtest --since`` on the
    ledger's events. Without the decisions in the backtest's history it judged nothing."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    scores = _poor_scores_before(hour)
    decision = Event(
        event_id=f"d-{next(_ids)}", kind="decision", ts=hour + timedelta(minutes=6),
        tenant_id="acme", agent_id="desk", body=Decision("n-0", "approved", "rev-1", "fine"),
        enrichment=Enrichment("stored", None),
    )  # fmt: skip
    now = hour + timedelta(minutes=30)
    _store(store, [(0, e) for e in [*scores, decision]], now)
    rules = AlertRules(evals=(EvalRule("faithfulness", 0.5),), window_grace=timedelta(minutes=5))
    worker = Evaluator(rules)
    live = [a for e in scores for a in worker.observe(e)]
    assert live == []
    live = worker.observe(decision)
    assert [(a.kind, a.fired_at) for a in live] == [("eval_regression", hour)]

    fired = backtest(rules, ledger_history(store, hour - timedelta(hours=1)))
    assert [(a.kind, a.fired_at, a.message) for a in fired] == [
        (a.kind, a.fired_at, a.message) for a in live
    ]
    assert "over 5 scores" in fired[0].message


class _HistoryHeld:
    """The real store, whose first query of the spend's history waits for ``release``."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.store = store
        self.querying = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def query_rows(self, sql: str, settings: Mapping[str, Any] | None = None) -> Any:
        if "GROUP BY hour" in sql and not self.querying.is_set():
            self.querying.set()
            self.release.wait(60)
        return self.store.query_rows(sql, settings)


@pytest.mark.parametrize("giving_up", ["stop", "rebalance"])
def test_partitions_given_up_stop_the_rebuild_in_progress(
    kafka_bootstrap: str,
    store: ClickHouseStore,
    sender: KafkaSender,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    giving_up: str,
) -> None:
    """A store worker stops, or has its partitions revoked (Faust's revocation signal, as a
    rebalance sends it), while it reads the history of its tenants' spend (2,500 agents'
    hours): the replay stops at its first look after the rows came, rather than run to its end
    while the worker's exit, or the next assignment's rebuild, waits for the ClickHouse thread.
    Without the word to the rebuild (checked, for each), the state was rebuilt from all 2,500."""
    caplog.set_level(logging.INFO, "vigil.alerts")
    now = datetime.now(UTC)
    rules = _spend_of_many_agents(store, now)
    group = f"giveup-{uuid.uuid4().hex[:8]}"
    settings = member_settings(tmp_path / "a", kafka_bootstrap, group)
    ensure_topics(settings)
    held = _HistoryHeld(store)
    config = load_config(ROOT / "vigil.yaml", os.environ)
    app = build_app(settings, config, held, Registry.load(), rules, None, sender, "store")

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "vigil.alerts"]

    async def run() -> None:
        await app.start()
        try:
            await until(held.querying.is_set, "the rebuild's query of the spend", 60)
            if giving_up == "stop":
                await app.stop()
            else:
                await app.on_partitions_revoked.send(set())
            held.release.set()
            await until(lambda: any(" given up " in m for m in said()), "the rebuild given up")
        finally:
            held.release.set()
            if giving_up != "stop":
                await app.stop()

    asyncio.run(run())
    assert [m for m in said() if m.startswith("alert state rebuil")] == [
        "alert state rebuild of clean partitions 0, 1, 2, 3 given up after 1000 events: "
        "no longer held"
    ]


def test_two_store_workers_judge_every_budget_on_its_whole_spend(
    kafka_bootstrap: str,
    store: ClickHouseStore,
    sender: KafkaSender,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Eight tenants with a $10 monthly budget each, each spending through four agents, into
    two store-role workers that share clean's four partitions: $6 each while both run, then
    $3 more once A has stopped and B holds every partition. Each tenant's 50% alert fires once
    in the first phase, its 80% alert once in the second, and nothing else. With clean keyed by
    tenant and agent (checked), a tenant's spend was split between the workers and the 50%
    alerts did not all fire; without the rebuild at the assignment (checked), B judged A's
    tenants on the $3 it saw and the 80% alerts did not all fire."""
    caplog.set_level(logging.INFO, "vigil.alerts")
    prefix = f"alerts-{uuid.uuid4().hex[:8]}"
    registry = Registry.load()
    config = load_config(ROOT / "vigil.yaml", os.environ)
    tenants = [f"tenant-{i}" for i in range(8)]
    rules = AlertRules(budgets=tuple(Budget(t, "month", 10.0) for t in tenants))
    turn = threading.Lock()
    now = datetime.now(UTC)

    def settings(name: str) -> Settings:
        return member_settings(tmp_path / name, kafka_bootstrap, prefix,
                               VIGIL_SINK_FLUSH_SECONDS="0.2")  # fmt: skip

    def worker(name: str) -> faust.App:
        server = SharedServer(store, turn, insert_seconds=0.0)
        return build_app(settings(name), config, server, registry, rules, None, sender, "store")

    a, b = worker("a"), worker("b")
    ensure_topics(settings("topics"))
    clean = settings("clean").topics.clean

    async def spend(dollars: int) -> None:
        """``dollars`` events of $1 for each tenant, round its four agents, keyed as validate
        keys them and published by the worker's own producer."""
        events = [_spend(t, 1.0, now, agent=f"agent-{k % 4}") for k in range(dollars)
                  for t in tenants]  # fmt: skip
        await sender.send(
            [
                (clean, clean_key(e), registry.encode_batch([registry.encode_event(e)]))
                for e in events
            ]
        )

    def stored() -> int:
        return count(store, "SELECT count() FROM vigil.audit_log")

    def thresholds() -> dict[str, list[float]]:
        rows = store.query_rows(
            "SELECT tenant_id, groupArray(threshold) FROM (SELECT tenant_id, threshold FROM "
            "vigil.alerts WHERE kind = 'budget_threshold' ORDER BY threshold) GROUP BY tenant_id"
        )
        return {str(t): list(levels) for t, levels in rows}

    halves: list[set[int]] = []

    def split_between_two() -> bool:
        halves[:] = two_halves(alert_states_rebuilt(caplog), {0, 1, 2, 3})
        return bool(halves)

    async def run() -> None:
        await a.start()
        await until(lambda: {0, 1, 2, 3} in alert_states_rebuilt(caplog), "A's alert state", 60)
        caplog.clear()
        await b.start()
        await until(split_between_two, "A's and B's alert states, of two halves of clean", 60)
        await spend(6)
        await until(lambda: stored() == 48, "the first $6 of each tenant", 60)
        await until(lambda: len(thresholds()) == 8, "a 50% alert of every tenant", 60)
        caplog.clear()
        await a.stop()
        await until(
            lambda: {0, 1, 2, 3} in alert_states_rebuilt(caplog), "B's alert state of all four", 60
        )
        await spend(3)
        await until(lambda: stored() == 72, "$3 more of each tenant", 60)
        await until(
            lambda: all(len(levels) == 2 for levels in thresholds().values()),
            "an 80% alert of every tenant",
            60,
        )
        await asyncio.sleep(1)  # for an alert that should not come
        await b.stop()

    asyncio.run(run())
    # the tenants were spread over clean, so while both ran each stored some of them
    used = {int(r[0]) for r in store.query_rows("SELECT DISTINCT source_partition FROM "
                                                "vigil.audit_log")}  # fmt: skip
    assert all(used & half for half in halves), (used, halves)
    # each tenant's events in one partition
    assert count(store, "SELECT max(p) FROM (SELECT uniqExact(source_partition) AS p FROM "
                 "vigil.audit_log GROUP BY tenant_id)") == 1  # fmt: skip
    assert thresholds() == {t: [5.0, 8.0] for t in tenants}
    assert count(store, "SELECT count() FROM vigil.alerts") == 16
    assert verify(store, Retention()).ok
