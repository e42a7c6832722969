"""The in-process hand-off from validate to the ledger, in a worker that runs both (``--role all``).

The ledger stores what it reads on the clean topic, and it decodes every event there: a split
worker's store process never saw them. A worker that runs both stages has just built each of
those events itself, so validate leaves the Event beside the exact bytes it published, and the
ledger takes it instead of decoding the same bytes again (decoding and rebuilding the events
took 14% of one process's samples: docs/benchmarks.md, "The hand-off and the clean encode").

It is a shortcut, not a channel. The ledger still reads, stores and acknowledges the clean
topic, so what is stored and when offsets move do not change. An event the hand-off does not
hold is decoded as before: after a restart, on a clean partition another worker reads, or
dropped because the ledger fell behind by more than the hand-off keeps. The bytes decode to
the event they were encoded from (tests/unit/test_handoff.py checks the rows and their hashes
on the demo workload), so the ledger stores the same row either way.

While a backlog drains, validate runs ahead of the ledger. Left alone, it ran past the
hand-off within seconds, and the ledger decoded 37% of a 240,000-event backlog again
(docs/benchmarks.md, "The hand-off waits for the ledger"). So validate waits for room
(``wait_for_room``) while the ledger is taking events, and only then: a ledger that takes none
(its ClickHouse down, say) holds validate up for at most ``PATIENCE_SECONDS``. Events that went
to clean partitions another worker's ledger reads are dropped once this ledger has taken some
put ``PASSED_SECONDS`` after them, so they do not fill the hand-off meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable

from pipeline.events import Event

# At most this many events and this many bytes of them (as published) are held. What validate
# publishes past these limits (when it does not wait: above) is not held, so that what is held
# is what the ledger reads next. An event held MAX_AGE_SECONDS was published to a clean
# partition that another worker reads, and is dropped. A held event costs about 1.2 KB besides
# its bytes (the demo workload's), so 20,000 cost about 30 MB; prompts with retrieved context
# make events of 50-100 KB, which the byte limit bounds.
MAX_EVENTS = 20_000
MAX_BYTES = 16 * 1024 * 1024
MAX_AGE_SECONDS = 30.0
# An event still held this long after one put later was taken went to a clean partition that
# another worker's ledger reads (when several workers of the ``all`` role share a ClickHouse
# server), and is dropped: otherwise such events would fill the hand-off for MAX_AGE_SECONDS
# while validate waited for room. A ledger reads its partitions about in step (a drain's
# batches hold events put within a second of each other), so its own events are not dropped.
PASSED_SECONDS = 2.0
# How long after the ledger's last take validate still waits for room: longer than the ledger
# spends between two batches (an insert and the next batch's delivery, about a second)
PATIENCE_SECONDS = 5.0
WAIT_STEP_SECONDS = 0.01


class HandOff:
    """Events by the wire bytes they were published as. Validate ``put``s them on the event
    loop, the ledger ``take``s them on its ClickHouse thread; neither call blocks (validate
    waits for room before a batch, through ``wait_for_room``). ``clock``: seconds, monotonic."""

    def __init__(
        self,
        max_events: int = MAX_EVENTS,
        max_bytes: int = MAX_BYTES,
        max_age: float = MAX_AGE_SECONDS,
        passed: float = PASSED_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._held: dict[bytes, tuple[float, Event]] = {}  # in the order put, oldest first
        self._bytes = 0
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_age = max_age
        self._passed = passed
        self._clock = clock
        self._lock = threading.Lock()
        self.taken = 0  # events the ledger did not have to decode
        self.missed = 0
        # when the ledger last took an event held (a retried batch finds its events gone, so a
        # ledger that retries an insert does not count as taking them)
        self._last_take: float | None = None
        self._ledger_at: float | None = None  # when the newest event the ledger took was put

    def __len__(self) -> int:
        return len(self._held)

    def put(self, published: Iterable[tuple[bytes, Event]]) -> None:
        """Hold each (wire bytes, event) just published, in order, while the limits allow; first
        drop what no ledger here will take (``_drop_stale``)."""
        now = self._clock()
        with self._lock:
            self._drop_stale(now)
            held = self._held
            for value, event in published:
                if len(held) >= self._max_events or self._bytes + len(value) > self._max_bytes:
                    break
                if value not in held:  # the same bytes are the same event: hold them once
                    held[value] = (now, event)
                    self._bytes += len(value)

    def _drop_stale(self, now: float) -> None:
        """Drop, oldest first, what was held MAX_AGE_SECONDS or put PASSED_SECONDS before an
        event the ledger has taken: either way, it went to a partition another ledger reads.
        Called with the lock held by ``put`` and ``waits``, never by ``take``, which is called
        for every event and only notes how far the ledger got."""
        cutoff = now - self._max_age
        if self._ledger_at is not None:
            cutoff = max(cutoff, self._ledger_at - self._passed)
        held = self._held
        while held:
            oldest = next(iter(held))
            if held[oldest][0] >= cutoff:
                break
            del held[oldest]
            self._bytes -= len(oldest)

    def take(self, value: bytes) -> Event | None:
        """The event published as ``value``, once; None if it is not held."""
        with self._lock:
            entry = self._held.pop(value, None)
            if entry is None:
                self.missed += 1
                return None
            self._bytes -= len(value)
            self.taken += 1
            self._last_take = self._clock()
            put_at = entry[0]
            if self._ledger_at is None or put_at > self._ledger_at:
                self._ledger_at = put_at
            return entry[1]

    def waits(self, events: int, size: int, patience: float = PATIENCE_SECONDS) -> bool:
        """Whether ``events`` more events of ``size`` bytes in all should wait for room: they
        would not all be held, and the ledger took an event less than ``patience`` seconds ago
        (so it is taking them, and room is coming)."""
        now = self._clock()
        with self._lock:
            self._drop_stale(now)
            full = (
                len(self._held) + events > self._max_events or self._bytes + size > self._max_bytes
            ) and bool(self._held)
            taking = self._last_take is not None and now - self._last_take < patience
            return full and taking


async def wait_for_room(handoff: HandOff, events: int, size: int) -> None:
    """Wait (on the event loop) while ``handoff.waits(events, size)``."""
    while handoff.waits(events, size):
        await asyncio.sleep(WAIT_STEP_SECONDS)
