"""The worker's progress line: totals since start, rates since the last line, quiet when idle."""

from __future__ import annotations

import threading

import pytest

from pipeline.progress import COUNTS, Every, Progress
from tests.conftest import Clock


def test_a_line_says_the_totals_and_the_rates_since_the_last_line() -> None:
    clock = Clock(100.0)
    progress = Progress(clock)
    progress.add({"validated": 75, "clean": 50, "to the DLQ": 25})
    progress.add({"stored": 48, "repeats dropped": 2})
    progress.add({"dead letters stored": 25})
    clock.now += 30
    assert progress.line() == (
        "progress: 75 validated (50 clean, 25 to the DLQ), 48 stored (2 repeats dropped), "
        "25 dead letters stored; last 30s: 2.5 validated/s, 1.6 stored/s"
    )
    progress.add({"validated": 1_000, "clean": 1_000})
    progress.add({"stored": 2_000})
    clock.now += 10
    assert progress.line() == (
        "progress: 1,075 validated (1,050 clean, 25 to the DLQ), 2,048 stored "
        "(2 repeats dropped), 25 dead letters stored; last 10s: 100.0 validated/s, "
        "200.0 stored/s"
    )
    progress.add({"stored": 5})
    clock.now += 5
    assert progress.line() == (
        "progress: 1,075 validated (1,050 clean, 25 to the DLQ), 2,053 stored "
        "(2 repeats dropped), 25 dead letters stored; last 5s: 1.0 stored/s"
    )


def test_an_idle_worker_says_nothing_until_it_stops() -> None:
    clock = Clock(100.0)
    progress = Progress(clock)
    clock.now += 30
    assert progress.line() is None
    assert progress.line(final=True) is None  # nothing at all was done
    progress.add({"stored": 10})
    assert progress.line() is not None
    clock.now += 30
    assert progress.line() is None
    assert progress.line(final=True) == "stopped after 10 stored"  # no rate: nothing moved


def test_a_role_says_only_what_it_counts() -> None:
    progress = Progress(Clock(100.0))
    progress.add({"validated": 3, "clean": 3})
    line = progress.line(final=True)
    assert line is not None
    assert "stored" not in line and "DLQ" not in line and "handed" not in line
    assert line.startswith("stopped after 3 validated (3 clean)")


def test_tracked_counts_are_read_when_a_line_is_made() -> None:
    progress = Progress(Clock(100.0))
    held = {"taken": 0, "missed": 0}
    progress.track(lambda: {"handed over": held["taken"], "decoded again": held["missed"]})
    held.update(taken=40, missed=2)
    assert progress.line() == "progress: 40 handed over (2 decoded again)"
    assert progress.totals()["handed over"] == 40
    held["taken"] = 41
    assert progress.line() == "progress: 41 handed over (2 decoded again)"


def test_a_count_not_known_is_an_error_not_a_silent_new_one() -> None:
    progress = Progress(Clock(100.0))
    with pytest.raises(KeyError):
        progress.add({"storred": 1})
    assert set(progress.totals()) == set(COUNTS)
    progress.track(lambda: {"handed out": 1})
    with pytest.raises(KeyError):
        progress.line()
    with pytest.raises(KeyError):
        progress.totals()  # what /metrics reads: the same error, not a new count


def test_counts_added_from_many_threads_are_all_kept() -> None:
    progress = Progress(Clock(100.0))

    def add() -> None:
        for _ in range(10_000):
            progress.add({"stored": 1, "repeats dropped": 1})

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert progress.totals()["stored"] == progress.totals()["repeats dropped"] == 40_000


def test_a_commands_progress_line_is_due_once_each_interval() -> None:
    clock = Clock()
    every = Every(2.0, clock)
    assert not every.due()  # none at once: the command has only begun
    clock.now += 1.9
    assert not every.due()
    clock.now += 0.1
    assert every.due()
    assert not every.due()  # the wait starts again from the line said
    clock.now += 5.0
    assert every.due()
