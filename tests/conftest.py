"""Shared fixtures. Integration fixtures (a real Kafka broker, real ClickHouse) live in
tests/integration/conftest.py and start once per session."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from pipeline.codec import Registry

# CI runs the property tests with a fixed seed so a run is reproducible; on a developer's
# machine they keep exploring new examples.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "schemas" / "examples").glob("*.json"))


def prometheus_binary(name: str) -> str:
    """Prometheus's ``prometheus`` or ``promtool``: as `make test` unpacks them into the venv, or
    on PATH. A test fails, saying so, where there is none."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make test` fetches it into .venv/bin, from "
                    "Debian's prometheus package")  # fmt: skip
    return found


class Clock:
    """A monotonic clock that moves only when a test sets ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def http_get(
    url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, str]:
    """The status and body of a GET (with ``headers``; over HTTPS, trusting what ``context``
    does), an error status included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=10, context=context) as reply:  # fmt: skip
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def rdkafka_threads() -> int:
    """How many librdkafka threads (named ``rdk:...``) this process has. A client's are counted
    in a process of its own where they must be told apart (``threads_in_child``): here chDB's
    pools, and any client a test left to the collector, start and end threads at any time."""
    return sum(_comm(task).startswith("rdk:") for task in Path("/proc/self/task").iterdir())


def threads_in_child(script: str) -> list[int]:
    """Run ``script`` in a new Python (from the repository's root, at most 60 s), which must
    succeed, and the integers it printed: counts of ``rdkafka_threads()`` at its steps."""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return [int(word) for word in run.stdout.split()]


def _comm(task: Path) -> str:
    """A thread's name; "" if it ended since it was listed."""
    with contextlib.suppress(OSError):
        return (task / "comm").read_text()
    return ""


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry.load()


@pytest.fixture(autouse=True)
def _log_filters_restored() -> Iterator[None]:
    """A test that runs ``vigil``'s ``main()`` in this process installs the command line's
    filter of repeated lines (``logs.hold_back_repeats``) on the root logger's handlers, and
    pytest keeps its capture handlers for the whole session: without this, later tests would
    not see a line some earlier test logged the like of."""
    root = logging.getLogger()
    before = {handler: list(handler.filters) for handler in root.handlers}
    yield
    for handler, filters in before.items():
        handler.filters[:] = filters


def load_example(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data
