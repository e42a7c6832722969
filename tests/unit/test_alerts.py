"""Alert evaluators on generated scenarios: lead time of forecasts, silence on steady spend and
stable metrics, detection delay after shifts, eval drops; the backtest command end to end."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import subprocess
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.alerting import _eval_since
from pipeline.alerts import (
    ANOMALY_HISTORY,
    Alert,
    AlertRules,
    Budget,
    BudgetWatch,
    DriftMonitor,
    DriftWatch,
    EvalRule,
    Evaluator,
    EvalWatch,
    SpendAnomaly,
    as_stored,
    backtest,
    jensen_shannon,
    ks,
    parse_rules,
    psi,
)
from pipeline.events import Cost, Enrichment, Eval, Event, Interaction, event_to_json
from pipeline.settings import ConfigError

NOV = datetime(2026, 11, 1, tzinfo=UTC)
_ids = iter(range(10**9))


def _spend(ts: datetime, usd: float, tenant: str = "acme", agent: str = "bot") -> Event:
    return Event(
        event_id=f"c-{next(_ids)}", kind="cost", ts=ts, tenant_id=tenant, agent_id=agent,
        body=Cost(usd, "USD", "compute"),
        enrichment=Enrichment("non_token", f"{usd:.9f}", team="support"),
    )  # fmt: skip


def _month(daily: list[float], rng: random.Random, per_day: int = 24) -> list[Event]:
    events = []
    for day, amount in enumerate(daily):
        for k in range(per_day):
            ts = NOV + timedelta(days=day, hours=k, minutes=rng.randint(0, 59))
            events.append(_spend(ts, amount / per_day * rng.uniform(0.8, 1.2)))
    return events


def _kinds(alerts: list[Alert]) -> list[str]:
    return [a.kind for a in alerts]


def test_a_ramp_is_forecast_days_before_it_breaches() -> None:
    rng = random.Random(1)
    daily = [50 + 8 * d for d in range(30)]  # cumulative passes 4,000 on November 27
    rules = AlertRules(budgets=(Budget("acme", "month", 4000.0),))
    alerts = backtest(rules, _month(daily, rng))
    forecast = [a for a in alerts if a.kind == "budget_forecast"]
    breach = [a for a in alerts if a.kind == "budget_threshold" and a.threshold == 4000.0]
    assert len(forecast) == 1 and len(breach) == 1, alerts
    lead = breach[0].fired_at - forecast[0].fired_at
    assert lead >= timedelta(days=7), lead
    predicted = forecast[0].predicted_breach_at
    assert predicted is not None and abs(predicted - breach[0].fired_at) <= timedelta(days=2)
    assert forecast[0].observed > 4000 and forecast[0].scope == {"tenant": "acme"}


@pytest.mark.parametrize("seed", range(20))
def test_steady_spend_that_ends_under_the_limit_raises_no_forecast(seed: int) -> None:
    rng = random.Random(seed)
    daily = [100 * rng.uniform(0.85, 1.15) for _ in range(30)]  # about 3,000 of 3,500
    rules = AlertRules(budgets=(Budget("acme", "month", 3500.0),))
    alerts = backtest(rules, _month(daily, rng))
    assert "budget_forecast" not in _kinds(alerts) and "spend_anomaly" not in _kinds(alerts)
    # reaching half and 80% of a budget is reported; nothing critical
    assert {a.threshold for a in alerts} <= {1750.0, 2800.0}, alerts


@pytest.mark.parametrize("seed", range(10))
def test_steady_spend_well_under_the_limit_raises_no_alert_at_all(seed: int) -> None:
    rng = random.Random(100 + seed)
    daily = [100 * rng.uniform(0.85, 1.15) for _ in range(30)]  # about 3,000 of 7,000
    rules = AlertRules(budgets=(Budget("acme", "month", 7000.0), Budget("acme", "day", 400.0)))
    assert backtest(rules, _month(daily, rng)) == []


def test_thresholds_fire_once_each_per_period_and_scopes_filter() -> None:
    events = [_spend(NOV + timedelta(hours=h), 10.0) for h in range(30)]
    events += [_spend(NOV + timedelta(hours=h), 10.0, agent="other") for h in range(30)]
    rules = AlertRules(budgets=(Budget("acme", "day", 100.0, agent="bot"),
                                Budget("acme", "day", 800.0, team="support")))  # fmt: skip
    alerts = [a for a in backtest(rules, events) if a.kind == "budget_threshold"]
    bot = [a for a in alerts if a.scope.get("agent") == "bot"]
    # day 1: 24 hours x $10 for bot passes 50, 80, 100; day 2 (6 hours, $60) passes 50 again
    assert [(a.fired_at.day, a.threshold) for a in bot] == [
        (1, 50.0),
        (1, 80.0),
        (1, 100.0),
        (2, 50.0),
    ]
    team = [a for a in alerts if a.scope.get("team") == "support"]
    assert [a.threshold for a in team] == [400.0]  # both agents count: $480 on day 1, $120 on 2


def test_thresholds_never_go_back_in_time_when_events_come_out_of_order() -> None:
    # a backlog read from two partitions: every odd hour of November 1 first, then the even
    # hours; then November 2, with one of November 1's events arriving late in the middle
    rules = AlertRules(budgets=(Budget("acme", "day", 200.0),))
    evaluator = Evaluator(rules)
    day1 = [_spend(NOV + timedelta(hours=h), 10.0) for h in [*range(1, 24, 2), *range(0, 24, 2)]]
    day2 = NOV + timedelta(days=1)
    late = [_spend(day2, 110.0), _spend(NOV + timedelta(hours=23, minutes=59), 10.0),
            _spend(day2 + timedelta(hours=1), 60.0)]  # fmt: skip
    alerts = [a for e in day1 + late for a in evaluator.observe(e) if a.kind == "budget_threshold"]
    # day 1: 50% is crossed at 19:00 (the odd hours alone); 80% and 100% only once the even
    # hours come in, by when 23:00 had been seen; their own hours (06:00, 14:00) are earlier
    assert [(a.threshold, a.fired_at) for a in alerts[:3]] == [
        (100.0, NOV + timedelta(hours=19)),
        (160.0, NOV + timedelta(hours=23)),
        (200.0, NOV + timedelta(hours=23)),
    ]
    # day 2: the late event of day 1 neither restarts day 1 nor counts toward day 2, so 50%
    # fires once and 80% once ($110 + $60 = $170), in time order
    assert [(a.threshold, a.fired_at) for a in alerts[3:]] == [
        (100.0, day2),
        (160.0, day2 + timedelta(hours=1)),
    ]


@pytest.mark.parametrize("period", ["day", "week", "month"])
@pytest.mark.parametrize("seed", range(4))
def test_a_budget_remembering_its_period_fires_as_one_finding_it_for_every_event(
    period: str, seed: int
) -> None:
    """A budget keeps the bounds of the period its last event fell in: events at the bounds,
    late ones (up to 40 days back) and the next period's change nothing."""
    rng = random.Random(seed)
    events = []
    for h in range(0, 24 * 70, 3):
        at = NOV + timedelta(hours=h)
        if rng.random() < 0.1:
            at -= timedelta(hours=rng.randint(1, 24 * 40))
        elif rng.random() < 0.2:  # the first or the last millisecond of a day
            at = at.replace(hour=0, minute=0) - timedelta(milliseconds=rng.choice([0, 1]))
        events.append(_spend(at, rng.uniform(1.0, 30.0)))
    limit = {"day": 150.0, "week": 900.0, "month": 3000.0}[period]
    remembering = BudgetWatch(Budget("acme", period, limit))
    finding = BudgetWatch(Budget("acme", period, limit))
    fired, expected = [], []
    for e in events:
        fired += remembering.observe(e, e.body.amount)  # type: ignore[union-attr]
        finding._period = None  # as if the bounds were found again for this event
        expected += finding.observe(e, e.body.amount)  # type: ignore[union-attr]
    assert fired == expected
    assert {a.kind for a in fired} >= {"budget_threshold"}


