"""What start-up spends compiling custom redaction patterns.

A worker, a gateway and ``vigil redact`` read vigil.yaml, checking that the prefilter takes
each policy's custom patterns, then compile every policy's prefilter and the dead letters'
(``Config.compile_patterns``). This times both for ten policies of twenty patterns each,
in a fresh process (the compiled databases are kept for the process's life), and prints the
seconds and how many patterns were compiled in all.

    .venv/bin/python -m bench.compile_patterns
"""

from __future__ import annotations

import time
from collections.abc import Sequence

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


if __name__ == "__main__":
    main()
