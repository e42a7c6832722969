"""The local broker says why it did not start, keeps its data where it is told, and ends with
the test run that started it, however that run ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.devkafka import BrokerError, LocalKafka, _alive, fetch_jars
from pipeline.services import free_port
from pipeline.settings import Settings
from tests.conftest import ROOT
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration


def test_a_broker_that_cannot_bind_its_controller_port_names_the_port(tmp_path: Path) -> None:
    port = free_port(2)
    broker = LocalKafka(tmp_path / "kafka", fetch_jars(Settings.from_env({}).cache_dir), port)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port + 1))
        squatter.listen()
        with pytest.raises(BrokerError) as failed:
            broker.start(timeout=60)
    assert f"127.0.0.1:{port + 1}" in str(failed.value)
    assert "Address already in use" in str(failed.value)
    assert broker.pid() is None


def test_a_home_whose_path_is_not_ascii_keeps_the_brokers_data(tmp_path: Path) -> None:
    """server.properties is read as ISO-8859-1: a data directory under /tmp/józef was taken as
    /tmp/jÃ³zef, made beside the home (or not made, where its parent is not writable)."""
    home = tmp_path / "józef vigil" / "kafka"
    broker = LocalKafka(home, fetch_jars(Settings.from_env({}).cache_dir), free_port(2))
    broker.start(timeout=60)  # waits until it takes produce requests
    try:
        assert (home / "data" / "meta.properties").is_file()
        assert [path.name for path in tmp_path.iterdir()] == ["józef vigil"]
    finally:
        assert broker.stop()


def _inner_run(tmp_path: Path, test: str) -> tuple[subprocess.Popen[bytes], LocalKafka]:
    """A pytest run of ``test`` on the local broker, once it has written ``<tmp_path>/up``; the
    run and its broker."""
    (tmp_path / "test_inner.py").write_text(test)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_TEST_")}
    env["VIGIL_TEST_USE_CONTAINERS"] = "0"  # the local broker, whose home is known
    inner = LocalKafka(tmp_path / "run" / "kafka0", fetch_jars(Settings.from_env({}).cache_dir), 0)
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "tests.integration.conftest", f"--basetemp={tmp_path / 'run'}", "--rootdir", str(tmp_path),
         str(tmp_path / "test_inner.py")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: (tmp_path / "up").exists() or run.poll() is not None, 120,
                   "the inner run to start")  # fmt: skip
        assert run.poll() is None, run.communicate()[0].decode()[-2000:]
        assert inner.pid() is not None
    except BaseException:
        run.kill()
        inner.stop(timeout=5)
        raise
    return run, inner


def test_a_test_run_sent_sigterm_stops_the_broker_it_started(tmp_path: Path) -> None:
    """The broker runs in a session of its own: a run killed by a job's time limit (SIGTERM)
    left it running, 768 MiB and two ports, after the run had ended."""
    run, inner = _inner_run(tmp_path, textwrap.dedent("""\
        import time
        from pathlib import Path

        def test_waits(kafka_bootstrap):
            Path(__file__).with_name("up").touch()
            time.sleep(300)
    """))  # fmt: skip
    try:
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=60)[0].decode()
        assert run.returncode == 2, output[-2000:]  # interrupted, as by Ctrl-C
        assert "stopped by signal 15" in output
        assert inner.pid() is None
        assert not (inner.home / "broker.pid").exists()  # stopped by the teardown
    finally:
        run.kill()
        inner.stop(timeout=5)


def test_a_test_run_killed_takes_its_broker_and_its_worker_with_it(tmp_path: Path) -> None:
    """SIGKILL runs no teardown: the kernel sends the broker and the worker SIGTERM as the
    run ends (``ended_with_caller``), and each stops as when it is stopped."""
    run, inner = _inner_run(tmp_path, textwrap.dedent("""\
        import time
        from pathlib import Path

        from tests.integration.conftest import start_worker

        def test_waits(vigil_env):
            worker, _settings, _store = start_worker(vigil_env)
            Path(__file__).with_name("worker.pid").write_text(str(worker.proc.pid))
            Path(__file__).with_name("up").touch()
            time.sleep(300)
    """))  # fmt: skip
    broker = inner.pid()
    assert broker is not None
    worker = int((tmp_path / "worker.pid").read_text())
    try:
        assert _alive(worker)
        run.kill()
        run.wait()
        wait_until(lambda: not _alive(broker) and not _alive(worker), 60,
                   "the broker and the worker to end with the run")  # fmt: skip
    finally:
        inner.stop(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
