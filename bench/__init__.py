"""Benchmarks: ``make bench`` (``python -m bench``)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def use_work_dir() -> Path:
    """Keep this process's temporary files, and its children's, in ``VIGIL_BENCH_TMPDIR``
    (default ``.vigil/bench-tmp``): the stores, the broker's logs, chDB's insert files.

    Not /tmp: a deployment keeps its store in Vigil's home (``VIGIL_HOME``, default ``.vigil``),
    and on the machine these ran on a file created in /tmp took about 0.9 ms, 10-50 times as
    long as elsewhere on the same disk. The embedded engine creates 10-14 files for each part it
    writes (docs/benchmarks.md, "Where the benchmarks keep their files")."""
    path = Path(os.environ.get("VIGIL_BENCH_TMPDIR") or ".vigil/bench-tmp").resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = str(path)
    return path


def best_seconds(run: Callable[[], object], repeat: int = 3) -> float:
    """The shortest of ``repeat`` timed calls of ``run``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best
