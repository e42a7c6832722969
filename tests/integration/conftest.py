"""Real services for integration tests, started once per session and stopped at the end.

Kafka: ``VIGIL_TEST_KAFKA_BOOTSTRAP`` if set; else a container when a Docker engine answers
(testcontainers); else the local KRaft broker from Maven Central jars (this machine's default).
ClickHouse: chDB through clickhouse-connect, one data path per test (``VIGIL_TEST_CLICKHOUSE_DSN``
points the tests at a server instead).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.events import Event, Interaction, event_to_avro
from pipeline.kafkaconn import KafkaConnection
from pipeline.producer import KafkaSender
from pipeline.rows import Origin
from pipeline.services import WorkerProcess, free_port, still_running, terminate
from pipeline.settings import Settings
from pipeline.sink import Message
from pipeline.store import MIGRATIONS_DIR, ClickHouseStore, Store, connect, migrate
from pipeline.topics import FRAMING_BYTES, admin_client, ensure_topics, event_bytes, message_bytes


def _docker_engine() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _vigil_command(child: subprocess.Popen[bytes]) -> str:
    """``worker --role all`` of ``[setpriv ... --] python -m pipeline.cli worker --role all``."""
    args = [str(arg) for arg in child.args]
    return " ".join(args[args.index("pipeline.cli") + 1 :])


@pytest.fixture(autouse=True)
def _stops_what_it_started() -> Iterator[None]:
    """A test that failed between starting a worker or a gateway and stopping it left it
    running for the rest of the run, and after it (found once, 50 minutes on): each such one
    is stopped here, and the test errs naming it."""
    before = still_running()
    yield
    left = still_running() - before
    for child in left:
        terminate(child)
    assert not left, f"left running: {sorted(_vigil_command(c) for c in left)}"


@pytest.fixture(scope="session", autouse=True)
def _torn_down_when_terminated() -> Iterator[None]:
    """A test run sent SIGTERM (a job's time limit, ``kill``) stops as Ctrl-C stops it, its
    fixtures torn down: the local broker, in a session of its own, gets nothing sent to this
    process's group, and Python's default for SIGTERM ends at once, every teardown skipped. It
    went on running (768 MiB and two ports) after the run that started it had ended."""

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("VIGIL_TEST_KAFKA_BOOTSTRAP")
    if given:
        yield given
        return
    if os.environ.get("VIGIL_TEST_USE_CONTAINERS") != "0" and _docker_engine():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:3.9.1").with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    from pipeline.devkafka import LocalKafka, fetch_jars

    settings = Settings.from_env({})
    broker = LocalKafka(
        tmp_path_factory.mktemp("kafka"), fetch_jars(settings.cache_dir), free_port(2)
    )
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def vigil_env(kafka_bootstrap: str, tmp_path: Path) -> dict[str, str]:
    """Environment for one test's Vigil processes: its own home, store, topics and group."""
    tag = uuid.uuid4().hex[:8]
    env = dict(os.environ)
    env.update(
        VIGIL_HOME=str(tmp_path / "home"),
        VIGIL_KAFKA_BOOTSTRAP=kafka_bootstrap,
        VIGIL_TOPIC_PREFIX=f"t{tag}",
        VIGIL_CONSUMER_GROUP=f"vigil-test-{tag}",
        VIGIL_SINK_FLUSH_SECONDS="0.3",
        VIGIL_PROGRESS_SECONDS="1",  # the worker's progress line, read by tests of its counts
    )
    if os.environ.get("VIGIL_TEST_CLICKHOUSE_DSN"):
        env["VIGIL_CLICKHOUSE_DSN"] = os.environ["VIGIL_TEST_CLICKHOUSE_DSN"]
    return env


@pytest.fixture
def settings(vigil_env: dict[str, str]) -> Settings:
    return Settings.from_env(vigil_env)


@pytest.fixture
def worker(vigil_env: dict[str, str], settings: Settings) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(settings, vigil_env)
    yield proc
    code = proc.stop()
    assert code in (0, None, -9), f"worker exited with {code}:\n{proc.tail()}"


def start_worker(env: dict[str, str]) -> tuple[WorkerProcess, Settings, Store]:
    """Create the topics of ``env`` and start a worker there; the worker, its settings and the
    embedded store it serves."""
    settings = Settings.from_env(env)
    ensure_topics(settings)
    worker = WorkerProcess(settings, env)
    store = worker.start()
    assert store is not None, "a worker on the embedded store serves it to other processes"
    return worker, settings, store


def vigil(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``vigil ARGS`` as a child process with ``env``, ``stdin`` its input, its output kept;
    at most 120 s."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, says: Callable[[], str] | None = None
) -> None:
    """Poll ``check`` until it holds. On a timeout the error ends with ``says()``: what a
    service said last (a worker's log tail, its progress line), so that a failure in CI, where
    the test's files are gone, can still be read."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    said = f"\n{says()}" if says is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{said}")


def topic_takes(settings: Settings, topic: str, max_bytes: int) -> None:
    """The topics of ``settings`` created, ``topic`` taking messages of ``max_bytes``."""
    alter_topic(settings, topic, "max.message.bytes", max_bytes)
    assert event_bytes(topic, message_bytes(settings, [topic])) == max_bytes - FRAMING_BYTES


def alter_topic(settings: Settings, topic: str, key: str, value: int) -> None:
    """The topics of ``settings`` created, ``topic``'s config ``key`` set to ``value``."""
    ensure_topics(settings)
    entry = ConfigEntry(key, str(value), incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    admin = admin_client(settings)  # held: its futures fail once it is collected
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)

    def done() -> bool:  # the broker answers the old value for a moment after the change
        said = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)])
        entries = next(iter(said.values())).result(timeout=10)
        return entries[key].value == str(value)

    wait_until(done, 30, f"{topic}'s {key} to be {value}")


