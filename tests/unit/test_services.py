"""Starting the services the tests, the demo and the benchmarks run as child processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import services
from pipeline.devkafka import _alive
from pipeline.services import ServiceError, _await_ready
from tests.conftest import ROOT


def test_a_child_that_does_not_come_up_in_time_is_stopped(tmp_path: Path) -> None:
    """Else the caller, given an error and no process, leaves it running (a gateway serving
    the wrong protocol outlived the test that started it)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with pytest.raises(ServiceError, match="did not come up within 1s and was stopped"):
            _await_ready(child, "sleeper", tmp_path / "log", 1.0, lambda: None)
        assert child.poll() is not None
    finally:
        child.kill()
        child.wait()


def test_children_that_exited_are_let_go(tmp_path: Path) -> None:
    """A test run starts hundreds of workers and gateways; those that exited are not held."""
    first = services._spawn(["-h"], {}, tmp_path / "log")
    assert first.wait(60) == 0 and first not in services.still_running()
    second = services._spawn(["-h"], {}, tmp_path / "log")
    try:
        assert first not in services._children and second in services._children
    finally:
        second.wait(60)
    assert b"usage: vigil" in (tmp_path / "log").read_bytes()


def test_a_child_ended_with_its_caller_ends_when_the_caller_is_killed() -> None:
    """A test run or a demo killed with SIGKILL (a job's time limit) left its broker and its
    workers running: nothing of the caller's runs then, only the kernel can say it."""
    caller = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "from pipeline.devkafka import ended_with_caller\n"
         "child = subprocess.Popen(ended_with_caller([sys.executable, '-c', "
         "'import time; time.sleep(120)']))\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(120)\n"],
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert caller.stdout is not None
    child = int(caller.stdout.readline())
    cmdline = Path(f"/proc/{child}/cmdline")
    try:
        # setpriv asks for the signal, then becomes the command: killed before that, the caller
        # would leave the child untied (a race of microseconds, not what is tested here). Wait
        # for the command's own arguments: the caller's copy forked before setpriv ran, and
        # setpriv's, hold the same words
        command = [b"-c", b"import time; time.sleep(120)"]
        deadline = time.monotonic() + 10
        while cmdline.read_bytes().split(b"\0")[1:3] != command:
            assert time.monotonic() < deadline, cmdline.read_bytes()
            time.sleep(0.01)
        assert _alive(child)
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        caller.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
