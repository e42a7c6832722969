"""A store worker's alert state across assignments (``pipeline.alerting.HeldAlerts``): the
ledger writes nothing of a generation before its state is rebuilt, and events written in an
earlier generation are left to the replay of the current one. The rebuild is played here by
a coroutine that waits for a test's word; the worker's, which reads the ledger, is tested in
tests/integration/test_alert_state.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from pipeline import alerting
from pipeline.alerting import HeldAlerts, Superseded
from pipeline.alerts import AlertRules, Budget, EvalRule, Evaluator
from pipeline.events import Cost, Enrichment, Eval, Event

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
RULES = AlertRules(budgets=(Budget("acme", "month", 10.0),))


def _spend(usd: float, n: int = 1) -> list[Event]:
    return [
        Event(
            event_id=f"c-{usd}-{i}",
            kind="cost",
            ts=NOW,
            tenant_id="acme",
            agent_id="bot",
            body=Cost(usd),
            enrichment=Enrichment("non_token", f"{usd:.2f}"),
        )
        for i in range(n)
    ]


class _Rebuilds:
    """The rebuilds asked for, each finished when the test sets its ``asyncio.Event``, with an
    evaluator that has seen ``replayed`` dollars of acme's spend (or raises ``failure``); and
    each one's ``superseded``."""

    def __init__(self) -> None:
        self.asked: list[tuple[frozenset[int], asyncio.Event]] = []
        self.superseded: list[Callable[[], bool]] = []
        self.replayed = 0.0
        self.failure: Exception | None = None

    async def __call__(
        self, partitions: frozenset[int], superseded: Callable[[], bool]
    ) -> Evaluator:
        done = asyncio.Event()
        self.asked.append((partitions, done))
        self.superseded.append(superseded)
        await done.wait()
        if self.failure is not None:
            raise self.failure
        evaluator = Evaluator(RULES)
        for event in _spend(self.replayed):
            evaluator.observe(event)
        return evaluator


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _rebuilt(rebuilds: _Rebuilds) -> HeldAlerts:
    """Alert state assigned partition 0 in generation 1, rebuilt with ``rebuilds.replayed``."""
    held = HeldAlerts(rebuilds)
    held.assigned(1, [0])
    await _settle()
    rebuilds.asked[0][1].set()
    await held.ready(1)
    return held


def test_writes_of_a_generation_wait_until_its_alert_state_is_rebuilt() -> None:
    async def run() -> tuple[bool, bool, list[float]]:
        rebuilds = _Rebuilds()
        held = HeldAlerts(rebuilds)
        waiting = asyncio.create_task(held.ready(3))  # fetched in 3 before its assignment
        await asyncio.sleep(0.2)
        before_assigned = waiting.done()
        held.assigned(3, [2, 0])
        await asyncio.sleep(0.2)
        while_rebuilding = waiting.done()
        assert [p for p, _ in rebuilds.asked] == [frozenset({0, 2})]
        rebuilds.replayed = 4.0  # the ledger's history: $4 of acme's $10
        rebuilds.asked[0][1].set()
        await asyncio.wait_for(waiting, 2.0)
        # $1 more crosses half the budget: the replayed $4 counted, the $1 once
        fired = held.observe(_spend(1.0), 3)
        return before_assigned, while_rebuilding, [a.threshold for a in fired]

    before_assigned, while_rebuilding, thresholds = asyncio.run(run())
    assert not before_assigned and not while_rebuilding
    assert thresholds == [5.0]


def test_events_are_judged_no_later_than_when_they_were_stored() -> None:
    """A batch stored at noon with an event stamped 50 minutes later (a producer's clock
    running fast): it is judged as of noon, as the ledger's replay takes it, so the budget's
    level fires at noon, not in the future."""

    async def run() -> list[tuple[float, datetime]]:
        held = await _rebuilt(_Rebuilds())
        (fast,) = _spend(5.0)
        fast = dataclasses.replace(fast, ts=NOW + timedelta(minutes=50))
        return [(a.threshold, a.fired_at) for a in held.observe([fast], 1, NOW)]

    assert asyncio.run(run()) == [(5.0, NOW)]


def test_events_written_in_an_earlier_generation_are_left_to_the_current_replay() -> None:
    async def run() -> tuple[list[float], list[float], list[float], bool]:
        rebuilds = _Rebuilds()
        held = await _rebuilt(rebuilds)
        held.observe(_spend(4.0), 1)  # $4 stored in generation 1
        # $1 more lands in generation 1; before it is evaluated, generation 2 begins, and its
        # replay reads both
        held.assigned(2, [0])
        await _settle()
        rebuilds.replayed = 5.0
        rebuilds.asked[1][1].set()
        await held.ready(2)
        late = held.observe(_spend(1.0), 1)
        below = held.observe(_spend(2.0), 2)  # $7
        crossing = held.observe(_spend(1.0), 2)  # $8: the 80% level
        # a batch of generation 1 still waiting to be written: ready at once, the fence moves it
        stale = asyncio.create_task(held.ready(1))
        await _settle()
        return (
            [a.threshold for a in late],
            [a.threshold for a in below],
            [a.threshold for a in crossing],
            stale.done(),
        )

    late, below, crossing, stale_ready = asyncio.run(run())
    # without the generation check, the late $1 counted twice: 80% fired at $7
    assert late == [] and below == []
    assert crossing == [8.0]
    assert stale_ready