def test_a_sudden_jump_in_spend_rate_is_an_anomaly() -> None:
    rng = random.Random(3)
    events = [_spend(NOV + timedelta(hours=h, minutes=rng.randint(0, 59)), 5 * rng.uniform(0.9, 1.1))
              for h in range(48)]  # fmt: skip
    events += [_spend(NOV + timedelta(hours=48, minutes=m), 4.0) for m in range(0, 60, 5)]
    alerts = backtest(AlertRules(), events)
    assert _kinds(alerts) == ["spend_anomaly"]
    assert alerts[0].fired_at >= NOV + timedelta(hours=48)


def test_spend_anomaly_keeps_only_the_trailing_day_of_hours() -> None:
    """Every hour begun forgets the hours past the trailing day (plus the one begun), also
    those a late event brought back; the hours within it are kept."""
    anomaly = SpendAnomaly(factor=3.0)
    for h in range(60):
        list(anomaly.observe(_spend(NOV + timedelta(hours=h), 1.0), 1.0))
    assert sorted(anomaly.hours["acme"]) == [NOV + timedelta(hours=h) for h in range(34, 60)]
    list(anomaly.observe(_spend(NOV, 1.0), 1.0))  # a late event, two days back
    list(anomaly.observe(_spend(NOV + timedelta(hours=59, minutes=30), 1.0), 1.0))
    assert NOV in anomaly.hours["acme"] and anomaly.hours["acme"][NOV + timedelta(hours=59)] == 2
    list(anomaly.observe(_spend(NOV + timedelta(hours=60), 1.0), 1.0))
    assert sorted(anomaly.hours["acme"]) == [NOV + timedelta(hours=h) for h in range(35, 61)]


def _anomalies_per_event(events: list[Event], factor: float) -> list[tuple[str, datetime]]:
    """SpendAnomaly's rule, its history computed again for every event (and the hours past
    the trailing day forgotten as it does, when an hour begins)."""
    hours: dict[str, dict[datetime, float]] = {}
    fired = []
    for e in events:
        hour = e.ts.replace(minute=0, second=0, microsecond=0)
        spend = hours.setdefault(e.tenant_id, {})
        if hour not in spend:
            spend = hours[e.tenant_id] = {
                h: v for h, v in spend.items() if h >= hour - timedelta(hours=25)
            }
        spend[hour] = spend.get(hour, 0.0) + e.body.amount  # type: ignore[union-attr]
        history = [spend.get(hour - timedelta(hours=k), 0.0) for k in range(1, 25)]
        if sum(1 for h in history if h > 0) < 12 or (e.tenant_id, hour) in fired:
            continue
        mean = sum(history) / 24
        sd = (sum((h - mean) ** 2 for h in history) / 23) ** 0.5
        if spend[hour] > max(mean * factor, mean + 4 * sd) and mean > 0:
            fired.append((e.tenant_id, hour))
    return fired


@pytest.mark.parametrize("seed", range(8))
def test_spend_anomaly_fires_as_if_each_event_recomputed_the_trailing_day(seed: int) -> None:
    """The bar is computed once per tenant and hour, until an event of another hour comes:
    late events (up to 30 hours back) and several tenants in between change nothing."""
    rng = random.Random(seed)
    events = []
    for h in range(72):
        for _ in range(rng.randint(1, 6)):
            late = rng.random() < 0.1
            at = NOV + timedelta(hours=h - (rng.randint(1, 30) if late else 0),
                                 minutes=rng.randint(0, 59))  # fmt: skip
            spike = 12 if h % 23 == 22 and rng.random() < 0.7 else 1
            events.append(_spend(at, spike * rng.uniform(0.5, 1.5), rng.choice(["a", "b", "c"])))
    anomaly = SpendAnomaly(factor=3.0)
    fired = [(a.scope["tenant"], a.fired_at.replace(minute=0, second=0, microsecond=0))
             for e in events for a in anomaly.observe(e, e.body.amount)]  # type: ignore[union-attr]  # fmt: skip
    assert fired == _anomalies_per_event(events, 3.0)
    assert fired  # the spikes fire
    # it remembers the anomalous hours of the trailing day only (late events and all)
    for tenant, hours in anomaly.fired.items():
        assert all(h >= max(anomaly.hours[tenant]) - ANOMALY_HISTORY for h in hours)


