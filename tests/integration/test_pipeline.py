"""The whole path on real parts: OpenTelemetry exporter / SDK -> real Kafka broker -> Faust
worker -> real ClickHouse engine. Every assertion counts events by ``event_id``."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer, TopicPartition
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from connectors.otel import VigilSpanExporter
from connectors.sdk import Emitter
from connectors.units import UnitOfWorkSpanProcessor, unit_of_work
from pipeline.demo import SEND_STEP, send_workload, wait_acknowledged
from pipeline.events import Cost, Event, Interaction
from pipeline.lag import group_client
from pipeline.ledger import Retention, verify
from pipeline.owner import RemoteStore
from pipeline.services import WorkerProcess, free_port
from pipeline.settings import Settings
from pipeline.store import connect
from pipeline.topics import ensure_topics
from pipeline.workload import UNPRICED, bad_payloads, generate
from tests.conftest import ROOT, http_get
from tests.integration.conftest import count, wait_until

pytestmark = pytest.mark.integration


def _start(worker: WorkerProcess) -> RemoteStore:
    store = worker.start()
    assert isinstance(store, RemoteStore)
    return store


def test_otel_exporter_events_arrive_exactly_once(
    settings: Settings, worker: WorkerProcess
) -> None:
    ensure_topics(settings)
    store = _start(worker)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    provider = TracerProvider(resource=Resource.create({"service.name": "test-agent"}))
    provider.add_span_processor(UnitOfWorkSpanProcessor())
    provider.add_span_processor(BatchSpanProcessor(VigilSpanExporter(emitter, tenant_id="acme")))
    tracer = provider.get_tracer("test")
    expected = set()
    for i in range(400):
        if i % 4 == 0:
            scope = unit_of_work("ticket", f"T-{i // 4}")
            scope.__enter__()
        legacy = i % 2 == 0
        attrs = {
            ("gen_ai.system" if legacy else "gen_ai.provider.name"): "openai",
            "gen_ai.request.model": "gpt-4o-mini",
            ("gen_ai.usage.prompt_tokens" if legacy else "gen_ai.usage.input_tokens"): 100 + i,
            "gen_ai.usage.output_tokens": 10,
        }
        with tracer.start_as_current_span("chat", attributes=attrs) as span:
            ctx = span.get_span_context()
            expected.add(f"{ctx.trace_id:032x}-{ctx.span_id:016x}")
        with tracer.start_as_current_span("not genai"):
            pass
        if i % 4 == 3:
            scope.__exit__(None, None, None)
    with unit_of_work("ticket", "T-sdk"):
        emitter.emit(
            Event(
                event_id="sdk-in-unit",
                kind="cost",
                ts=datetime.now(UTC),
                tenant_id="acme",
                agent_id="test-agent",
                body=Cost(0.5),
            )
        )
    provider.shutdown()
    emitter.close()
    assert emitter.delivered == 401

    wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") >= 401, 90, "401 events")
    time.sleep(2)  # anything extra (a duplicate) would have arrived by now
    assert store.query_rows(
        "SELECT unit_id FROM vigil.audit_log WHERE event_id = 'sdk-in-unit'"
    ) == [("T-sdk",)]
    units = store.query_rows(
        "SELECT unit_id, count() FROM vigil.audit_log WHERE kind = 'interaction' GROUP BY 1"
    )
    assert dict(units) == {f"T-{n}": 4 for n in range(100)}
    rows = store.query_rows(
        "SELECT event_id, tenant_id, agent_id, input_tokens FROM vigil.audit_log WHERE kind = 'interaction'"
    )
    assert len(rows) == 400
    assert {r[0] for r in rows} == expected
    assert {(r[1], r[2]) for r in rows} == {("acme", "test-agent")}
    assert sum(int(r[3]) for r in rows) == sum(100 + i for i in range(400))


def test_malformed_events_land_in_the_dlq_with_reasons(
    settings: Settings, worker: WorkerProcess
) -> None:
    ensure_topics(settings)
    store = _start(worker)
    now = datetime.now(UTC)
    bad = list(bad_payloads(random.Random(1), now, 24, "t"))
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    good = [
        Event(
            event_id=f"ok-{i}",
            kind="cost",
            ts=now,
            tenant_id="globex",
            agent_id="a",
            body=Cost(1.25),
        )
        for i in range(50)
    ]
    for i, event in enumerate(good):
        emitter.emit(event)
        if i < len(bad):
            emitter.emit_raw(bad[i].key, bad[i].value)
    emitter.emit_raw(None, b"")
    emitter.close()

    wait_until(
        lambda: count(store, "SELECT count() FROM vigil.dlq") >= len(bad) + 1, 90, "dead letters"
    )
    wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") >= 50, 60, "good events")
    reasons = Counter(
        {
            r[0]: int(r[1])
            for r in store.query_rows(
                "SELECT reason_code, count() FROM vigil.dlq GROUP BY reason_code"
            )
        }
    )
    expected = Counter(b.reason_code for b in bad)
    expected["truncated"] += 1
    assert reasons == expected
    for code, reason in store.query_rows(
        "SELECT reason_code, any(reason) FROM vigil.dlq GROUP BY reason_code"
    ):
        assert ":" in reason and len(reason) > 15, (
            f"{code}: reason should say what and where: {reason!r}"
        )
    assert count(store, "SELECT count() FROM vigil.audit_log WHERE tenant_id = 'globex'") == 50
    hex_ok = store.query_rows(
        "SELECT count() FROM vigil.dlq WHERE reason_code = 'unknown_schema' AND startsWith(hex(payload), '00000003E7')"
    )
    assert int(hex_ok[0][0]) == expected["unknown_schema"], "the raw bytes are kept as received"

    # the worker's progress line counts the same: 50 + 24 + 1 raw messages, each event once
    counted = (
        f"{len(bad) + 51} validated (50 clean, {len(bad) + 1} to the DLQ), 50 stored, "
        f"{len(bad) + 1} dead letters stored, 50 handed over"
    )
    log_path = worker.log_path
    assert log_path is not None

    def logged(prefix: str) -> bool:  # the whole count: the rates follow, or nothing does
        line = rf"{prefix} {re.escape(counted)}(;| *$)"
        return re.search(line, log_path.read_text(), re.M) is not None

    wait_until(lambda: logged("progress:"), 30, "the progress line")
    assert worker.stop() == 0
    assert logged("stopped after"), worker.tail()


def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    settings: Settings, worker: WorkerProcess
) -> None:
    ensure_topics(settings)
    _start(worker)
    total = 30_000
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    base = datetime.now(UTC) - timedelta(minutes=5)
    tenants = ("acme", "globex", "initech")

    def produce() -> None:
        for i in range(total):
            emitter.emit(
                Event(
                    event_id=f"k-{i}",
                    kind="interaction",
                    ts=base + timedelta(milliseconds=i),
                    tenant_id=tenants[i % 3],
                    agent_id=f"agent-{i % 7}",
                    body=Interaction("openai", "gpt-4o", input_tokens=i % 500, output_tokens=7),
                )
            )
            if i % 250 == 0:
                time.sleep(0.25)  # spread production (about 30 s) over the kills
        emitter.close()

    producer = threading.Thread(target=produce)
    producer.start()
    rng = random.Random(42)
    kills = 0
    for _ in range(10):  # at random moments: mid-batch, mid-insert, mid-commit, at start-up
        time.sleep(rng.uniform(1.0, 3.5))
        worker.kill()
        kills += 1
        _start(worker)
    producer.join()
    assert emitter.delivered == total
    remote = _running_owner(worker, settings)
    wait_until(
        lambda: count(remote, "SELECT count() FROM vigil.audit_log") >= total,
        240,
        f"{total} events after {kills} kills",
        worker.tail,
    )
    time.sleep(3)
    stored, distinct, lo, hi = remote.query_rows(
        "SELECT count(), uniqExact(event_id), min(toUInt64(substring(event_id, 3))), "
        "max(toUInt64(substring(event_id, 3))) FROM vigil.audit_log"
    )[0]
    assert (int(stored), int(distinct), int(lo), int(hi)) == (total, total, 0, total - 1)
    # every restart continued the hash chains from what was stored: no fork, no gap
    verdict = verify(remote, Retention())
    assert verdict.ok and verdict.rows == total, verdict.breaks[:3]
    # and the worker samples its consumer lag for the health dashboard (every 30 s)
    wait_until(
        lambda: count(remote, "SELECT count() FROM vigil.consumer_lag") > 0, 90, "a lag sample"
    )
    topics = {r[0] for r in remote.query_rows("SELECT DISTINCT topic FROM vigil.consumer_lag")}
    assert topics == {settings.topics.raw, settings.topics.clean, settings.topics.dlq}


def _running_owner(worker: WorkerProcess, settings: Settings) -> RemoteStore:
    from pipeline.owner import find_owner

    owner = find_owner(settings.home)
    assert owner is not None and worker.alive(), worker.tail()
    return owner


def test_sql_cli_works_while_the_worker_runs_and_after(
    settings: Settings, worker: WorkerProcess, vigil_env: dict[str, str]
) -> None:
    ensure_topics(settings)
    store = _start(worker)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    for i in range(25):
        emitter.emit(
            Event(
                event_id=f"s-{i}",
                kind="cost",
                ts=datetime.now(UTC),
                tenant_id="acme",
                agent_id="a",
                body=Cost(0.5),
            )
        )
    emitter.close()
    wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") >= 25, 60, "25 events")

    def sql(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "sql", *args],
            env=vigil_env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    running = sql("--format", "CSV", "SELECT count(), sum(amount) FROM vigil.audit_log")
    assert running.returncode == 0, running.stderr
    assert running.stdout.strip() == "25,12.5"
    pretty = sql("SELECT kind, count() AS n FROM vigil.audit_log GROUP BY kind")
    assert "│ cost │ 25 │" in pretty.stdout and "kind" in pretty.stdout
    refused = sql("ALTER TABLE vigil.audit_log DELETE WHERE 1")
    assert refused.returncode == 2 and "read-only" in refused.stderr

    assert worker.stop() == 0
    after = sql("--format", "JSONEachRow", "SELECT count() AS n FROM vigil.audit_log")
    assert after.returncode == 0, after.stderr
    assert after.stdout.strip() == '{"n":25}'
    direct = connect(settings.clickhouse_dsn)  # the worker released the data path
    try:
        assert int(direct.query_rows("SELECT count() FROM vigil.audit_log")[0][0]) == 25
    finally:
        direct.close()


def test_the_demos_wait_for_acknowledgement_ends_once_every_clean_partition_is_committed(
    vigil_env: dict[str, str],
) -> None:
    """The worker acknowledges a clean batch only once the alerts it fired are stored, so the
    demo's summary waits for the group to have committed every clean message: read as soon as
    the events were queryable, the last batch's alerts could be missing (a run's drift alert
    was)."""
    settings = Settings.from_env({**vigil_env, "VIGIL_PARTITIONS": "3"})
    ensure_topics(settings)
    clean = settings.topics.clean
    producer = Producer(settings.kafka.config())
    for p in range(3):
        producer.produce(clean, b"an EventBatch", partition=p)
    assert producer.flush(30) == 0
    assert not wait_acknowledged(settings, 1.0)  # the group has committed nothing
    with group_client(settings.kafka, settings.consumer_group) as consumer:
        ends = [TopicPartition(clean, p, consumer.get_watermark_offsets(TopicPartition(clean, p),
                                                                        timeout=10)[1])
                for p in range(3)]  # fmt: skip
        consumer.commit(offsets=ends[:2], asynchronous=False)
        assert not wait_acknowledged(settings, 1.0)  # one partition's message is not
        consumer.commit(offsets=ends[2:], asynchronous=False)
    assert wait_acknowledged(settings, 10.0)


def test_the_demo_sends_no_event_a_step_behind_its_tenants_latest(settings: Settings) -> None:
    """The demo sends two hours of work in seconds: spans the BatchSpanProcessor held reached
    Kafka up to an hour of event time after the SDK's events of their tenant, whose clock then
    closed the drift window they belonged to without them (the injected drift went unseen in
    some runs). Each exporter is flushed at each step of event time (``demo.SEND_STEP``)."""
    ensure_topics(settings)
    now = datetime.now(UTC)
    workload = generate(3000, now, seed=7, run_id="pace", drift=("support-bot", now - timedelta(minutes=45)))  # fmt: skip
    sent: list[tuple[str, datetime]] = []

    class Recording(Emitter):
        def emit(self, event: Event | Mapping[str, Any]) -> None:
            assert isinstance(event, Event)  # the exporter's spans, the SDK's events
            sent.append((event.tenant_id, event.ts))
            super().emit(event)

    send_workload(workload, Recording(settings.bootstrap, settings.topics.raw), progress=False)
    assert len(sent) == workload.valid_count
    latest: dict[str, datetime] = {}
    behind = timedelta(0)
    for tenant, ts in sent:
        behind = max(behind, latest.get(tenant, ts) - ts)
        latest[tenant] = max(latest.get(tenant, ts), ts)
    assert timedelta(0) < behind < SEND_STEP  # well within vigil.yaml's window_grace of 5m


def test_demo_runs_end_to_end_on_the_given_broker(
    vigil_env: dict[str, str], settings: Settings
) -> None:
    env = {**vigil_env, "PYTHONUNBUFFERED": "1"}
    elsewhere = settings.home.parent / "elsewhere"
    elsewhere.mkdir()

    def demo(cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
        run = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "demo", "--events", "3000"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=cwd,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        return run

    # from a folder without a vigil.yaml it takes the demo's (it had none: the gateway's
    # tenant had no key, and the run waited 300 s for spans refused with 401)
    first = demo(cwd=elsewhere)
    assert f"policies {ROOT / 'vigil.yaml'}" in first.stdout.splitlines()[0]
    out = demo()  # running it twice works: the second run's events are new events, all stored
    assert "Events by kind and tenant:" in out.stdout and "Dead-letter queue" in out.stdout
    via = re.search(
        r"([\d,]+) of the spans \(initech's agents\) went through the OTLP gateway with the "
        r"standard OTLP exporters: ([\d,]+) over OTLP/HTTP .* ([\d,]+) over OTLP/gRPC",
        out.stdout,
    )
    assert via is not None, out.stdout[-3000:]  # and all of them were stored:
    total, http, grpc = (int(n.replace(",", "")) for n in via.groups())
    assert total == http + grpc and http > 50 and grpc > 50
    # each run's own count: in the first two hours UTC the drifting agent's history on top of
    # the day's window is as long as the minute makes it, so two runs may store a few apart
    stored = [int(re.search(r"([\d,]+) events stored", run.stdout).group(1).replace(",", ""))  # type: ignore[union-attr]
              for run in (first, out)]  # fmt: skip
    assert f"The store now holds {sum(stored):,} events" in out.stdout
    store = connect(settings.clickhouse_dsn)
    try:
        kinds = dict(store.query_rows("SELECT kind, count() FROM vigil.audit_log GROUP BY kind"))
        tenants = store.query_rows(
            "SELECT uniqExact(tenant_id), uniqExact(agent_id) FROM vigil.audit_log"
        )[0]
        dlq = int(store.query_rows("SELECT count() FROM vigil.dlq")[0][0])
    finally:
        store.close()
    assert set(kinds) == {"interaction", "cost", "drift", "eval", "decision"}
    assert sum(kinds.values()) == sum(stored) >= 6000
    assert tenants[0] >= 3 and tenants[1] >= 6
    assert dlq >= 24
    assert "Cost per unit of work (USD):" in out.stdout
    # the workload passes acme's daily budget in vigil.yaml: warned before, then the breach
    alerts = out.stdout.split("Alerts today (rules in vigil.yaml):")[1].split("Ledger:")[0]
    # thresholds fire as spend passes them, so a big batch can jump straight past 100%
    spent = re.findall(r"daily budget of \$15\.00 for tenant=acme is (\d+)% spent", alerts)
    assert spent and max(int(p) for p in spent) >= 100, alerts
    assert "before the breach)" in alerts
    report = re.search(r"Report \(open it in a browser\): (\S+)", out.stdout)
    assert report is not None and Path(report[1]).read_text().count("<svg") >= 5
    _assert_costs_match_an_independent_recomputation(settings)

    def vigil(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    report = vigil("cost", "report", "--by", "unit", "--format", "json")
    assert report.returncode == 0, report.stderr
    units = [json.loads(line) for line in report.stdout.splitlines()]
    assert {u["agent_id"] for u in units} >= {"support-bot", "claims-triage", "doc-summarizer"}
    assert all(float(u["p50_usd"]) <= float(u["p95_usd"]) and int(u["units"]) > 0 for u in units)
    # --since in UTC, as every command's: nothing from the day after tomorrow, all since 2000
    later = (datetime.now(UTC) + timedelta(days=2)).date().isoformat()
    since = {day: vigil("cost", "report", "--since", day, "--format", "json")
             for day in (later, "2000-01-01")}  # fmt: skip
    assert since[later].returncode == 0 and since[later].stdout == "", since[later].stderr
    # an empty table printed nothing at all: it is said on stderr, the rows counted otherwise
    assert since[later].stderr == "nothing stored matches: no spend to report\n"
    everything = vigil("cost", "report", "--format", "json").stdout
    assert everything and since["2000-01-01"].stdout == everything
    rows = len(everything.splitlines())
    assert since["2000-01-01"].stderr == f"{rows:,} row(s) by unit\n"
    bad = vigil("cost", "report", "--since", "last week")
    assert bad.returncode == 2 and "--since: 'last week' is not a date" in bad.stderr, bad.stderr
    projected = vigil("cost", "project", "--agent", "support-bot", "--units", "1000")
    assert projected.returncode == 0, projected.stderr
    assert "1,000 tickets per month, projected from" in projected.stdout
    _assert_audit_commands_work(vigil, settings, out.stdout)


def _assert_audit_commands_work(vigil: Any, settings: Settings, demo_out: str) -> None:
    assert "vigil audit verify -> OK:" in demo_out  # the demo verified what it wrote
    verified = vigil("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("OK: ") and "no breaks" in verified.stdout
    anchor = settings.home / "anchor.json"
    assert vigil("audit", "anchor", "--out", str(anchor)).returncode == 0
    assert vigil("audit", "verify", "--anchor", str(anchor)).returncode == 0
    unit = re.search(r"vigil audit trail --unit (\S+) --tenant (\S+)", demo_out)
    assert unit is not None
    story = vigil("audit", "trail", "--unit", unit[1], "--tenant", unit[2])
    assert story.returncode == 0, story.stderr
    assert f"Trail of unit {unit[1]}" in story.stdout and "decision " in story.stdout
    assert "interaction " in story.stdout and "evaluation " in story.stdout
    records = vigil("audit", "trail", "--unit", unit[1], "--format", "json")
    kinds = [json.loads(line)["kind"] for line in records.stdout.splitlines()]
    assert "decision" in kinds and kinds.index("decision") > kinds.index("interaction")
    reviewer = json.loads(records.stdout.splitlines()[kinds.index("decision")])["reviewer_id"]
    by_user = vigil("audit", "trail", "--user", reviewer, "--format", "json")
    assert by_user.returncode == 0 and all(
        reviewer in (r["actor_user_id"], r["reviewer_id"])
        or r["event_id"]
        in {x["subject_event_id"] for x in map(json.loads, by_user.stdout.splitlines())}
        for r in map(json.loads, by_user.stdout.splitlines())
    )
    assert vigil("audit", "trail", "--trace", "no-such-trace").returncode == 1
    # someone with write access to the database edits what a model said
    store = connect(settings.clickhouse_dsn)
    try:
        store.command(
            "ALTER TABLE vigil.audit_log UPDATE output_text = 'all good' WHERE event_id = "
            "(SELECT min(event_id) FROM vigil.audit_log WHERE output_text IS NOT NULL) "
            "SETTINGS mutations_sync = 2"
        )
    finally:
        store.close()
    tampered = vigil("audit", "verify")
    assert tampered.returncode == 1
    assert "BREAK modified:" in tampered.stdout and "TAMPERED: 1 break(s)" in tampered.stdout


# the demo's models, mapped by hand to the catalog's names (independent of pipeline.prices)
_DEMO_MODELS = {
    "gpt-4o-2024-08-06": "gpt-4o",
    "gpt-4o-mini": "gpt-4o-mini",
    "claude-3-5-sonnet-20241022": "claude-3-5-sonnet",
    "claude-3-5-haiku-20241022": "claude-3-5-haiku",
    "gemini-1.5-pro": "gemini-1.5-pro",
    "mistral-large-latest": "mistral-large",
    "meta.llama3-1-70b-instruct-v1:0": "llama3-1-70b-instruct",
}


def _assert_costs_match_an_independent_recomputation(settings: Settings) -> None:
    import yaml

    catalog = yaml.safe_load((ROOT / "prices" / "default.yaml").read_text())
    latest: dict[str, dict] = {}
    for entry in sorted(catalog["models"], key=lambda e: str(e["effective_from"])):
        latest[entry["model"]] = entry  # the demo's events are all from today: newest price wins
    store = connect(settings.clickhouse_dsn)
    try:
        rows = store.query_rows(
            "SELECT model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, "
            "cost_status, price_version, team, agent_registered, agent_id, kind, amount FROM vigil.audit_log"
        )
    finally:
        store.close()
    priced = 0
    for (
        model,
        inp,
        out,
        cr,
        cw,
        cost,
        status,
        version,
        team,
        registered,
        agent,
        kind,
        amount,
    ) in rows:
        if kind == "interaction" and model == UNPRICED[1]:
            assert (cost, status, version) == (None, "unknown_model", ""), model
            continue
        if kind == "interaction":
            e = latest[_DEMO_MODELS[model]]
            price = {
                k: Fraction(str(e.get(k, e["input"])))
                for k in ("input", "output", "cache_read", "cache_write")
            }
            expected = (
                (inp - cr - cw) * price["input"]
                + cr * price["cache_read"]
                + cw * price["cache_write"]
                + out * price["output"]
            ) / 1_000_000
            assert status == "priced" and version == catalog["version"]
            assert Fraction(cost) == Fraction(
                round(Decimal(expected.numerator) / expected.denominator, 9)
            ), model
            priced += 1
        elif kind == "cost":
            assert status == "non_token" and cost == amount
        else:
            assert status == "none" and cost is None
        assert bool(registered) == (agent != "sql-copilot") and (team != "") == bool(registered)
    assert priced > 500


def test_dev_kafka_cli_starts_reports_and_stops_a_broker(tmp_path, kafka_bootstrap: str) -> None:  # type: ignore[no-untyped-def]
    env = {
        **os.environ,
        "VIGIL_HOME": str(tmp_path),
        "VIGIL_DEV_KAFKA_PORT": str(free_port(2)),
    }
    env.pop("VIGIL_KAFKA_BOOTSTRAP", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "dev", "kafka", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    assert cli("status").returncode == 3
    started = cli("start")
    assert started.returncode == 0, started.stderr
    try:
        status = cli("status")
        assert status.returncode == 0 and "running" in status.stdout
        emitter = Emitter(f"127.0.0.1:{env['VIGIL_DEV_KAFKA_PORT']}", "cli-test")
        emitter.emit_raw(None, b"hello")
        emitter.close(30)
        assert emitter.delivered == 1
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert cli("status").returncode == 3


def _processes_of(home: Path) -> list[int]:
    """The processes whose environment names ``home`` as VIGIL_HOME."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with suppress(OSError):
            if f"VIGIL_HOME={home}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
    return found


