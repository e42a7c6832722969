"""What a worker has done since it started, as one log line every so often (``vigil worker``
logs it at INFO every VIGIL_PROGRESS_SECONDS, and once more when it stops).

    progress: 75 validated (50 clean, 25 to the DLQ), 50 stored (2 repeats dropped),
    25 dead letters stored, 48 handed over (2 decoded again); last 30s: 2.5 validated/s,
    1.7 stored/s

Totals since start, then the rates since the previous line of what moved since. A worker with
nothing new to say stays quiet. Only what the worker's role does is counted, so a ``validate``
worker says nothing about storing. ``handed over``: events the ledger took from the in-process
hand-off instead of decoding them again (``pipeline.handoff``); ``decoded again`` counts the
ones it did decode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

# What is counted, in the order it is said. Each is followed by the counts said in brackets
# after it, under the name each is said with.
_SAID: dict[str, tuple[str, ...]] = {
    "validated": ("clean", "to the DLQ"),
    "stored": ("repeats dropped", "rejected to the DLQ"),
    "dead letters stored": ("dead letters repeated",),
    "handed over": ("decoded again",),
}
COUNTS = tuple(name for head, details in _SAID.items() for name in (head, *details))
_RATES = ("validated", "stored")


class Progress:
    """Counters a worker's stages add to (from any thread), and the line that reports them.
    ``clock``: seconds, monotonic."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._totals = dict.fromkeys(COUNTS, 0)
        self._reported = dict(self._totals)
        self._reported_at = clock()
        self._tracked: list[Callable[[], Mapping[str, int]]] = []

    def add(self, counts: Mapping[str, int]) -> None:
        """Add to the counts named (``COUNTS``). Raises KeyError for a name not there."""
        with self._lock:
            for name, n in counts.items():
                self._totals[name] += n

    def track(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Take the totals of counts kept elsewhere (the hand-off's) from ``read`` each time a
        line is made."""
        self._tracked.append(read)

    def totals(self) -> dict[str, int]:
        with self._lock:
            self._read_tracked()
            return dict(self._totals)

    def _read_tracked(self) -> None:
        for read in self._tracked:
            for name, n in read().items():
                if name not in self._totals:
                    raise KeyError(name)
                self._totals[name] = n

    def line(self, final: bool = False) -> str | None:
        """The progress line, or None when nothing was counted since the last one (unless
        ``final``, when there is anything at all to say)."""
        now = self._clock()
        with self._lock:
            self._read_tracked()
            totals = dict(self._totals)
            changed = {k: v - self._reported[k] for k, v in totals.items()}
            if not any(changed.values()) and not (final and any(totals.values())):
                return None  # the next line's rates cover the quiet time too
            elapsed = now - self._reported_at
            self._reported, self._reported_at = totals, now
        parts = []
        for head, details in _SAID.items():
            if not totals[head] and not any(totals[d] for d in details):
                continue
            said = [f"{totals[d]:,} {d}" for d in details if totals[d]]
            parts.append(f"{totals[head]:,} {head}" + (f" ({', '.join(said)})" if said else ""))
        rates = [
            f"{changed[name] / elapsed:,.1f} {name}/s"
            for name in _RATES
            if changed[name] and elapsed > 0
        ]
        prefix = "stopped after" if final else "progress:"
        window = f"; last {elapsed:,.0f}s: {', '.join(rates)}" if rates else ""
        return f"{prefix} {', '.join(parts)}{window}"


class Every:
    """Whether a command's next progress line is due: ``due()`` is true once ``seconds`` have
    passed since it last was (or since this was made), and starts the wait again."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds = seconds
        self._clock = clock
        self._said_at = clock()

    def due(self) -> bool:
        now = self._clock()
        if now - self._said_at < self._seconds:
            return False
        self._said_at = now
        return True
