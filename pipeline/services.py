"""Running Vigil's processes from another process: the demo, the tests and the benchmarks
start the broker and the worker through here. Every call blocks."""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from pipeline.devkafka import LocalKafka, ended_with_caller, fetch_jars
from pipeline.owner import RemoteStore, find_owner
from pipeline.settings import Settings

# what ``vigil worker`` logs (at INFO) once its agents have started
WORKER_READY = "vigil worker ready:"


class ServiceError(RuntimeError):
    """A service did not start or stop; the message names its log."""


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel hands out to outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(count: int = 1) -> int:
    """The first of ``count`` adjacent TCP ports free on 127.0.0.1 right now.

    The ports are chosen outside the kernel's ephemeral range: a port from that range can be
    taken by any outgoing connection while a server is down, and a broker restarted in a test
    then fails to bind its listener again ("Address already in use").
    """
    low, high = _ephemeral_ports()
    ranges = [(10_000, low - count), (high + 1, 65_536 - count)]
    candidates = [(start, stop) for start, stop in ranges if stop > start]
    if not candidates:
        raise ServiceError("no TCP port outside the ephemeral range is available")
    rng = random.SystemRandom()
    for _ in range(200):
        start, stop = rng.choice(candidates)
        port = rng.randrange(start, stop)
        if all(_bindable(p) for p in range(port, port + count)):
            return port
    raise ServiceError(f"found no {count} adjacent free TCP ports on 127.0.0.1")


def local_broker(settings: Settings) -> LocalKafka:
    return LocalKafka(
        settings.home / "kafka", fetch_jars(settings.cache_dir), settings.dev_kafka_port
    )


_T = TypeVar("_T")
# every child ``_spawn`` started and not seen to exit (``still_running``): held here, so that
# one whose WorkerProcess or GatewayProcess was dropped unstopped is still found
_children: set[subprocess.Popen[bytes]] = set()


def _spawn(command: list[str], env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``vigil <command>`` as a child process, its output appended to ``log_path``; it is sent
    SIGTERM when this process ends, however that ends (``ended_with_caller``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            ended_with_caller([sys.executable, "-m", "pipeline.cli", *command]),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    _children.difference_update([done for done in _children if done.poll() is not None])
    _children.add(child)
    return child


def still_running() -> set[subprocess.Popen[bytes]]:
    """The workers and gateways started here (``WorkerProcess``, ``GatewayProcess``) that have
    not exited: for a test run to stop what a failed test left running."""
    return {child for child in _children if child.poll() is None}


def terminate(child: subprocess.Popen[bytes]) -> int | None:
    """Stop a child ``still_running`` gives: SIGTERM, SIGKILL after 10 s; its exit code."""
    return _terminate(child, 10.0)


def _await_ready(
    proc: subprocess.Popen[bytes],
    what: str,
    log_path: Path,
    timeout: float,
    ready: Callable[[], _T | None],
    tail: Callable[[], str] = lambda: "",
) -> _T:
    """Poll ``ready`` until it gives something; ServiceError if the child exits or is late. A
    late child is stopped first: whoever asked gets an error, not a process it cannot stop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"the {what} exited with {proc.returncode} during start-up; see {log_path}"
                + (f":\n{tail()}" if tail() else "")
            )
        found = ready()
        if found is not None:
            return found
        time.sleep(0.2)
    _terminate(proc, 10.0)
    raise ServiceError(
        f"the {what} did not come up within {timeout:.0f}s and was stopped; see {log_path}"
    )


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGTERM and wait for a clean exit (SIGKILL after ``timeout``); its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class WorkerProcess:
    """``vigil worker --role ROLE`` as a child process, its output in
    ``<home>/logs/worker-N.log``."""

    def __init__(
        self, settings: Settings, env: Mapping[str, str] | None = None, role: str = "all"
    ) -> None:
        self.settings = settings
        self.env = dict(os.environ if env is None else env)
        self.role = role
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.starts = 0

    def start(self, timeout: float = 90.0) -> RemoteStore | None:
        """Start the worker and wait until it serves the store (embedded) or has started its
        agents. Returns the owner's store for embedded ClickHouse (not for the validate role,
        which has none)."""
        self.starts += 1
        self.log_path = (
            self.settings.logs_dir / f"worker-{self.role}-{os.getpid()}-{self.starts}.log"
        )
        command = ["worker", "--loglevel", "INFO", "--role", self.role]
        self.proc = _spawn(command, self.env, self.log_path)
        proc = self.proc
        log_path = self.log_path

        def ready() -> RemoteStore | bool | None:
            if not self.settings.embedded or self.role == "validate":
                started = log_path.exists() and WORKER_READY in log_path.read_text(errors="replace")
                # no store to serve: a ClickHouse server serves queries itself; validate has none
                return False if started else None
            owner = find_owner(self.settings.home)
            return owner if owner is not None and owner.pid == proc.pid else None

        found = _await_ready(proc, "worker", self.log_path, timeout, ready, self.tail)
        return found if isinstance(found, RemoteStore) else None

    def tail(self, lines: int = 25) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM and wait for a clean exit (SIGKILL after ``timeout``); its exit code."""
        return _terminate(self.proc, timeout)


class GatewayProcess:
    """``vigil gateway`` as a child process on 127.0.0.1, its output in ``<home>/logs``;
    OTLP/HTTP on ``port``, and OTLP/gRPC on ``grpc_port`` if one is given."""

    def __init__(
        self,
        settings: Settings,
        port: int,
        env: Mapping[str, str] | None = None,
        grpc_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.port = port
        self.grpc_port = grpc_port
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = settings.logs_dir / f"gateway-{os.getpid()}-{port}.log"

    @property
    def url(self) -> str:
        scheme = "http" if self.settings.gateway.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> str:
        """Start it and wait until /healthz answers; its base URL."""
        import urllib.error
        import urllib.request

        grpc = ["--no-grpc"] if self.grpc_port is None else ["--grpc-port", str(self.grpc_port)]
        self.proc = _spawn(["gateway", "--port", str(self.port), *grpc], self.env, self.log_path)
        # whether the child it started is up; its certificate is its clients' to check
        probe = ssl.create_default_context()
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE

        def ready() -> str | None:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1, context=probe):
                    return self.url
            except (urllib.error.URLError, OSError):
                return None

        return _await_ready(self.proc, "gateway", self.log_path, timeout, ready)

    def stop(self, timeout: float = 45.0) -> int | None:
        return _terminate(self.proc, timeout)