def test_the_demo_stops_what_it_started_when_its_reader_leaves(vigil_env: dict[str, str]) -> None:
    """`vigil demo | head`: the demo's next line met a closed pipe, and its clean-up began with a
    line of its own, so the worker and the gateway it had started ran on."""
    home = Path(vigil_env["VIGIL_HOME"])
    demo = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "demo", "--events", "300"],
        env={**vigil_env, "PYTHONUNBUFFERED": "1"}, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        said = [demo.stdout.readline() for _ in range(3)]
        assert said[-1].startswith("- sending"), said  # the worker and the gateway are up
        assert len(_processes_of(home)) >= 3  # the demo, its worker and its gateway
        demo.stdout.close()  # as `head -3` does
        assert demo.wait(120) == 141
    finally:
        if demo.poll() is None:
            demo.kill()
    wait_until(lambda: not _processes_of(home), 30, "the demo's worker and gateway stopped")


def test_the_worker_serves_its_health_and_what_it_has_done(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    """/readyz once the agents run, /metrics counting what was stored and dead-lettered, over
    HTTPS given a certificate (the other tests' workers serve plain HTTP); a second worker on
    the same address is told at start, before it touches the store, and one at another address
    (or a demo) that the store is the first one's."""
    from pipeline.certs import expiries
    from tests.integration.conftest import make_certificates, start_worker, vigil

    address = f"127.0.0.1:{free_port()}"
    made = make_certificates(tmp_path)
    env = {**vigil_env, "VIGIL_WORKER_HTTP_ADDRESS": address,
           "VIGIL_WORKER_TLS_CERT_LOCATION": str(made.cert),
           "VIGIL_WORKER_TLS_KEY_LOCATION": str(made.key)}  # fmt: skip
    worker, settings, store = start_worker(env)
    url = f"https://{address}"
    trusted = ssl.create_default_context(cafile=made.ca)

    def get(url: str) -> tuple[int, str]:
        return http_get(url, context=trusted)

    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    try:
        wait_until(lambda: get(f"{url}/readyz") == (200, "ready\n"), 30, "ready", worker.tail)
        assert get(f"{url}/healthz") == (200, "ok\n")
        assert worker.proc is not None
        os.kill(worker.proc.pid, signal.SIGHUP)  # the gateway's reload: the worker runs on
        for i in range(40):
            emitter.emit(Event(event_id=f"h-{i}", kind="interaction", ts=datetime.now(UTC),
                               tenant_id="acme", agent_id="bot",
                               body=Interaction("openai", "gpt-4o", input_tokens=i)))  # fmt: skip
        for i in range(5):
            emitter.emit_raw(b"acme/bot", b"\x00\x00\x00\x00\x04not avro " + str(i).encode())
        emitter.flush()
        said = ('vigil_worker_events_total{count="stored"} 40',
                'vigil_worker_events_total{count="dead_letters_stored"} 5')  # fmt: skip
        wait_until(lambda: all(line in get(f"{url}/metrics")[1] for line in said), 60,
                   "40 stored and 5 dead letters counted", worker.tail)  # fmt: skip
        assert count(store, "SELECT count() FROM vigil.audit_log") == 40
        metrics = get(f"{url}/metrics")[1].splitlines()
        assert "vigil_worker_ready 1" in metrics
        assert 'vigil_worker_events_total{count="validated"} 45' in metrics
        assert "vigil_worker_kafka_producer_renewals_total 0" in metrics
        until = min(expiries(made.cert)).timestamp()
        served = 'variable="VIGIL_WORKER_TLS_CERT_LOCATION"'
        assert f"vigil_worker_certificate_expiry_timestamp_seconds{{{served}}} {until}" in metrics
        assert "SIGHUP: the worker reads vigil.yaml only at start" in worker.tail(200)

        second = vigil(env, "worker")
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"vigil: error: VIGIL_WORKER_HTTP_ADDRESS {address}: Address already in use" in (
            second.stderr
        )
        # at an address of its own, it is told the store is the first one's
        second = vigil({**env, "VIGIL_WORKER_HTTP_ADDRESS": f"127.0.0.1:{free_port()}"}, "worker")
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.splitlines()[-1] == (
            f"vigil: error: the store is owned by process {worker.proc.pid} (a running worker); "
            "one worker at a time writes to an embedded store, so stop it first"
        )
        # the demo, which runs a worker of its own, is told so before it starts anything
        demo = vigil(env, "demo", "--events", "100")
        assert demo.returncode == 2 and demo.stdout == "", demo.stderr[-2000:]
        assert demo.stderr.splitlines()[-1] == (
            f"vigil: error: the store is owned by process {worker.proc.pid} (a running worker); "
            "the demo runs a worker of its own on it, so stop it first"
        )
        # and where its worker cannot start (the address is the first one's), says why, not
        # with a traceback
        demo = vigil({**env, "VIGIL_HOME": str(tmp_path / "other")}, "demo", "--events", "100")
        assert demo.returncode == 2, demo.stderr[-2000:]
        assert "vigil: error: the worker exited with 2 during start-up; see " in demo.stderr
        assert f"VIGIL_WORKER_HTTP_ADDRESS {address}: Address already in use" in demo.stderr
        assert "Traceback" not in demo.stderr
    finally:
        emitter.close()
        assert worker.stop() == 0, worker.tail()
