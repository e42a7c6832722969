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
from pipeline.devkafka import KAFKA_VERSION, BrokerError, _alive, fetch_jars
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


def _fetched(cache: Path) -> Path:
    """Kafka jars as ``fetch_jars`` leaves them in ``cache`` (two stand-ins, no Maven)."""
    libs = cache / f"kafka-{KAFKA_VERSION}" / "libs"
    libs.mkdir(parents=True)
    for name in ("kafka_2.13-3.9.1.jar", "kafka-clients-3.9.1.jar", ".complete"):
        (libs / name).write_bytes(b"PK")
        (libs / name).chmod(0o644)
    for path in (libs.parent, libs):
        path.chmod(0o755)
    return libs


@pytest.mark.parametrize("opened", ["folder for group", "parent for all", "jar for all", "owner"])
def test_kafka_jars_another_user_could_have_written_are_not_run(
    tmp_path: Path, opened: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Java runs what the jars folder holds: jars fetched before are used while only this user
    could have written them, and refused, naming the folder, why and what to do, once the
    folder, its parent or a jar is open to others or another user owns them."""
    libs = _fetched(tmp_path / "cache")
    assert fetch_jars(tmp_path / "cache") == libs
    if opened == "owner":
        monkeypatch.setattr(os, "geteuid", lambda: os.stat(libs).st_uid + 1)
    elif opened == "jar for all":
        (libs / "kafka-clients-3.9.1.jar").chmod(0o666)
    else:
        (libs if opened.startswith("folder") else libs.parent).chmod(
            0o775 if opened.endswith("group") else 0o777
        )
    with pytest.raises(BrokerError) as refused:
        fetch_jars(tmp_path / "cache")
    said = str(refused.value)
    assert said.startswith(f"the Kafka jars in {libs} are not used: ") and (
        "remove the folder to fetch them again, or set VIGIL_CACHE" in said
    ), said


def test_kafka_jars_fetched_under_a_group_umask_are_for_this_user_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A umask of 002 (a desktop's default) made the folder and jars Maven wrote writable by the
    group, which the next start would refuse: fetching takes the group's write away. Maven is a
    stand-in here, writing a jar where it is told to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text(
        "#!/bin/sh\nfor a; do case $a in -DoutputDirectory=*) out=${a#*=};; esac; done\n"
        'mkdir -p "$out" && printf PK > "$out/kafka_2.13-3.9.1.jar"\n'
    )
    mvn.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    before = os.umask(0o002)
    try:
        libs = fetch_jars(tmp_path / "cache", quiet=True)
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (libs.parent, libs, *libs.iterdir())}
    assert modes == {libs.parent.name: 0o755, "libs": 0o755, "kafka_2.13-3.9.1.jar": 0o644,
                     ".complete": 0o644}  # fmt: skip
    assert fetch_jars(tmp_path / "cache") == libs