def _tokens(start: datetime, hours: int, mean: float, sd: float, rng: random.Random,
            shift_per_hour: float = 0.0) -> list[Event]:  # fmt: skip
    out = []
    for h in range(hours):
        for k in range(240):  # one call every 15 seconds
            ts = start + timedelta(hours=h, seconds=15 * k)
            value = max(1, int(rng.gauss(mean + shift_per_hour * h, sd)))
            out.append(Event(event_id=f"i-{next(_ids)}", kind="interaction", ts=ts,
                             tenant_id="acme", agent_id="bot",
                             body=Interaction("openai", "gpt-4o", input_tokens=500, output_tokens=value)))  # fmt: skip
    return out


DRIFT = DriftMonitor("output_tokens", "psi", 0.2, timedelta(hours=1), timedelta(days=1))


def test_a_step_shift_is_detected_within_the_next_window() -> None:
    rng = random.Random(4)
    step = NOV + timedelta(days=2)
    events = _tokens(NOV, 48, 200, 30, rng) + _tokens(step, 6, 320, 30, rng)
    alerts = backtest(AlertRules(drift=(DRIFT,)), events)
    assert _kinds(alerts) == ["drift"], alerts
    delay = alerts[0].fired_at - step
    assert timedelta(0) < delay <= timedelta(hours=1), delay  # the first window after it


def test_stable_metrics_raise_nothing() -> None:
    rng = random.Random(5)
    monitors = (
        DRIFT,
        DriftMonitor("output_tokens", "ks", 0.25, timedelta(hours=1), timedelta(days=1)),
    )
    alerts = backtest(AlertRules(drift=monitors), _tokens(NOV, 72, 200, 30, rng))
    assert alerts == []


def test_a_gradual_shift_is_detected_and_its_delay_is_bounded() -> None:
    rng = random.Random(6)
    start = NOV + timedelta(days=1)
    events = _tokens(NOV, 24, 200, 30, rng) + _tokens(start, 24, 200, 30, rng, shift_per_hour=4)
    alerts = backtest(AlertRules(drift=(DRIFT,)), events)
    assert alerts and alerts[0].kind == "drift"
    assert alerts[0].fired_at - start <= timedelta(hours=12)  # +48 tokens by then: 1.6 sd


