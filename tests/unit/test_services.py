"""Starting the services the tests, the demo and the benchmarks run as child processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.services import ServiceError, _await_ready


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