def count(store: Store, sql: str) -> int:
    return int(store.query_rows(sql)[0][0])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ClickHouseStore]:
    """A migrated embedded store of this test's own, opened in this process."""
    s = connect(f"chdb://{tmp_path / 'ch'}")
    migrate(s)
    yield s
    s.close()


class RecordingStore:
    """The real store, remembering what was asked of it: the queries (``query_rows``) in
    ``queries``, the statements (``command``) in ``commands``, the tables inserted into in
    ``inserted``."""

    def __init__(self, store: ClickHouseStore) -> None:
        self.store = store
        self.queries: list[str] = []
        self.commands: list[str] = []
        self.inserted: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def query_rows(self, sql: str, settings: Any = None) -> list[tuple[Any, ...]]:
        self.queries.append(sql)
        return self.store.query_rows(sql, settings)

    def command(self, sql: str) -> None:
        self.commands.append(sql)
        self.store.command(sql)

    def insert(self, table: str, rows: Any, columns: Any, dedup_token: str) -> None:
        self.inserted.append(table)
        self.store.insert(table, rows, columns, dedup_token)


def clean_messages(
    registry: Registry, ids: Iterable[int], partition: int = 0, *, ts: datetime
) -> list[Message]:
    """Clean-topic messages of one interaction each, at offset ``i`` of ``partition``, event
    ids ``e-<i>'\\`` (a quote and a backslash, which every query must escape)."""
    base = Event(
        event_id="",
        kind="interaction",
        ts=ts,
        tenant_id="acme",
        agent_id="bot",
        body=Interaction("openai", "gpt-4o", input_tokens=10, output_tokens=2),
    )
    return [
        Message(
            Origin("clean", partition, i),
            b"acme/bot",
            registry.encode(
                EVENT_SCHEMA, event_to_avro(dataclasses.replace(base, event_id=f"e-{i}'\\"))
            ),
        )
        for i in ids
    ]


def tenant_messages(
    registry: Registry, events: Iterable[tuple[str, str, datetime]], first: int = 0
) -> list[Message]:
    """Clean-topic messages of one interaction each, one per (tenant, event_id, ts), at offsets
    ``first``, ``first`` + 1... of partition 0."""
    base = Event(
        event_id="",
        kind="interaction",
        ts=datetime(2026, 1, 1),
        tenant_id="",
        agent_id="bot",
        body=Interaction("openai", "gpt-4o", input_tokens=10, output_tokens=2),
    )
    return [
        Message(
            Origin("clean", 0, i),
            f"{tenant}/bot".encode(),
            registry.encode_event(
                dataclasses.replace(base, tenant_id=tenant, event_id=event_id, ts=ts)
            ),
        )
        for i, (tenant, event_id, ts) in enumerate(events, first)
    ]


def migrate_before(store: ClickHouseStore, migration: str, tmp_path: Path) -> None:
    """Bring ``store`` up to the migration before ``migration``, as an older release left it."""
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        if path.stem == migration:
            break
        shutil.copy(path, before)
    else:
        raise AssertionError(f"no migration {migration}")
    assert migration not in migrate(store, before)


def events_on(
    bootstrap: str, topic: str, enough: Callable[[list[Event]], bool], timeout: float = 60
) -> list[Event]:
    """The events on ``topic`` (each as often as it is there), read from its start until those
    read are ``enough``, and for 2 s more, or for ``timeout`` s."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest"})  # fmt: skip
    consumer.subscribe([topic])
    registry = Registry.load()
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=1):
                if message.error() is None:
                    seen.append(registry.read_event(message.value()))  # type: ignore[arg-type]
            if enough(seen):
                deadline = min(deadline, time.monotonic() + 2)
    finally:
        consumer.close()
    return seen


@pytest.fixture
def sender(kafka_bootstrap: str) -> Iterator[KafkaSender]:
    sender = KafkaSender(KafkaConnection(kafka_bootstrap))
    yield sender
    sender.close(timeout=5)


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """``wait_until`` from a coroutine, off the event loop's thread."""
    await asyncio.to_thread(wait_until, check, timeout, what)