def test_categorical_drift_uses_jensen_shannon() -> None:
    assert jensen_shannon(["stop"] * 90 + ["length"] * 10, ["stop"] * 50 + ["length"] * 50) > 0.1
    assert jensen_shannon(["a", "b"] * 50, ["b", "a"] * 50) == 0.0
    assert ks([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.0 and ks([1.0, 2.0], [3.0, 4.0]) == 1.0
    same = [float(i % 100) for i in range(1000)]
    assert psi(same, same) < 0.01 < 0.2 < psi(same, [v + 50 for v in same])


def _answers(start: datetime, means: list[float], rng: random.Random) -> list[Event]:
    """An answer's output tokens for each of ``means``, spread evenly over the hour from
    ``start``, each about its mean (sd 10)."""
    step = timedelta(hours=1) / len(means)
    return [
        Event(event_id=f"i-{next(_ids)}", kind="interaction", ts=start + k * step,
              tenant_id="acme", agent_id="bot",
              body=Interaction("openai", "gpt-4o", output_tokens=int(rng.gauss(mean, 10))))
        for k, mean in enumerate(means)
    ]  # fmt: skip


def test_a_busy_stretch_is_held_as_a_sample_that_stands_for_all_of_it() -> None:
    """A monitor that holds at most 500 samples of an hour: 10,000 answers in the first hour of
    its baseline, 1,000 longer ones in the second, then an hour of the same mix. The kept
    samples are weighed by the hour's count, so the mix is no drift; pooled as equals, the
    baseline would be half long answers and the hour would drift (KS about 0.4). Then an hour
    of long answers only drifts, and the alert counts every answer."""
    rng = random.Random(12)
    monitor = DriftMonitor("output_tokens", "ks", 0.15, timedelta(hours=1), timedelta(hours=2))
    watch = DriftWatch(monitor, per_stretch=500)
    mix = [100.0] * 10 + [150.0]
    events = (
        _answers(NOV, [100.0] * 10_000, rng)
        + _answers(NOV + timedelta(hours=1), [150.0] * 1_000, rng)
        + _answers(NOV + timedelta(hours=2), mix * 1_000, rng)
        + _answers(NOV + timedelta(hours=3), [150.0] * 2_000, rng)
        + _answers(NOV + timedelta(hours=4), [100.0], rng)
    )
    fired, held = [], 0
    for event in events:
        fired += watch.observe(event)
        held = max(held, watch.held())
    assert [(a.fired_at, a.kind) for a in fired] == [(NOV + timedelta(hours=4), "drift")]
    assert "(2000 samples against 12000, weighed from 500 and 1000 kept)" in fired[0].message
    assert held <= 3 * 500 + 1


@pytest.mark.parametrize("per_stretch", [None, 500])
def test_a_pinned_baseline_judges_the_windows_after_it(per_stretch: int | None) -> None:
    """A baseline pinned to the first day (5,760 answers): the next day, as stable, raises
    nothing; a step up 12 hours into the third day fires within the hour. The same when the
    monitor keeps 500 samples of the pinned day and of each hour."""
    rng = random.Random(14)
    monitor = DriftMonitor("output_tokens", "psi", 0.2, timedelta(hours=1), None,
                           baseline_from=NOV, baseline_to=NOV + timedelta(days=1))  # fmt: skip
    step = NOV + timedelta(days=2, hours=12)
    events = _tokens(NOV, 60, 200, 30, rng) + _tokens(step, 3, 320, 30, rng)
    watch = DriftWatch(monitor, per_stretch)
    fired, held = [], 0
    for event in events:
        fired += watch.observe(event)
        held = max(held, watch.held())
    assert fired and all(a.fired_at > step for a in fired), fired
    assert fired[0].fired_at - step <= timedelta(hours=1)
    kept = ")" if per_stretch is None else ", weighed from 240 and 500 kept)"
    assert "(240 samples against 5760" + kept in fired[0].message
    if per_stretch is not None:
        assert held <= 3 * per_stretch + 1


def test_weighted_samples_measure_what_the_values_they_stand_for_measure() -> None:
    rng = random.Random(13)
    base = [float(rng.randrange(50)) for _ in range(300)]
    current = [float(rng.randrange(10, 60)) for _ in range(200)]
    times = [rng.randrange(1, 4) for _ in base]
    repeated = [v for v, n in zip(base, times, strict=True) for _ in range(n)]
    weights = ([float(n) for n in times], [1.0] * len(current))
    assert ks(base, current, weights) == pytest.approx(ks(repeated, current))
    letters = [chr(97 + int(v) % 5) for v in base]
    as_letters = [chr(97 + int(v) % 5) for v in repeated]
    now = [chr(97 + int(v) % 7) for v in current]
    assert jensen_shannon(letters, now, weights) == pytest.approx(jensen_shannon(as_letters, now))
    # the same weight for all: the unweighted statistic
    even = ([3.0] * len(base), [0.5] * len(current))
    assert psi(base, current, weights=even) == pytest.approx(psi(base, current))
    assert ks(base, current, even) == pytest.approx(ks(base, current))


def _scores(start: datetime, hours: int, mean: float, rng: random.Random) -> list[Event]:
    return [
        Event(
            event_id=f"e-{next(_ids)}",
            kind="eval",
            ts=start + timedelta(hours=h, minutes=m),
            tenant_id="acme",
            agent_id="bot",
            body=Eval("faithfulness", min(1.0, max(0.0, rng.gauss(mean, 0.03)))),
        )
        for h in range(hours)
        for m in range(0, 60, 6)
    ]


def test_eval_scores_below_the_floor_or_falling_are_regressions() -> None:
    rng = random.Random(7)
    rule = EvalRule("faithfulness", 0.8)
    stable = backtest(AlertRules(evals=(rule,)), _scores(NOV, 24, 0.9, rng))
    assert stable == []
    drop = NOV + timedelta(hours=24)
    events = (
        _scores(NOV, 24, 0.9, rng)
        + _scores(drop, 4, 0.75, rng)
        + _scores(drop + timedelta(hours=4), 2, 0.9, rng)
    )
    alerts = backtest(AlertRules(evals=(rule,)), events)
    assert _kinds(alerts) == ["eval_regression"]  # once: the cool-down holds the repeats
    assert alerts[0].observed < 0.8 and alerts[0].fired_at - drop <= timedelta(hours=1)
    fall = _scores(NOV, 24, 0.95, rng) + _scores(drop, 2, 0.83, rng)  # above the floor, falling
    assert _kinds(backtest(AlertRules(evals=(rule,)), fall)) == ["eval_regression"]


def test_a_busy_agents_eval_window_holds_no_score_of_its_own() -> None:
    """50,000 scores in one hour: the open window keeps their sum and count, not a list that
    grows with them (the list they were kept in took 449 KB here, checked), and its mean is
    judged as before."""
    watch = EvalWatch(EvalRule("faithfulness", 0.8))
    scores = [
        Event(event_id=f"e-{next(_ids)}", kind="eval", ts=NOV + timedelta(seconds=k * 0.07),
              tenant_id="acme", agent_id="bot", body=Eval("faithfulness", 0.7 + (k % 10) / 100))
        for k in range(50_000)
    ]  # fmt: skip
    tracemalloc.start()
    try:
        for event in scores:
            assert list(watch.observe(event)) == []
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown < 50_000
    closing = dataclasses.replace(scores[0], event_id="e-next", ts=NOV + timedelta(hours=1))
    (alert,) = watch.observe(closing)
    assert alert.observed == pytest.approx(0.745)
    assert "over 50000 scores" in alert.message


def test_a_late_eval_score_does_not_count_in_the_window_open_when_it_arrives() -> None:
    """Scores arrive in batches sorted by time, but a batch can hold scores of an hour whose
    window closed already: they are left out, not counted in the open window."""

    def score(at: datetime, value: float) -> Event:
        return Event(event_id=f"e-{next(_ids)}", kind="eval", ts=at, tenant_id="acme",
                     agent_id="bot", body=Eval("faithfulness", value))  # fmt: skip

    evaluator = Evaluator(AlertRules(evals=(EvalRule("faithfulness", 0.8),)))
    ten, eleven = NOV + timedelta(hours=10), NOV + timedelta(hours=11)
    arrived = [score(ten + timedelta(minutes=6 * i), 0.9) for i in range(10)]
    arrived += [score(eleven + timedelta(minutes=6 * i), 0.9) for i in range(5)]
    arrived += [score(ten + timedelta(minutes=30, seconds=i), 0.1) for i in range(5)]  # late
    arrived += [score(eleven + timedelta(hours=1), 0.9)]  # closes eleven o'clock's window
    assert [a for e in arrived for a in evaluator.observe(e)] == []
    assert evaluator.late() == {("eval", "acme"): 5}  # counted, for the worker's metrics
    # the same scores in time order: ten o'clock's window has them, and regresses
    in_order = sorted(arrived, key=lambda e: e.ts)
    assert _kinds(backtest(AlertRules(evals=(EvalRule("faithfulness", 0.8),)), in_order)) == [
        "eval_regression"
    ]


def _nightly(means: list[float], rng: random.Random) -> list[Event]:
    """An agent scored ten times from 02:00 each night, about ``means[d]`` on night ``d``."""
    return [e for d, mean in enumerate(means)
            for e in _scores(NOV + timedelta(days=d, hours=2), 1, mean, rng)]  # fmt: skip


def test_an_eval_baseline_reaches_back_the_windows_a_rebuild_replays() -> None:
    """An agent scored in bursts four nights, then a fall: a worker that has run all along and
    one rebuilt from the last 25 windows (``alerting._eval_since``) judge it alike. Before, the
    one running along kept the four nights as a baseline and fired; the rebuilt one had none.
    With windows of a day, the nights are a baseline to both."""
    rng = random.Random(5)
    events = _nightly([0.9, 0.9, 0.9, 0.9, 0.7, 0.9, 0.9], rng)
    cut = NOV + timedelta(days=4, hours=1)  # the fifth night's run is an hour away
    for rule, expected in [
        (EvalRule("faithfulness", 0.5, max_drop=0.1), []),  # hourly: a night has no baseline
        (EvalRule("faithfulness", 0.5, timedelta(days=1), max_drop=0.1), ["eval_regression"]),
    ]:
        along, rebuilt = Evaluator(AlertRules(evals=(rule,))), Evaluator(AlertRules(evals=(rule,)))
        for e in events:
            if e.ts < cut:
                assert along.observe(e) == []
                if e.ts >= _eval_since(rule, cut):  # what a rebuild at the cut replays
                    assert rebuilt.observe(e) == []
        after = [e for e in events if e.ts >= cut]
        fired = [a for e in after for a in along.observe(e)]
        assert fired == [a for e in after for a in rebuilt.observe(e)]
        assert _kinds(fired) == expected


def test_an_agent_silent_past_what_a_rebuild_replays_is_forgotten() -> None:
    """An agent that scored below the floor once, 40 hours before it scores again: its window
    is judged once the clock passes its end and the grace (another agent's scores), not when
    it comes back; when it does, a worker that has run all along and one rebuilt from the last
    25 windows both have forgotten it; and agents that scored once are not kept, nor one of
    another tenant whose clock never moved on to close its window."""
    rng = random.Random(3)
    rule = EvalRule("faithfulness", 0.5)
    events = [_score(NOV + timedelta(minutes=m), 0.3, "quiet") for m in range(0, 30, 6)]
    events += [_score(NOV + timedelta(minutes=1), 0.9, f"once-{i}") for i in range(500)]
    events += [dataclasses.replace(_score(NOV, 0.9, "once"), tenant_id="globex")]
    events += _scores(NOV, 40, 0.9, rng)
    events += [_score(NOV + timedelta(hours=40, minutes=m), 0.9, "quiet") for m in range(0, 60, 6)]
    events += _scores(NOV + timedelta(hours=41), 1, 0.9, rng)
    cut = NOV + timedelta(hours=39)
    along, rebuilt = Evaluator(AlertRules(evals=(rule,))), Evaluator(AlertRules(evals=(rule,)))
    judged = []
    for e in sorted(events, key=lambda e: e.ts):
        if e.ts < cut:
            judged += [(e.ts, a) for a in along.observe(e)]
            if e.ts >= _eval_since(rule, cut):
                rebuilt.observe(e)
    [(at, alert)] = judged
    assert alert.scope["agent"] == "quiet" and alert.fired_at == NOV + timedelta(hours=1)
    assert NOV + timedelta(hours=1, minutes=5) <= at < NOV + timedelta(hours=2)
    after = sorted((e for e in events if e.ts >= cut), key=lambda e: e.ts)
    fired = [a for e in after for a in along.observe(e)]
    assert fired == [a for e in after for a in rebuilt.observe(e)] == []
    watch = along.evals[0]
    assert sorted(watch.window_start) == [("acme", "bot"), ("acme", "quiet")]
    assert len(watch.history) <= 2 and len(watch.scores) <= 2
    assert {tenant: list(keys) for tenant, keys in watch.scored.items() if keys} == {
        "acme": [("acme", "bot")]
    }


def _spend_of(tenant: str, agent: str, at: datetime) -> Event:
    """A cent of ``agent``'s spend at ``at``: an event no drift or eval rule reads."""
    return Event(event_id=f"c-{next(_ids)}", kind="cost", ts=at, tenant_id=tenant,
                 agent_id=agent, body=Cost(0.01), enrichment=Enrichment("non_token", "0.01"))  # fmt: skip


@pytest.mark.parametrize("grace", [timedelta(minutes=5), timedelta(minutes=30)])
def test_an_agent_scored_once_a_night_is_judged_when_its_tenants_clock_passes_the_grace(
    grace: timedelta,
) -> None:
    """A nightly eval run: ten poor scores of bot from 02:00, hourly windows, and no more of
    bot's. Its tenant's other agents' events (its clock) judge the window once they pass its
    end and the grace, not at the next night's run, and once; another tenant's do not; a score
    of it that comes after is late, left out."""
    rules = AlertRules(evals=(EvalRule("faithfulness", 0.8),), window_grace=grace)
    evaluator = Evaluator(rules)
    two, three = NOV + timedelta(hours=2), NOV + timedelta(hours=3)
    nightly = [_score(two + timedelta(minutes=m), 0.3) for m in range(10)]
    assert [a for e in nightly for a in evaluator.observe(e)] == []
    assert evaluator.observe(_spend_of("globex", "bot", three + timedelta(hours=1))) == []
    assert evaluator.observe(_spend_of("acme", "other", three + grace - timedelta(seconds=1))) == []
    [alert] = evaluator.observe(_spend_of("acme", "other", three + grace))
    assert (alert.kind, alert.fired_at, alert.scope["agent"]) == ("eval_regression", three, "bot")
    assert "averaged 0.300 over 10 scores" in alert.message
    assert evaluator.observe(_spend_of("acme", "other", three + timedelta(hours=5))) == []
    assert evaluator.late() == {}
    assert evaluator.observe(_score(two + timedelta(minutes=59), 0.3)) == []  # late
    assert evaluator.evals[0].scores == {}
    assert evaluator.late() == {("eval", "acme"): 1}
    # a backtest of the same events judges it at the same time
    others = [_spend_of("acme", "other", three + grace + timedelta(minutes=k)) for k in range(3)]
    assert backtest(rules, nightly + others) == [alert]
    assert backtest(rules, nightly) == []


def test_a_tenants_clock_closes_the_window_before_a_straggler_of_it_is_judged() -> None:
    """Scores of bot from 02:00, then a batch stored at 03:06 of which, in time order, an event
    of 03:06 of another agent comes before a score of bot's of 03:07: two o'clock's window is
    judged on its ten scores, and the score of 03:07 opens three o'clock's; one of 02:59 stored
    after that is late."""
    evaluator = Evaluator(AlertRules(evals=(EvalRule("faithfulness", 0.8),)))
    two, three = NOV + timedelta(hours=2), NOV + timedelta(hours=3)
    assert [
        a for m in range(10) for a in evaluator.observe(_score(two + timedelta(minutes=m), 0.3))
    ] == []
    [alert] = evaluator.observe(_spend_of("acme", "other", three + timedelta(minutes=6)))
    assert alert.fired_at == three and "over 10 scores" in alert.message
    for at in (three + timedelta(minutes=7), two + timedelta(minutes=59)):
        assert evaluator.observe(_score(at, 0.9)) == []
    assert evaluator.evals[0].scores == {("acme", "bot"): (0.9, 1)}


def test_a_drift_monitor_of_a_tenant_whose_samples_stop_judges_their_last_window() -> None:
    """A day of bot's answers about 200 tokens, then an hour about 320, then none: acme's
    spend past that hour and the grace judges it a drift. A monitor pooling every tenant has no
    one clock: its window closes at its next sample (or once the pipeline has caught up, below)."""
    rng = random.Random(21)
    events = _tokens(NOV, 24, 200, 30, rng) + _tokens(NOV + timedelta(days=1), 1, 320, 30, rng)
    end = NOV + timedelta(days=1, hours=1)
    acme = dataclasses.replace(DRIFT, tenant="acme")
    rules = AlertRules(drift=(acme,), window_grace=timedelta(minutes=10))
    assert backtest(rules, events) == []
    assert backtest(rules, [*events, _spend_of("acme", "o", end + timedelta(minutes=9))]) == []
    [alert] = backtest(rules, [*events, _spend_of("acme", "o", end + timedelta(minutes=10))])
    assert (alert.kind, alert.fired_at) == ("drift", end)
    assert "(240 samples against 5760)" in alert.message
    pooled = dataclasses.replace(rules, drift=(DRIFT,))
    assert backtest(pooled, [*events, _spend_of("acme", "o", end + timedelta(minutes=10))]) == []
    # a sample of the hour judged, stored after that: left out of it, and counted
    evaluator = Evaluator(rules)
    for event in [*events, _spend_of("acme", "o", end + timedelta(minutes=10))]:
        evaluator.observe(event)
    assert evaluator.late() == {}
    straggler = dataclasses.replace(events[-1], event_id="straggler")
    assert evaluator.observe(straggler) == []
    assert evaluator.late() == {("drift", "acme"): 1}


def test_a_tenant_that_sends_nothing_more_is_judged_once_the_pipeline_has_caught_up() -> None:
    """Poor scores of acme's bot at 02:00, and nothing of acme after them. A lag sample that
    found nothing left to read (``caught_up``) at 03:00 plus the grace judges the window, once;
    one a second before it does not; a score of it that comes after is late. A drift monitor
    pooling every tenant has its window judged by the same clock."""
    grace = timedelta(minutes=5)
    pooled = dataclasses.replace(DRIFT, baseline_window=timedelta(hours=1))
    rules = AlertRules(evals=(EvalRule("faithfulness", 0.8),), drift=(pooled,), window_grace=grace)
    evaluator = Evaluator(rules)
    two, three = NOV + timedelta(hours=2), NOV + timedelta(hours=3)
    rng = random.Random(5)
    tokens = _tokens(NOV + timedelta(hours=1), 1, 200, 30, rng) + _tokens(two, 1, 320, 30, rng)
    nightly = [_score(two + timedelta(minutes=m), 0.3) for m in range(10)]
    events = sorted([*tokens, *nightly], key=lambda e: e.ts)
    assert [a for e in events for a in evaluator.observe(e)] == []
    assert evaluator.caught_up(three + grace - timedelta(seconds=1)) == []
    fired = evaluator.caught_up(three + grace)
    assert sorted((a.kind, a.fired_at) for a in fired) == [
        ("drift", three),
        ("eval_regression", three),
    ]
    assert evaluator.caught_up(three + grace + timedelta(minutes=1)) == []
    assert evaluator.observe(_score(two + timedelta(minutes=59), 0.3)) == []
    assert evaluator.late() == {("eval", "acme"): 1}


def test_a_drift_monitor_silent_for_a_year_closes_its_empty_windows_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A one-minute monitor's windows a year after its last sample: those with no sample are
    not judged one by one (half a million of them)."""
    monitor = DriftMonitor("output_tokens", "psi", 0.2, timedelta(minutes=1), timedelta(hours=1))
    watch = DriftWatch(monitor)
    closed: list[datetime] = []
    judge = DriftWatch._close

    def counted(self: DriftWatch, start: datetime, end: datetime) -> Any:
        closed.append(start)
        return judge(self, start, end)

    monkeypatch.setattr(DriftWatch, "_close", counted)
    for event in _tokens(NOV, 1, 200, 30, random.Random(2)):
        list(watch.observe(event))
    assert len(closed) == 59
    year = NOV + timedelta(days=365)
    assert list(watch.close_until(year)) == []
    assert closed[59:] == [NOV + timedelta(minutes=59)] and watch.window_start == year
    assert watch.stretches == {}


# A producer whose clock runs 50 minutes fast (validation accepts up to an hour): each test
# below is the arrivals of one rule's events, as (event, when it was stored), in that order.
FAST = timedelta(minutes=50)


def _fired(rules: AlertRules, arrivals: list[tuple[Event, datetime]], stored: bool) -> list[str]:
    """The kinds of alert ``rules`` fire over ``arrivals``, the events taken at their own time
    or (``stored``) as the worker takes them, no later than when they were stored."""
    evaluator = Evaluator(rules)
    return [
        a.kind for e, at in arrivals for a in evaluator.observe(as_stored(e, at) if stored else e)
    ]


def _on_time(events: list[Event]) -> list[tuple[Event, datetime]]:
    return [(e, e.ts) for e in events]


def _score(at: datetime, value: float, agent: str = "bot") -> Event:
    return Event(event_id=f"e-{next(_ids)}", kind="eval", ts=at, tenant_id="acme",
                 agent_id=agent, body=Eval("faithfulness", value))  # fmt: skip


def test_a_fast_clock_does_not_blind_an_eval_rule_to_the_scores_on_time() -> None:
    """At 10:10 a host of bot whose clock runs fast sends a score stamped 11:00. Taken at that
    time, it closed ten o'clock's window with ten good scores and opened eleven's, and every
    poor score after it, on time, was late for a closed window: left out, no regression. Taken
    as of when it was stored, ten o'clock's window has them and regresses."""
    ten = NOV + timedelta(hours=10)
    arrivals = _on_time([_score(ten + timedelta(minutes=i), 0.9) for i in range(10)])
    arrivals.append((_score(ten + timedelta(minutes=10) + FAST, 0.9), ten + timedelta(minutes=10)))
    arrivals += _on_time([_score(ten + timedelta(minutes=11 + i), 0.2) for i in range(40)])
    arrivals += _on_time([_score(ten + timedelta(hours=1, minutes=5), 0.9)])
    rules = AlertRules(evals=(EvalRule("faithfulness", 0.5),))
    assert _fired(rules, arrivals, stored=False) == []
    assert _fired(rules, arrivals, stored=True) == ["eval_regression"]


def test_a_fast_clock_does_not_blind_a_drift_monitor_of_every_agent() -> None:
    """A monitor of every agent's answers: an hour of short ones, then at 12:02 a host of
    triage whose clock runs fast. Taken at its time (12:52) its answer closed the monitor's
    windows up to 12:45, and bot's long answers after it, on time, landed in windows already
    closed: never judged. Taken as of when it was stored, 12:00's window drifts."""
    rng = random.Random(21)
    noon = NOV + timedelta(hours=12)
    arrivals = _on_time(_answers(noon - timedelta(hours=1), [100.0] * 240, rng))
    (fast,) = _answers(noon + timedelta(minutes=2) + FAST, [100.0], rng)
    arrivals.append((dataclasses.replace(fast, agent_id="triage"), noon + timedelta(minutes=2)))
    arrivals += _on_time(
        [e for e in _answers(noon, [1000.0] * 240, rng) if e.ts < noon + timedelta(minutes=15)]
    )
    arrivals += _on_time(_answers(noon + timedelta(minutes=16), [100.0], rng))
    monitor = DriftMonitor("output_tokens", "ks", 0.3, timedelta(minutes=15), timedelta(hours=1))
    assert _fired(AlertRules(drift=(monitor,)), arrivals, stored=False) == []
    assert _fired(AlertRules(drift=(monitor,)), arrivals, stored=True) == ["drift"]


def test_a_fast_clock_does_not_move_a_daily_budget_into_tomorrow() -> None:
    """At 23:20 a fast clock stamps a cent of spend 00:10 tomorrow. Taken at that time, it
    began tomorrow's period, and the $90 spent on time after it was late for today's, which
    had spent $20 of $100: left out, no alert. Taken as of when it was stored, today's budget
    is spent."""
    night = NOV + timedelta(hours=23, minutes=20)
    arrivals = _on_time([_spend(NOV + timedelta(hours=h), 10.0) for h in range(2)])
    arrivals.append((_spend(night + FAST, 0.01), night))
    arrivals += _on_time([_spend(night + timedelta(minutes=1 + i), 10.0) for i in range(9)])
    rules = AlertRules(budgets=(Budget("acme", "day", 100.0),))
    assert _fired(rules, arrivals, stored=False) == []
    assert _fired(rules, arrivals, stored=True) == ["budget_threshold"] * 3


def test_an_event_on_time_or_late_is_taken_at_its_own_time() -> None:
    event = _spend(NOV, 1.0)
    assert as_stored(event, NOV) is event
    assert as_stored(event, NOV + timedelta(days=3)) is event
    assert as_stored(event, NOV - timedelta(seconds=1)).ts == NOV - timedelta(seconds=1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"budgets": [{"period": "month", "limit_usd": 5}]}, "budgets[0].scope: needs a tenant"),
        (
            {"budgets": [{"scope": {"tenant": "a"}, "period": "year", "limit_usd": 5}]},
            "budgets[0].period",
        ),
        ({"budgets": [{"scope": {"tenant": "a"}, "limit_usd": "lots"}]}, "budgets[0].limit_usd"),
        ({"drift": [{"metric": "x", "test": "chi2"}]}, "drift[0].test"),
        ({"drift": [{"metric": "x", "window": "1 hour"}]}, "drift[0].window"),
        ({"evals": [{"metric": "f"}]}, "evals[0].min_score"),
        ({"alerts": {"window_grace": "0m"}}, "alerts.window_grace: expected a duration"),
        (
            {"alerts": {"grace": "5m"}},
            "alerts.grace: unknown setting (known: cooldown, window_grace",
        ),
        ({"drift": [{"metric": "x", "baseline": {"from": "2026-10-01"}}]}, "drift[0].baseline"),
        (
            {"drift": [{"metric": "x", "baseline": {"from": "Oct 1", "to": "2026-10-08"}}]},
            "drift[0].baseline.from: 'Oct 1' is not a date",
        ),
        (
            {"drift": [{"metric": "x", "baseline": {"from": "2026-10-08", "to": "2026-10-01"}}]},
            "drift[0].baseline: from (2026-10-08 00:00 UTC) is not before to (2026-10-01",
        ),
    ],
)
def test_rule_errors_name_the_path(raw: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_rules(raw)


def test_a_pinned_baseline_is_read_in_utc_unless_it_names_its_zone() -> None:
    raw = yaml.safe_load(
        "drift:\n"
        "  - {metric: x, baseline: {from: 2026-10-01, to: '2026-10-08T12:00:00+02:00'}}\n"
        "  - {metric: y, baseline: {from: 2026-10-01 06:00:00-05:00, to: 2026-10-02}}\n"
    )
    first, second = parse_rules(raw).drift
    assert first.baseline_from == datetime(2026, 10, 1, tzinfo=UTC)
    assert first.baseline_to == datetime(2026, 10, 8, 10, tzinfo=UTC)
    # YAML reads an unquoted time with a zone as a datetime of that zone
    assert second.baseline_from == datetime(2026, 10, 1, 11, tzinfo=UTC)
    assert second.baseline_to == datetime(2026, 10, 2, tzinfo=UTC)


def test_backtest_command_prints_alerts_as_json_lines(tmp_path: Path) -> None:
    rng = random.Random(8)
    events = _month([50 + 8 * d for d in range(30)], rng, per_day=6)
    events += _tokens(NOV, 26, 200, 30, rng) + _tokens(NOV + timedelta(hours=26), 3, 330, 30, rng)
    lines = [json.dumps(event_to_json(e)) for e in reversed(events)]
    # lines the worker would reject: skipped with their reasons, not judged nor a traceback
    bad = {"event_id": "b", "ts": NOV.isoformat(), "tenant_id": "acme", "agent_id": "a"}
    lines += [json.dumps({**bad, "kind": "drift", "metric": "output_tokens", "value": float("nan")}),
              json.dumps({**bad, "kind": "cost", "amount": 1e30})]  # fmt: skip
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "vigil.yaml").write_text(
        "budgets:\n  - {scope: {tenant: acme}, period: month, limit_usd: 4000}\n"
        "drift:\n  - {metric: output_tokens, agent: '*', test: psi, threshold: 0.2, "
        "baseline: {window: 1d}}\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "alerts", "backtest", "--events",
         str(tmp_path / "events.jsonl"), "--config", str(tmp_path / "vigil.yaml")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={"PATH": "/usr/bin:/bin", "VIGIL_HOME": str(tmp_path)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    alerts = [json.loads(line) for line in run.stdout.splitlines()]
    kinds = {a["kind"] for a in alerts}
    assert {"budget_forecast", "budget_threshold", "drift"} <= kinds
    for a in alerts:
        assert {"kind", "scope", "fired_at", "metric", "observed", "threshold", "message"} <= set(a)
        assert a["scope"]["tenant"] in ("acme", "*")
    forecast = next(a for a in alerts if a["kind"] == "budget_forecast")
    assert forecast["predicted_breach_at"] > forecast["fired_at"]
    assert "alert(s) from" in run.stderr and "; 2 line(s) skipped" in run.stderr
    assert f"events.jsonl:{len(lines) - 1}: skipped: value: nan is not a finite" in run.stderr
    assert f"events.jsonl:{len(lines)}: skipped: amount: 1e+30 is not below" in run.stderr


def test_backtest_command_sorts_a_long_file_in_runs_and_fires_what_it_held_whole_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file is read as it goes and sorted by time in runs kept in temporary files
    (``spill.in_order``); the alerts are those of the events sorted in memory. A line is a line
    of the file: a JSON string may hold U+2028 unescaped, which ``str.splitlines`` split."""
    from pipeline import spill
    from pipeline.cli import build_parser
    from pipeline.config import load_config
    from pipeline.enrich import enrich
    from pipeline.settings import Settings

    rng = random.Random(9)
    events = _month([50 + 8 * d for d in range(30)], rng, per_day=6)
    events += _tokens(NOV, 26, 200, 30, rng) + _tokens(NOV + timedelta(hours=26), 3, 330, 30, rng)
    events.append(dataclasses.replace(events[0], event_id="sep", attributes={"note": "a\u2028b"}))
    rng.shuffle(events)
    # in the first run, which is spilled
    said = next(e for e in events if e.kind == "interaction")
    text = dataclasses.replace(said.body, input_text="I am Alice Example, 4111 1111 1111 1111")
    events.insert(0, dataclasses.replace(said, event_id="said", body=text))
    # one the worker would refuse as unencodable (a lone surrogate): skipped, as the worker would
    lone = dataclasses.replace(events[0], event_id="lone", attributes={"note": "\ud800"})
    lines = [json.dumps(event_to_json(e), ensure_ascii=False) for e in events]
    lines.insert(100, json.dumps(event_to_json(lone)))
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "vigil.yaml").write_text(
        "budgets:\n  - {scope: {tenant: acme}, period: month, limit_usd: 4000}\n"
        "drift:\n  - {metric: output_tokens, agent: '*', test: psi, threshold: 0.2, "
        "baseline: {window: 1d}}\n"
    )
    config = load_config(tmp_path / "vigil.yaml", {})
    whole = backtest(config.rules, [e if e.enrichment else enrich(e, config.catalog, config.agents)
                                    for e in events])  # fmt: skip
    assert {"budget_forecast", "budget_threshold", "drift"} <= set(_kinds(whole))
    monkeypatch.setattr(spill, "RUN", 500)  # the file's 7,142 events: 14 runs spilled, 1 held
    monkeypatch.setattr(spill, "RUN_CHUNK", 40)
    spilled: list[bytes] = []
    add = spill.Spill.add
    monkeypatch.setattr(spill.Spill, "add", lambda self, item: (spilled.append(item[1]),
                                                              add(self, item))[1])  # fmt: skip

    args = build_parser().parse_args(
        ["alerts", "backtest", "--events", str(tmp_path / "events.jsonl")]
    )
    env = {"VIGIL_HOME": str(tmp_path), "VIGIL_CONFIG": str(tmp_path / "vigil.yaml")}
    assert args.func(args, Settings.from_env(env)) == 0

    out, err = capsys.readouterr()
    assert out.splitlines() == [json.dumps(a.to_json()) for a in whole]
    assert f"{len(whole)} alert(s) from {len(events):,} events (" in err
    # the temporary files hold what the rules read, not what the events' texts say
    assert len(spilled) == 7000 and any(b"said" in body for body in spilled)
    assert not any(b"Alice" in body for body in spilled)
    assert err.count("skipped") == 2  # the line and the summary
    assert "events.jsonl:101: skipped: the event does not fit the event schema" in err


@pytest.mark.parametrize("hour, minute", [(0, 25), (1, 10), (14, 0)])
def test_the_demos_drift_alert_fires_at_any_time_of_day(hour: int, minute: int) -> None:
    """The demo keeps its workload to today after midnight UTC (its daily budget sees it all),
    so its window shrinks, to 22 minutes at 00:25; vigil.yaml's drift rule needs an hour of
    baseline before its window, and no drift alert could fire before 02:03. The drifting
    agent's units of work now go back two hours whatever the window, on top of it."""
    from pipeline import demo
    from pipeline.config import load_config
    from pipeline.enrich import enrich
    from pipeline.workload import generate, published

    config = load_config(Path(__file__).parents[2] / "vigil.yaml", {})
    now = datetime(2026, 12, 5, hour, minute, tzinfo=UTC)
    window = demo._todays_window(now)
    drift = (demo.DRIFT_AGENT, now - demo.DRIFT_SHIFTED)
    workload = generate(4000, now, seed=5, run_id="drift", drift=drift, window=window,
                        drift_history=demo.DRIFT_HISTORY)  # fmt: skip
    alone = generate(4000, now, seed=5, run_id="drift", drift=drift, window=window)
    events, only_window = published(workload), published(alone)

    def text(e: Event) -> str:  # events hold dicts: compared by their JSON
        return json.dumps(event_to_json(e), sort_keys=True)

    # the window's workload is the same; what comes on top is the drifting agent's, earlier
    in_window = {text(e) for e in only_window}
    added = [e for e in events if text(e) not in in_window]
    assert len(added) == len(events) - len(only_window)
    assert added if window < demo.DRIFT_HISTORY else not added
    assert {e.agent_id for e in added} <= {demo.DRIFT_AGENT}
    assert all(now - demo.DRIFT_HISTORY <= e.ts < now - window + timedelta(minutes=3)
               for e in added)  # fmt: skip
    stored = [enrich(e, config.catalog, config.agents) for e in events]
    drifts = [a for a in backtest(config.rules, stored) if a.kind == "drift"]
    assert drifts and drifts[0].scope.get("agent") == demo.DRIFT_AGENT, drifts
    assert drifts[0].fired_at >= drift[1], drifts
