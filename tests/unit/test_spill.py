"""Items spilled to temporary files: read back in the order written, or sorted in runs and
merged, as ``sorted`` would order them; the files closed when done or given up."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from typing import IO, Any

import pytest

from pipeline.spill import Spill, in_order


@pytest.fixture
def open_spills(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """A count of the spill files made during a test and not closed yet. Every file made is
    held here, so one a spill dropped without closing is still counted (the collector would
    have closed it). The process's descriptors are not what is counted: chDB's threads in this
    process hold three /proc files each (some 2,400 in all after the integration tests), and
    its pools start and end threads while a test counts."""
    made: list[IO[bytes]] = []
    make = tempfile.TemporaryFile

    def tracked(*args: Any, **kwargs: Any) -> IO[bytes]:
        made.append(make(*args, **kwargs))
        return made[-1]

    def count() -> int:
        made[:] = [file for file in made if not file.closed]
        return len(made)

    monkeypatch.setattr(tempfile, "TemporaryFile", tracked)
    return count


def test_a_spill_reads_back_what_was_added_in_chunks_and_in_order() -> None:
    with Spill[tuple[str, int]]("vigil-test-", chunk=4) as spill:
        for i in range(10):
            spill.add(("item", i))
        assert spill.count == 10
        chunks = list(spill.chunks())
        with pytest.raises(ValueError, match="added to a spill before it is read"):
            spill.add(("late", 0))
        with pytest.raises(ValueError, match="read once"):
            next(spill.chunks())
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert [i for chunk in chunks for _, i in chunk] == list(range(10))


@pytest.mark.parametrize(
    "n, run, fan_in",
    [(0, 5, 64), (4, 5, 64), (5, 5, 64), (23, 5, 64), (1000, 37, 64), (1000, 7, 2),
     (1000, 3, 5), (45, 5, 3)],
)  # fmt: skip
def test_in_order_sorts_as_sorted_does_keeping_equal_keys_in_the_order_given(
    n: int, run: int, fan_in: int, open_spills: Callable[[], int]
) -> None:
    rng = random.Random(n)
    items = [(rng.randrange(10), i) for i in range(n)]  # many equal keys
    before = open_spills()
    ordered = list(
        in_order(iter(items), lambda item: item[0], "vigil-test-", run, chunk=3, fan_in=fan_in)
    )
    assert ordered == sorted(items, key=lambda item: item[0])
    assert open_spills() == before


def test_in_order_keeps_its_open_files_within_fan_in_a_level(
    open_spills: Callable[[], int],
) -> None:
    """2,000 runs of 5 merged 4 at a time: at most 3 left open on each of the 6 levels (4^6 is
    4,096 runs), and 4 more while a merge writes; one file a run would have opened 2,000."""
    rng = random.Random(7)
    items = [(rng.randrange(100), i) for i in range(10_000)]
    before = open_spills()
    most = 0

    def counted(item: tuple[int, int]) -> int:
        nonlocal most
        most = max(most, open_spills() - before)
        return item[0]

    ordered = list(in_order(iter(items), counted, "vigil-test-", run=5, chunk=2, fan_in=4))
    assert ordered == sorted(items, key=lambda item: item[0])
    assert 4 <= most <= 3 * 6 + 4
    assert open_spills() == before


def test_in_order_merges_at_least_two_runs_at_a_time() -> None:
    with pytest.raises(ValueError, match="at least two at a time, not 1"):
        list(in_order([3, 1, 2], lambda i: i, "vigil-test-", run=1, fan_in=1))


def test_in_order_closes_its_runs_files_when_given_up(open_spills: Callable[[], int]) -> None:
    before = open_spills()
    ordered = in_order(range(95, 0, -1), lambda i: i, "vigil-test-", run=10, chunk=4)
    assert [next(ordered) for _ in range(3)] == [1, 2, 3]
    assert open_spills() == before + 9  # nine runs spilled, the last five still held
    ordered.close()
    assert open_spills() == before
