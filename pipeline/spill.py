"""Items kept on disk while a command reads more of them than memory should hold: ``Spill``
writes them to a temporary file in chunks, pickled and compressed, and reads them back in the
order written; ``in_order`` sorts any number of them that way, in sorted runs spilled and then
merged. ``vigil cost reprice`` holds its adjustments in one until every one is priced, and
``vigil alerts backtest`` sorts its events by time with the other."""

from __future__ import annotations

import gzip
import heapq
import itertools
import pickle
import tempfile
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import ExitStack
from types import TracebackType
from typing import Any, Generic, TypeVar

T = TypeVar("T")
CHUNK = 10_000  # items pickled together: a chunk is what one read of a spill holds
# ``in_order``: the items it sorts in memory before it spills them, the chunk of each run a
# merge holds, and the runs merged at a time. It holds at most FAN_IN - 1 runs open at each
# level of merging, their files and a chunk of each (one level up to 6.4 million items, two
# up to 819 million): a pass more over the items for each level past the first
RUN = 50_000
RUN_CHUNK = 500
FAN_IN = 128


class Spill(Generic[T]):
    """Items ``add``-ed to a temporary file, in chunks of ``chunk``; ``chunks()`` reads them
    back, in order, once every one has been added. Closing deletes the file."""

    def __init__(self, prefix: str, chunk: int = CHUNK) -> None:
        self._file = tempfile.TemporaryFile(prefix=prefix)  # noqa: SIM115 (closed by close)
        self._out: gzip.GzipFile | None = gzip.GzipFile(
            fileobj=self._file, mode="wb", compresslevel=1
        )
        self._chunk = chunk
        self._pending: list[T] = []
        self._written = 0  # chunks
        self.count = 0  # items

    def add(self, item: T) -> None:
        if self._out is None:
            raise ValueError("items are added to a spill before it is read")
        self._pending.append(item)
        self.count += 1
        if len(self._pending) == self._chunk:
            self._dump()

    def _dump(self) -> None:
        assert self._out is not None
        pickle.dump(self._pending, self._out, protocol=pickle.HIGHEST_PROTOCOL)
        self._written += 1
        self._pending = []

    def chunks(self) -> Iterator[list[T]]:
        """The items added, a chunk at a time. Reads the file once."""
        if self._out is None:
            raise ValueError("a spill is read once")
        if self._pending:
            self._dump()
        self._out.close()
        self._out = None
        self._file.seek(0)
        with gzip.GzipFile(fileobj=self._file, mode="rb") as held:
            for _ in range(self._written):
                yield pickle.load(held)

    def __iter__(self) -> Iterator[T]:
        for chunk in self.chunks():
            yield from chunk

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        self._file.close()

    def __enter__(self) -> Spill[T]:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def in_order(
    items: Iterable[T],
    key: Callable[[T], Any],
    prefix: str,
    run: int | None = None,
    chunk: int | None = None,
    fan_in: int = FAN_IN,
) -> Generator[T, None, None]:
    """``items`` sorted by ``key``, as ``sorted`` sorts them (items of equal keys in the order
    given), with at most ``run`` (``RUN``) of them held while reading: each ``run`` read is
    sorted and spilled (``Spill``, in chunks of ``chunk``, ``RUN_CHUNK``), and the runs merged
    as they are read back, a chunk of each held. Each run is a temporary file, open until it is
    merged or the iterator ends or is closed, then deleted. Every ``fan_in`` runs of a size are
    merged into one run ``fan_in`` times longer as they come, so that the files open and the
    chunks held stay within ``fan_in`` a level, however many items there are (with every run
    open until the end, 51 million items took more files than the open-file limit many
    systems set by default, 1,024)."""
    if fan_in < 2:
        raise ValueError(f"runs are merged at least two at a time, not {fan_in}")
    run, chunk = run or RUN, chunk or RUN_CHUNK
    with ExitStack() as files:
        # levels[0]: the runs sorted in memory; levels[i + 1]: runs of fan_in of levels[i]
        # merged. Each level's runs are in the order read, and every run of a level was read
        # before any of the level below: merging them in that order keeps equal keys in order
        levels: list[list[Spill[T]]] = []

        def spilled(ordered: Iterable[T]) -> Spill[T]:
            spill = files.enter_context(Spill[T](prefix, chunk))
            for each in ordered:
                spill.add(each)
            return spill

        held: list[T] = []
        for item in items:
            held.append(item)
            if len(held) < run:
                continue
            held.sort(key=key)
            spill, held = spilled(held), []
            for level in itertools.count():
                if level == len(levels):
                    levels.append([])
                levels[level].append(spill)
                if len(levels[level]) < fan_in:
                    break
                merging, levels[level] = levels[level], []
                spill = spilled(heapq.merge(*merging, key=key))
                for each in merging:
                    each.close()
        held.sort(key=key)
        if not levels:
            yield from held
            return
        # the oldest runs first, the last items read still held: heapq.merge keeps items of
        # equal keys in the order of the iterables given
        yield from heapq.merge(*itertools.chain(*reversed(levels)), held, key=key)