def test_a_rebuild_overtaken_by_a_later_assignment_is_given_up() -> None:
    async def run() -> tuple[bool, list[float], list[bool]]:
        rebuilds = _Rebuilds()
        held = HeldAlerts(rebuilds)
        held.assigned(1, [0, 1])
        await _settle()
        held.assigned(2, [1])  # before the first rebuild returned
        await _settle()
        rebuilds.asked[0][1].set()  # generation 1's, with nothing replayed
        await _settle()
        waiting = asyncio.create_task(held.ready(2))
        await asyncio.sleep(0.2)
        still_waiting = not waiting.done()
        rebuilds.replayed = 4.0
        rebuilds.asked[1][1].set()
        await asyncio.wait_for(waiting, 2.0)
        given_up = [superseded() for superseded in rebuilds.superseded]
        return still_waiting, [a.threshold for a in held.observe(_spend(1.0), 2)], given_up

    still_waiting, thresholds, given_up = asyncio.run(run())
    assert still_waiting  # generation 1's state did not stand in for generation 2's
    assert thresholds == [5.0]  # generation 2's replay: $4 + $1
    assert given_up == [True, False]  # told to stop: generation 1's, not generation 2's


def test_a_burst_of_assignments_replays_the_ledger_once_to_its_end() -> None:
    """On one ClickHouse thread, as in the worker: generation 1's replay is running when 2
    and 3 are assigned. It stops at its next look, 2's never starts, and 3's runs to its end.
    Before, each ran to its end, and the writes of 3 waited for all three."""
    executor = ThreadPoolExecutor(max_workers=1)
    began: list[frozenset[int]] = []
    ended: list[frozenset[int]] = []
    running = threading.Event()

    async def rebuild(partitions: frozenset[int], superseded: Callable[[], bool]) -> Evaluator:
        def replay() -> Evaluator:
            began.append(partitions)
            running.set()
            for _ in range(100):  # a second of history, looked at every 10 ms
                if superseded():
                    raise Superseded("a newer assignment")
                time.sleep(0.01)
            ended.append(partitions)
            return Evaluator(RULES)

        return await asyncio.get_running_loop().run_in_executor(executor, replay)

    async def run() -> None:
        held = HeldAlerts(rebuild)
        held.assigned(1, [0])
        await asyncio.to_thread(running.wait, 5.0)
        held.assigned(2, [1])
        held.assigned(3, [0, 1])
        await asyncio.wait_for(held.ready(3), 10.0)

    try:
        asyncio.run(run())
    finally:
        executor.shutdown()
    assert began == [frozenset({0}), frozenset({0, 1})]
    assert ended == [frozenset({0, 1})]


def test_giving_the_partitions_up_stops_their_rebuild() -> None:
    """A rebalance's revocation (or the worker's stop) gives the rebuild in progress up; the
    writes waiting for it wait for the next assignment's."""

    async def run() -> tuple[bool, bool, bool]:
        rebuilds = _Rebuilds()
        held = HeldAlerts(rebuilds)
        held.assigned(4, [0])
        waiting = asyncio.create_task(held.ready(4))
        await _settle()
        held.revoked()
        await asyncio.sleep(0.2)
        told, after_revoked = rebuilds.superseded[0](), waiting.done()
        held.assigned(5, [0])
        await _settle()
        rebuilds.asked[1][1].set()
        await asyncio.wait_for(waiting, 2.0)
        return told, after_revoked, rebuilds.superseded[1]()

    told, after_revoked, next_told = asyncio.run(run())
    assert told and not after_revoked and not next_told


def test_a_rebuild_that_fails_fails_the_writes_waiting_for_it() -> None:
    async def run() -> None:
        rebuilds = _Rebuilds()
        rebuilds.failure = RuntimeError("the ledger's history could not be read")
        held = HeldAlerts(rebuilds)
        held.assigned(1, [0])
        waiting = asyncio.create_task(held.ready(1))
        await _settle()
        rebuilds.asked[0][1].set()
        await asyncio.wait_for(waiting, 2.0)

    with pytest.raises(RuntimeError, match="could not be read"):
        asyncio.run(run())