def member_settings(home: Path, bootstrap: str, group: str, **env: str) -> Settings:
    """The settings of one of several workers in consumer group ``group``, whose topics (four
    partitions each) are prefixed ``group`` too, with its own ``home`` (made here); ``env``:
    more variables."""
    home.mkdir()
    return Settings.from_env({
        "VIGIL_HOME": str(home), "VIGIL_KAFKA_BOOTSTRAP": bootstrap, "VIGIL_TOPIC_PREFIX": group,
        "VIGIL_CONSUMER_GROUP": group, "VIGIL_PARTITIONS": "4", **env,
    })  # fmt: skip


class SharedServer:
    """The real store as one worker on a ClickHouse server shared with others sees it: each call
    waits its turn (``turn``, shared: chDB is not called from two threads at once), and every
    ledger insert first takes ``insert_seconds``, as on a busy server; ``began`` is set as one
    starts, and ``began_at`` notes when (``time.monotonic()``). It counts the ledger's inserts
    and its chain-heads queries."""

    def __init__(self, store: ClickHouseStore, turn: threading.Lock, insert_seconds: float) -> None:
        self.store = store
        self.insert_seconds = insert_seconds
        self.began = threading.Event()
        self.began_at: list[float] = []
        self._turn = turn
        self.ledger_inserts = self.heads_queries = 0

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.store, name)
        if not callable(call):
            return call

        def in_turn(*args: Any, **kwargs: Any) -> Any:
            if name == "insert" and args[0] == "vigil.audit_log":
                self.began.set()
                self.began_at.append(time.monotonic())
                self.ledger_inserts += 1
                time.sleep(self.insert_seconds)
            if name == "query_rows" and "argMax(row_hash, chain_seq)" in args[0]:
                self.heads_queries += 1
            with self._turn:
                return call(*args, **kwargs)

        return in_turn


def alert_states_rebuilt(caplog: pytest.LogCaptureFixture) -> list[set[int]]:
    """The clean partitions of each alert state rebuilt (``HeldAlerts``) that ``caplog`` holds,
    in order: what ``replay_ledger`` logs at INFO to ``vigil.alerts``."""
    said = [r.getMessage() for r in caplog.records if r.name == "vigil.alerts"]
    lists = (m.split("of clean partitions ", 1)[1].split(" since ", 1)[0] for m in said
             if m.startswith("alert state rebuilt ") and "of clean partitions " in m)  # fmt: skip
    return [{int(p) for p in held.split(", ")} for held in lists]


def two_halves(states: list[set[int]], partitions: set[int]) -> list[set[int]]:
    """Two of ``states`` that are disjoint and hold all of ``partitions`` between them (two
    workers that share clean), or []."""
    return next(([x, y] for x in states for y in states if x | y == partitions and not x & y), [])


@dataclasses.dataclass(frozen=True)
class Certificates:
    """A CA of a test's own, a server certificate it signed for 127.0.0.1, and a client
    certificate it signed for ``CN=vigil`` (PEM files, keys unencrypted)."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    @property
    def keystore(self) -> Path:
        """The key and the certificate in one file, as a Kafka broker's PEM keystore takes them."""
        return self.key.with_name("keystore.pem")


def make_certificates(folder: Path) -> Certificates:
    """Made with openssl (installed by ``make system-tools``), valid for two days."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-days", "2", "-subj", "/CN=vigil-test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=localhost")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key",
            "-out", "client.csr", "-subj", "/CN=vigil")  # fmt: skip
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "client.pem", "-days", "2")  # fmt: skip
    made = Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key",
                        folder / "client.pem", folder / "client.key")  # fmt: skip
    made.keystore.write_text(made.key.read_text() + made.cert.read_text())
    return made


class Webhooks:
    """A real HTTP server taking alerts' webhook posts on 127.0.0.1: ``posts`` holds each
    answered 2xx as (path, JSON body); a path in ``failing`` is answered 500 that many more
    times; one in ``hanging`` is answered only after that many seconds; one in ``moved`` is
    answered 301 to where it says, and a GET of any path 200 (``gets``: the paths asked)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.failing: dict[str, int] = {}
        self.hanging: dict[str, float] = {}
        self.moved: dict[str, str] = {}
        self.gets: list[str] = []
        self.refused = 0
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hooks.gets.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                time.sleep(hooks.hanging.get(self.path, 0))
                if self.path in hooks.moved:
                    self.send_response(301)
                    self.send_header("Location", hooks.moved[self.path])
                elif hooks.failing.get(self.path, 0) > 0:
                    hooks.failing[self.path] -= 1
                    hooks.refused += 1
                    self.send_response(500)
                else:
                    hooks.posts.append((self.path, body))
                    self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def to(self, path: str) -> list[Any]:
        """The bodies delivered to ``path``."""
        return [body for p, body in self.posts if p == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def webhooks() -> Iterator[Webhooks]:
    hooks = Webhooks()
    yield hooks
    hooks.close()
