"""What start-up spends compiling custom redaction patterns.

A worker, a gateway and ``vigil redact`` read vigil.yaml, checking that the prefilter takes
each policy's custom patterns, then compile every policy's prefilter and the dead letters'
(``Config.compile_patterns``). This times both for ten policies of twenty patterns each,
in a fresh process (the compiled databases are kept for the process's life), and prints the
seconds and how many patterns were compiled in all. Then the same in two more fresh processes
that keep the compiled databases in one folder, as the CLI does in ``VIGIL_CACHE``
(``pipeline.hscache``): the first compiles and keeps them, the second loads them.

    .venv/bin/python -m bench.compile_patterns
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline import hscache
from pipeline.config import parse_config
from pipeline.detectors import Detector, Prefilter

POLICIES, PATTERNS = 10, 20


def _config() -> dict[str, object]:
    return {
        "tenants": {f"tenant{t}": {"redaction": f"policy{t}"} for t in range(POLICIES)},
        "redaction": {
            f"policy{t}": {
                "custom": [
                    {"name": f"code{t}_{i}", "pattern": f"ZX{t}{i}-\\d{{6}}-[A-Z]{{3}}"}
                    for i in range(PATTERNS)
                ]
            }
            for t in range(POLICIES)
        },
    }


def main() -> None:
    compiled = [0]
    compile_ = Prefilter.__init__

    def counted(self: Prefilter, detectors: Sequence[Detector]) -> None:
        compiled[0] += len(detectors)
        compile_(self, detectors)

    Prefilter.__init__ = counted  # type: ignore[method-assign]
    began = time.perf_counter()
    config = parse_config(_config(), {})
    loaded = time.perf_counter()
    config.compile_patterns()
    done = time.perf_counter()
    print(f"{POLICIES} policies of {PATTERNS} custom patterns: read and checked in "
          f"{loaded - began:.2f} s, prefilters compiled in {done - loaded:.2f} s; "
          f"{compiled[0]:,} patterns compiled in all (the built-ins' among them)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vigil-bench-hscache-") as folder:
        for when in ("compiled and kept", "loaded"):
            seconds = subprocess.run(
                [sys.executable, "-m", "bench.compile_patterns", "--kept-in", folder],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            print(f"  in a fresh process keeping them in a folder, {when}: {seconds} s")


def kept_in(folder: Path) -> None:
    """Read and compile as ``main`` does, keeping the databases in ``folder``; print seconds."""
    hscache.keep_in(folder)
    began = time.perf_counter()
    parse_config(_config(), {}).compile_patterns()
    print(f"{time.perf_counter() - began:.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--kept-in"]:
        kept_in(Path(sys.argv[2]))
    else:
        main()