def test_late_samples_are_counted_as_stored_not_as_replayed_and_said_once_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scores of a window judged before they were stored are left out of it: the worker counts
    them for its metrics, across assignments, and warns; the replay's own stragglers (counted
    by the worker that stored them) are not counted again."""
    rules = AlertRules(evals=(EvalRule("faithfulness", 0.8),))
    ids = iter(range(1_000))

    def score(at: datetime) -> Event:
        return Event(event_id=f"s-{next(ids)}", kind="eval", ts=at, tenant_id="acme",
                     agent_id="bot", body=Eval("faithfulness", 0.9))  # fmt: skip

    async def rebuild(partitions: frozenset[int], superseded: Callable[[], bool]) -> Evaluator:
        evaluator = Evaluator(rules)
        for at in (NOW, NOW + timedelta(hours=2), NOW + timedelta(minutes=10)):  # a straggler
            evaluator.observe(score(at))
        assert evaluator.late() == {("eval", "acme"): 1}
        return evaluator

    async def run() -> list[dict[tuple[str, str], int]]:
        held = HeldAlerts(rebuild)
        held.assigned(1, [0])
        await held.ready(1)
        seen = [dict(held.late())]
        held.observe([score(NOW + timedelta(minutes=20))], 1)  # the 12:00 window was judged
        seen.append(dict(held.late()))
        held.observe([score(NOW + timedelta(minutes=30)), score(NOW + timedelta(hours=2))], 1)
        seen.append(dict(held.late()))
        held.assigned(2, [0])
        await held.ready(2)
        seen.append(dict(held.late()))  # carried over the new generation's replay
        monkeypatch.setattr(alerting, "LATE_SAID_SECONDS", 0.0)
        held.observe([score(NOW + timedelta(minutes=40))], 2)
        seen.append(dict(held.late()))
        return seen

    with caplog.at_level(logging.WARNING, logger="vigil.alerts"):
        seen = asyncio.run(run())
    late = ("eval", "acme")
    assert seen == [{}, {late: 1}, {late: 2}, {late: 2}, {late: 3}]
    said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(said) == 2  # at the first, not at the next within the minute, then again
    assert said[0].startswith("1 drift sample(s) or eval score(s) came after their window")
    assert "eval acme 1)" in said[0] and "window_grace (300 s)" in said[0]
    assert said[1].startswith("2 drift") and "eval acme 3)" in said[1]  # 2 since the first


def test_a_lag_sample_that_found_the_pipeline_caught_up_judges_quiet_windows() -> None:
    """Poor scores of acme's bot in the 12:00 window and nothing of acme after them: a lag
    sample that found nothing left to read at 13:05 judges the window, once; none while the
    state is rebuilt (the replay, or the next sample, tells the rebuilt state)."""
    rules = AlertRules(evals=(EvalRule("faithfulness", 0.8, min_samples=3),))
    scores = [
        Event(event_id=f"q-{m}", kind="eval", ts=NOW + timedelta(minutes=m), tenant_id="acme",
              agent_id="bot", body=Eval("faithfulness", 0.3))
        for m in range(3)
    ]  # fmt: skip
    built = asyncio.Event()

    async def rebuild(partitions: frozenset[int], superseded: Callable[[], bool]) -> Evaluator:
        await built.wait()
        return Evaluator(rules)

    async def run() -> tuple[list[datetime], ...]:
        held = HeldAlerts(rebuild)
        held.assigned(1, [0])
        rebuilding = held.caught_up(NOW + timedelta(hours=2))
        built.set()
        await held.ready(1)
        assert held.observe(scores, 1) == []
        at = NOW + timedelta(hours=1, minutes=5)
        early = held.caught_up(at - timedelta(seconds=1))
        quiet = held.caught_up(at)
        again = held.caught_up(at + timedelta(minutes=1))
        return tuple([a.fired_at for a in fired] for fired in (rebuilding, early, quiet, again))

    assert asyncio.run(run()) == ([], [], [NOW + timedelta(hours=1)], [])


WATCHED = [("g-validate", "raw"), ("g", "clean")]


def _sample(
    at: datetime, raw: list[tuple[int, int]], clean: list[tuple[int, int]], dlq: int = 0
) -> list[tuple[object, ...]]:
    """A lag sample's rows (``lag.LAG_COLUMNS``): (committed, end) for each partition of raw
    and of clean, and the DLQ's lag."""
    made = [
        (at, "g-validate", "raw", p, done, end, end - done) for p, (done, end) in enumerate(raw)
    ]
    made += [(at, "g", "clean", p, done, end, end - done) for p, (done, end) in enumerate(clean)]
    return [*made, (at, "g", "dlq", 0, 0, dlq, dlq)]


