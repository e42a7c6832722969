"""Benchmarks: ``make bench`` (``python -m bench``)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_seconds(run: Callable[[], object], repeat: int = 3) -> float:
    """The shortest of ``repeat`` timed calls of ``run``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best