def test_a_lag_sample_with_nothing_left_to_read_shows_its_own_time() -> None:
    """Every partition of raw and of clean committed to its end: every event sent before the
    sample has been evaluated. The DLQ's lag does not matter; a sample missing a topic shows
    nothing, nor one with a partition behind, nor a time no later than one shown before."""
    clock = alerting.CaughtUp(WATCHED)
    assert clock.sample(_sample(NOW, [], [(5, 5)])) is None  # no raw topic yet
    assert clock.sample(_sample(NOW, [(5, 5), (3, 3)], [(5, 5)], dlq=7)) == NOW
    clock.told(NOW)
    assert clock.at == NOW
    assert clock.sample(_sample(NOW, [(5, 5), (3, 3)], [(5, 5)])) is None  # nothing later
    later = NOW + timedelta(seconds=30)
    assert alerting.CaughtUp(WATCHED).sample(_sample(later, [(5, 5), (3, 4)], [(5, 5)])) is None
    assert alerting.CaughtUp(WATCHED).sample(_sample(later, [(5, 5)], [(5, 5), (1, 3)])) is None


def test_under_steady_traffic_the_samples_show_the_time_of_the_sample_two_before() -> None:
    """No sample finds every partition at its end (events keep coming), but each commits what
    the one before found appended: the third sample shows the first's time: raw's commits of
    the second reach raw's ends of the first (validated, its clean records appended), and
    clean's commits of the third reach clean's ends of the second (those records evaluated).
    A pipeline that stops committing shows nothing more; once it commits again, the times of
    the samples it reached."""
    clock = alerting.CaughtUp(WATCHED)
    at = [NOW + timedelta(seconds=30 * i) for i in range(7)]

    def told(shown: datetime | None) -> datetime | None:
        if shown is not None:
            clock.told(shown)
        return shown

    assert told(clock.sample(_sample(at[0], [(90, 100)], [(80, 95)]))) is None
    assert told(clock.sample(_sample(at[1], [(100, 110)], [(94, 104)]))) is None  # not clean
    assert told(clock.sample(_sample(at[2], [(110, 120)], [(104, 114)]))) == at[0]
    assert told(clock.sample(_sample(at[3], [(120, 130)], [(114, 124)]))) == at[1]
    assert told(clock.sample(_sample(at[4], [(120, 140)], [(124, 124)]))) == at[2]  # raw stalls
    assert told(clock.sample(_sample(at[5], [(120, 150)], [(124, 124)]))) is None
    # raw commits past the ends of at[5]; clean reaches what at[5] found appended to clean
    assert told(clock.sample(_sample(at[6], [(150, 150)], [(130, 130)]))) == at[6]


def test_a_caught_up_time_not_told_is_shown_again_until_a_later_one_is_told() -> None:
    """The worker tells the clock of a time once it stored it; one it could not store (the
    store away) comes back at the next sample, even one that shows nothing new (a stall), and
    gives way to a later time shown meanwhile; once told, neither comes back."""
    clock = alerting.CaughtUp(WATCHED)
    at = [NOW + timedelta(seconds=30 * i) for i in range(4)]
    assert clock.sample(_sample(at[0], [(5, 5)], [(5, 5)])) == at[0]  # not stored
    assert clock.sample(_sample(at[1], [(5, 9)], [(5, 5)])) == at[0]  # a stall: again
    assert clock.sample(_sample(at[2], [(9, 9)], [(7, 7)])) == at[2]  # later, also not stored
    assert clock.sample(_sample(at[3], [(9, 12)], [(7, 7)])) == at[2]
    clock.told(at[2])
    assert clock.at == at[2]
    assert clock.sample(_sample(at[3], [(9, 12)], [(7, 7)])) is None


def test_samples_of_a_topic_since_made_again_hold_the_clock_no_longer() -> None:
    """The pipeline is behind when raw and clean are deleted and made again: the samples before
    found ends no commit will reach now. Those a later sample finds the topic ending short of,
    or without a partition they found, are forgotten, and the samples after show the time."""
    at = [NOW + timedelta(seconds=30 * i) for i in range(4)]
    clock = alerting.CaughtUp(WATCHED)
    assert clock.sample(_sample(at[0], [(90, 100), (50, 60)], [(80, 95)])) is None
    assert clock.sample(_sample(at[1], [(95, 110), (55, 70)], [(85, 99)])) is None
    assert clock.sample(_sample(at[2], [(3, 3), (1, 1)], [(2, 2)])) == at[2]  # both made again
    clock.told(at[2])
    assert clock.sample(_sample(at[3], [(3, 9), (1, 1)], [(2, 2)])) is None  # behind again
    assert clock.sample(_sample(at[3], [(9, 9), (1, 1)], [(6, 6)])) == at[3]
    # raw made again with one partition, already past where partition 0 ended before
    clock = alerting.CaughtUp(WATCHED)
    assert clock.sample(_sample(at[0], [(90, 100), (50, 60)], [(80, 95)])) is None
    assert clock.sample(_sample(at[1], [(120, 120)], [(95, 95)])) == at[1]
