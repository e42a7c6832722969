"""``vigil demo``: the main job on the embedded default, end to end, with a readable summary.

Starts the local broker (unless VIGIL_KAFKA_BOOTSTRAP names one) and a worker, sends a
multi-tenant agent workload through the OpenTelemetry exporter and the SDK with malformed
payloads mixed in, waits until every valid event is queryable, prints what arrived, and
stops what it started. The data stays for ``vigil sql``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from confluent_kafka import KafkaException
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode, Tracer

from connectors.otel import VigilSpanExporter
from connectors.sdk import Emitter
from pipeline.config import key_digest, load_config
from pipeline.devkafka import LocalKafka
from pipeline.events import Event
from pipeline.lag import LAG_COLUMNS, consumer_lag
from pipeline.ledger import Retention, make_anchor, verify
from pipeline.owner import RemoteStore
from pipeline.report import render as render_report
from pipeline.services import (
    GatewayProcess,
    ServiceError,
    WorkerProcess,
    free_port,
    local_broker,
)
from pipeline.settings import ConfigError, Settings
from pipeline.store import Store, ensure_not_owned, sql_literal
from pipeline.topics import ensure_topics
from pipeline.trail import Selector, clipped, render, trail
from pipeline.workload import SpanSpec, Workload, generate

# initech's agents send through the OTLP gateway, the others through the Vigil exporter: one
# path per agent keeps each agent's spans in event-time order, as the alert windows expect
GATEWAY_TENANTS = ("initech",)
# which of them over OTLP/HTTP; the rest over OTLP/gRPC
OVER_HTTP = ("doc-summarizer",)
# how long the summary waits for the worker to acknowledge the run's last events
# (``wait_acknowledged``)
ACKNOWLEDGED_SECONDS = 60.0
# The demo sends two hours of agents' work in seconds: a span the BatchSpanProcessor held for a
# second (it exports every 5 s) arrived many minutes late in event time, after the SDK's events
# of its tenant had moved the tenant's clock past its drift window's end and grace, so the
# window was judged without it (the injected drift went unseen in some runs). Every exporter is
# flushed at each STEP of event time, as live agents' exporters keep up within seconds.
SEND_STEP = timedelta(minutes=1)
_LAG = LAG_COLUMNS.index("lag")
# the demo's policies (tenants and their gateway keys, budgets, drift and eval rules), used
# when VIGIL_CONFIG names none and the directory it runs in has no vigil.yaml
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "vigil.yaml"


@dataclasses.dataclass(frozen=True)
class GatewayEndpoints:
    """Where the demo's gateway listens, and the key of each tenant sending through it."""

    url: str  # OTLP/HTTP's base URL
    grpc: str  # OTLP/gRPC's host:port
    keys: Mapping[str, str] = dataclasses.field(repr=False)


def _otlp_tracers(
    gateway: GatewayEndpoints,
) -> dict[tuple[str, str], tuple[TracerProvider, Tracer]]:
    """Per tenant and protocol ("http", "grpc"): a TracerProvider with the standard OTLP
    exporter and that tenant's key, as an agent written against plain OpenTelemetry would
    have."""
    out = {}
    for tenant, key in gateway.keys.items():
        for protocol in ("http", "grpc"):
            provider = TracerProvider(resource=Resource.create({"service.name": "otlp-agents"}))
            exporter = (
                OTLPSpanExporter(endpoint=f"{gateway.url}/v1/traces",
                                 headers={"Authorization": f"Bearer {key}"},
                                 compression=Compression.Gzip)
                if protocol == "http" else
                GrpcSpanExporter(endpoint=gateway.grpc, insecure=True,
                                 headers={"authorization": f"Bearer {key}"},
                                 compression=grpc.Compression.Gzip)
            )  # fmt: skip
            provider.add_span_processor(
                BatchSpanProcessor(exporter, max_queue_size=20000, max_export_batch_size=512)
            )
            out[(tenant, protocol)] = (provider, provider.get_tracer("vigil.demo.otlp"))
    return out


def send_workload(
    workload: Workload,
    emitter: Emitter,
    *,
    progress: bool = True,
    gateway: GatewayEndpoints | None = None,
) -> Counter[str]:
    """Spans through a real OpenTelemetry TracerProvider + VigilSpanExporter, events and bad
    payloads through the SDK; with ``gateway``, its tenants' spans through the standard OTLP
    exporters to the gateway instead (the agents in OVER_HTTP over OTLP/HTTP, the others over
    OTLP/gRPC). Blocks until everything is delivered (raises DeliveryError). Returns how many
    spans went through the gateway by protocol."""
    provider = TracerProvider(resource=Resource.create({"service.name": "vigil-demo-agents"}))
    exporter = VigilSpanExporter(emitter)
    provider.add_span_processor(
        BatchSpanProcessor(exporter, max_queue_size=20000, max_export_batch_size=2000)
    )
    direct = provider.get_tracer("vigil.demo")
    otlp = _otlp_tracers(gateway) if gateway else {}
    via_gateway: Counter[str] = Counter()
    total = workload.valid_count + len(workload.bad)
    sent = 0
    bad = iter(workload.bad)
    every = max(1, workload.valid_count // max(1, len(workload.bad)))
    # spans and events merged in event-time order, as live agents would send them
    timeline: list[tuple[datetime, SpanSpec | Event]] = [(sp.start, sp) for sp in workload.spans]
    timeline += [(e.ts, e) for e in workload.events]
    timeline.sort(key=lambda item: item[0])
    step_ends = timeline[0][0] + SEND_STEP if timeline else None
    for i, (at, item) in enumerate(timeline):
        if step_ends is not None and at >= step_ends:
            for flushed in (provider, *(p for p, _ in otlp.values())):
                flushed.force_flush()
            step_ends = at + SEND_STEP
        if isinstance(item, Event):
            emitter.emit(item)
        else:
            start_ns = int(item.start.timestamp() * 1e9)
            tracer = direct
            protocol = "http" if item.attributes.get("gen_ai.agent.id") in OVER_HTTP else "grpc"
            path = (str(item.attributes.get("vigil.tenant_id")), protocol)
            if path in otlp:
                tracer = otlp[path][1]
                via_gateway[protocol] += 1
            span = tracer.start_span(item.name, start_time=start_ns, attributes=item.attributes)
            if item.error:
                span.set_status(Status(StatusCode.ERROR, "model call failed"))
            span.end(end_time=start_ns + int(item.duration_ms * 1e6))
        sent += 1
        if i % every == 0:
            payload = next(bad, None)
            if payload is not None:
                emitter.emit_raw(payload.key, payload.value)
                sent += 1
        if progress and sent % 5000 == 0:
            print(f"  sent {sent:,}/{total:,}", flush=True)
    for payload in bad:
        emitter.emit_raw(payload.key, payload.value)
    for (_, protocol), (otlp_provider, _) in otlp.items():
        if not otlp_provider.force_flush(120_000):
            raise ServiceError(
                f"the OTLP/{protocol.upper()} exporter could not deliver every span to the gateway"
            )
        otlp_provider.shutdown()
    provider.shutdown()
    emitter.close()
    return via_gateway


def wait_for(store: Store, sql: str, want: int, timeout: float, label: str) -> int:
    """Poll ``sql`` (a count) until it reaches ``want``; print progress. Returns the count."""
    deadline = time.monotonic() + timeout
    last_print = 0.0
    have = 0
    while time.monotonic() < deadline:
        have = int(store.query_rows(sql)[0][0])
        if have >= want:
            return have
        if time.monotonic() - last_print > 3:
            print(f"  {label}: {have:,}/{want:,} queryable", flush=True)
            last_print = time.monotonic()
        time.sleep(0.5)
    return have


def wait_acknowledged(settings: Settings, timeout: float) -> bool:
    """Wait until the worker's group has committed every message of the clean topic. The worker
    acknowledges a clean batch only once the alerts its events fired are stored, so the alerts
    read after this are all that the run's events fired: read as soon as the events were
    queryable, the last batch's alerts (the demo's drift alert among them) could still be on
    their way. Returns whether it was so within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    clean = (settings.topics.clean,)
    while True:
        try:
            rows, _gaps = consumer_lag(settings.kafka, settings.consumer_group, clean, 5.0)
        except KafkaException:
            rows = []  # asked again until the deadline
        if rows and all(row[_LAG] == 0 for row in rows):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))
    ]
    cells = [[str(h) for h in headers]] + [
        [f"{c:,}" if isinstance(c, int) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        (
            "  "
            + "  ".join(
                c.rjust(w) if numeric[i] else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        ).rstrip()
        for row in cells
    ]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(
    store: Store, run_id: str, since: datetime, elapsed: float, produced: int, bad_sent: int
) -> str:
    run = f"attributes['demo.run'] = '{run_id}'"
    by_kind = store.query_rows(
        f"SELECT kind, countIf(tenant_id='acme'), countIf(tenant_id='globex'), "
        f"countIf(tenant_id='initech'), count() FROM vigil.audit_log WHERE {run} "
        "GROUP BY kind ORDER BY kind"
    )
    by_agent = store.query_rows(
        f"SELECT tenant_id, agent_id, countIf(kind='interaction'), sum(input_tokens), "
        f"sum(output_tokens), countIf(status='error') FROM vigil.audit_log WHERE {run} "
        "GROUP BY ALL ORDER BY tenant_id, agent_id"
    )
    since_sql = since.strftime("%Y-%m-%d %H:%M:%S")
    dlq = store.query_rows(
        "SELECT reason_code, count(), any(reason) FROM vigil.dlq "
        f"WHERE received_at >= toDateTime64('{since_sql}', 3, 'UTC') GROUP BY reason_code "
        "ORDER BY count() DESC"
    )
    redacted = store.query_rows(
        "SELECT tupleElement(r, 'type'), sum(tupleElement(r, 'count')) FROM vigil.audit_log "
        f"ARRAY JOIN redactions AS r WHERE {run} GROUP BY 1 ORDER BY 2 DESC"
    )
    per_unit = store.query_rows(
        "SELECT unit_type, agent_id, count(), toFloat64(sum(cost_usd)), "
        "quantile(0.5)(toFloat64(cost_usd)), quantile(0.95)(toFloat64(cost_usd)) "
        "FROM (SELECT unit_type, agent_id, unit_id, sum(ifNull(cost_usd, 0)) AS cost_usd "
        f"FROM vigil.audit_log WHERE {run} AND unit_id != '' GROUP BY ALL) "
        "GROUP BY ALL ORDER BY agent_id"
    )
    total_rows = int(store.query_rows("SELECT count() FROM vigil.audit_log")[0][0])
    stored = sum(int(r[-1]) for r in by_kind)
    return "\n".join(
        [
            "",
            f"Vigil demo run {run_id}: {stored:,} events stored, "
            f"{sum(int(r[1]) for r in dlq):,} rejected",
            "",
            "Events by kind and tenant:",
            _table(
                [(*r[:4], r[4]) for r in by_kind], ("kind", "acme", "globex", "initech", "total")
            ),
            "",
            "Agents:",
            _table(by_agent, ("tenant", "agent", "calls", "input tok", "output tok", "errors")),
            "",
            "Cost per unit of work (USD):",
            _table(
                [
                    (u, a, int(n), f"{t:,.4f}", f"{p50:.4f}", f"{p95:.4f}")
                    for u, a, n, t, p50, p95 in per_unit
                ],
                ("unit", "agent", "units", "total", "p50", "p95"),
            ),
            "",
            "Redacted before storage: "
            + (", ".join(f"{kind} {int(n):,}" for kind, n in redacted) or "nothing found"),
            "",
            f"Dead-letter queue ({bad_sent} malformed payloads were mixed in):",
            _table(
                [(r[0], r[1], clipped(str(r[2]), 70)) for r in dlq], ("reason", "count", "example")
            ),
            "",
            f"Time: {elapsed:.1f}s from first event sent to the last one queryable; "
            f"{produced / elapsed:,.0f} events/s end to end.",
            f"The store now holds {total_rows:,} events in vigil.audit_log (all runs).",
        ]
    )


def run_demo(settings: Settings, events: int = 20_000, seed: int = 7) -> int:
    """The main job. Returns the process exit code (0: every valid event is queryable and
    every malformed payload is in the DLQ). SIGTERM or SIGHUP (the terminal closed) stops what
    it started, as Ctrl-C does."""
    with _signals_exit(signal.SIGTERM, signal.SIGHUP):
        return _run_demo(settings, events, seed)


@contextmanager
def _signals_exit(*signums: signal.Signals) -> Iterator[None]:
    """While inside, these signals raise SystemExit (128 + the signal), so that ``finally``
    blocks run: by default they end the process at once, leaving its children running."""

    def exit_now(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, exit_now) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_demo(settings: Settings, events: int, seed: int) -> int:
    began = time.monotonic()
    if settings.config_path is None:  # run outside the repository: its policy file, not none
        settings = dataclasses.replace(settings, config_path=DEMO_CONFIG)
    keys = {t: secrets.token_urlsafe(24) for t in DEMO_TENANTS}
    env = {**os.environ, "VIGIL_CONFIG": str(settings.config_path),
           **{f"VIGIL_DEMO_KEY_{t.upper()}": k for t, k in keys.items()}}  # fmt: skip
    config = load_config(settings.config_path, env)  # as the worker and the gateway read it
    for tenant in GATEWAY_TENANTS:
        if config.api_keys.get(key_digest(keys[tenant])) != tenant:
            raise ConfigError(
                f"{settings.config_path}: the demo sends {tenant}'s spans through the gateway "
                f"with the key in VIGIL_DEMO_KEY_{tenant.upper()}, which this file does not give "
                f"{tenant} (tenants.{tenant}.api_keys_env): run it with the demo's, {DEMO_CONFIG}"
            )
    # its worker would not open the store: said before a broker is started for nothing
    ensure_not_owned(settings, "the demo runs a worker of its own on it")
    run_id = f"run-{datetime.now(UTC):%Y%m%d%H%M%S}-{uuid.uuid4().hex[:4]}"
    print(f"Vigil demo {run_id}: home {settings.home}, policies {settings.config_path}")
    broker: LocalKafka | None = None
    if settings.kafka_bootstrap is None:
        broker = local_broker(settings)
        started_broker = broker.pid() is None
        print(f"- starting the local Kafka broker on {broker.bootstrap} ...", flush=True)
        broker.start()
        if not started_broker:
            broker = None  # someone else's broker: leave it running
    ensure_topics(settings)
    worker = WorkerProcess(settings, env)
    gateway = GatewayProcess(settings, free_port(), env, grpc_port=free_port())
    try:
        print("- starting the worker and the OTLP gateway ...", flush=True)
        owner = worker.start()
        gateway_url = gateway.start()
        store: Store = owner if isinstance(owner, RemoteStore) else _server_store(settings)
        since = datetime.now(UTC).replace(microsecond=0)
        now = datetime.now(UTC)
        window = _todays_window(now)
        drift_since = now - DRIFT_SHIFTED
        workload = generate(events, now, seed=seed, run_id=run_id,
                            drift=(DRIFT_AGENT, drift_since), window=window,
                            drift_history=DRIFT_HISTORY)  # fmt: skip
        total = workload.valid_count + len(workload.bad)
        print(
            f"- sending {workload.valid_count:,} events ({len(workload.spans):,} as "
            f"OpenTelemetry spans, {len(workload.events):,} through the SDK) and "
            f"{len(workload.bad)} malformed payloads ...",
            flush=True,
        )
        t0 = time.monotonic()
        through = GatewayEndpoints(gateway_url, f"127.0.0.1:{gateway.grpc_port}",
                                   {t: keys[t] for t in GATEWAY_TENANTS})  # fmt: skip
        via = send_workload(workload, Emitter.from_settings(settings), gateway=through)
        print(
            f"  {via.total():,} of the spans ({', '.join(GATEWAY_TENANTS)}'s agents) went through "
            f"the OTLP gateway with the standard OTLP exporters: {via['http']:,} over OTLP/HTTP "
            f"to {gateway_url} ({', '.join(OVER_HTTP)}), {via['grpc']:,} over OTLP/gRPC to "
            f"{through.grpc} (the others)",
            flush=True,
        )
        print("- waiting until every event is queryable ...", flush=True)
        stored = wait_for(
            store,
            f"SELECT count() FROM vigil.audit_log WHERE attributes['demo.run'] = '{run_id}'",
            workload.valid_count,
            300,
            "audit_log",
        )
        since_sql = since.strftime("%Y-%m-%d %H:%M:%S")
        rejected = wait_for(
            store,
            "SELECT count() FROM vigil.dlq WHERE received_at >= "
            f"toDateTime64('{since_sql}', 3, 'UTC')",
            len(workload.bad),
            60,
            "dlq",
        )
        elapsed = time.monotonic() - t0
        if not wait_acknowledged(settings, ACKNOWLEDGED_SECONDS):
            print(f"  the worker has not acknowledged every event within "
                  f"{ACKNOWLEDGED_SECONDS:.0f}s: alerts of the last ones may be missing below",
                  flush=True)  # fmt: skip
        print(summary(store, run_id, since, elapsed, total, len(workload.bad)))
        print(alerts_summary(store, now, drift_since))
        ledger_ok = verify_ledger(store, settings, config.retention, run_id)
        report = settings.home / "report.html"
        report.write_text(render_report(store, config.rules.budgets))
        print(f"\nReport (open it in a browser): {report}")
        ok = stored == workload.valid_count and rejected == len(workload.bad) and ledger_ok
        if not ok:
            print(
                f"\nINCOMPLETE: {stored:,}/{workload.valid_count:,} events and "
                f"{rejected}/{len(workload.bad)} rejections arrived; see {worker.log_path}"
            )
    finally:
        with suppress(OSError):  # stdout gone (`vigil demo | head`): stop them all the same
            print("- stopping the gateway, the worker"
                  + (" and the broker" if broker else "") + " ...", flush=True)  # fmt: skip
        gateway.stop()
        code = worker.stop()
        if broker is not None:
            broker.stop()
    if code not in (0, None):
        raise ServiceError(f"the worker exited with {code}; see {worker.log_path}")
    print(f"Done in {time.monotonic() - began:.0f}s. Query it:")
    print('  .venv/bin/vigil sql "SELECT kind, count() FROM vigil.audit_log GROUP BY kind"')
    print("  .venv/bin/vigil audit verify")
    return 0 if ok else 1


def verify_ledger(store: Store, settings: Settings, retention: Retention, run_id: str) -> bool:
    """Verify every hash chain, anchor the heads under $VIGIL_HOME/anchors, and show the audit
    trail of one unit of work of this run that a person reviewed."""
    print("\nLedger:", flush=True)
    verdict = verify(store, retention)
    print(f"  vigil audit verify -> {verdict.line()}")
    for b in verdict.breaks[:5]:
        print(f"  BREAK {b}")
    anchors = settings.home / "anchors"
    anchors.mkdir(parents=True, exist_ok=True)
    anchor_path = anchors / f"{run_id}.json"
    anchor_path.write_text(json.dumps(make_anchor(store), indent=1) + "\n")
    print(f"  chain heads anchored in {anchor_path} (keep a copy elsewhere)")
    run = f"attributes['demo.run'] = {sql_literal(run_id)}"
    reviewed = store.query_rows(  # a reviewed unit, one with a (redacted) prompt if there is one
        "SELECT unit_type, unit_id, tenant_id FROM vigil.audit_log WHERE unit_id IN (SELECT "
        f"unit_id FROM vigil.audit_log WHERE kind = 'decision' AND {run}) AND {run} "
        "GROUP BY ALL ORDER BY countIf(input_text IS NOT NULL) DESC, unit_id LIMIT 1"
    )
    if reviewed:
        unit_type, unit_id, tenant = (str(v) for v in reviewed[0])
        selector = Selector("unit", f"{unit_type}:{unit_id}", tenant)
        print(f"\n  vigil audit trail --unit {unit_type}:{unit_id} --tenant {tenant}")
        print(textwrap.indent("".join(render(selector, *trail(store, selector))), "  "), end="")
    return verdict.ok


DEMO_TENANTS = ("acme", "globex", "initech")
DRIFT_AGENT = "support-bot"
# its output tokens are tripled for the last 45 minutes of two hours of its units of work, the
# first 75 minutes of which are vigil.yaml's drift rule's baseline (an hour) and first window. A
# run in the day's first two hours (UTC) keeps its workload to today, for the daily budget; the
# agent's units then still go back two hours, on top of it (``workload.generate``'s
# ``drift_history``): before, no drift alert could fire then, its baseline being incomplete.
DRIFT_SHIFTED = timedelta(minutes=45)
DRIFT_HISTORY = timedelta(hours=2)


def alerts_summary(store: Store, now: datetime, drift_since: datetime) -> str:
    """Today's alerts (the rules are in vigil.yaml), with how early each one came: a budget
    warning before its breach, a forecast before its predicted breach, a drift alert after the
    shift the demo injected."""
    day = now.strftime("%Y-%m-%d")
    rows = store.query_rows(
        "SELECT kind, severity, tenant_id, agent_id, team, metric, observed, threshold, "
        "toUnixTimestamp64Milli(fired_at), toUnixTimestamp64Milli(predicted_breach_at), message "
        f"FROM vigil.alerts FINAL WHERE toDate(fired_at) = '{day}' ORDER BY fired_at LIMIT 20"
    )
    lines = ["", "Alerts today (rules in vigil.yaml):"]
    if not rows:
        return "\n".join([*lines, "  none"])

    def at(ms: Any) -> datetime:
        return datetime.fromtimestamp(int(ms) / 1000, tz=UTC)

    breach = {(r[2], r[3], r[4]): at(r[8]) for r in rows
              if r[0] == "budget_threshold" and r[1] == "critical"}  # fmt: skip
    for kind, _sev, tenant, agent, team, _metric, _obs, _thr, fired, predicted, msg in rows:
        when = at(fired)
        lead = ""
        if kind == "budget_threshold" and (tenant, agent, team) in breach:
            ahead = breach[(tenant, agent, team)] - when
            if ahead > timedelta(0):
                lead = f"  (warned {_minutes(ahead)} before the breach)"
        elif kind == "budget_forecast" and predicted is not None:
            lead = f"  (predicted breach {_minutes(at(predicted) - when)} ahead)"
        elif kind == "drift" and when >= drift_since:
            lead = f"  (detected {_minutes(when - drift_since)} after the injected shift)"
        lines.append(f"  {when:%H:%M:%S}  {kind:<16} {msg}{lead}")
    return "\n".join(lines)


def _todays_window(now: datetime) -> timedelta:
    """Two hours of history, shortened after midnight UTC so that the day's budgets see the
    whole workload (never under 20 minutes)."""
    since_midnight = now - now.replace(hour=0, minute=0, second=0, microsecond=0)
    return max(
        timedelta(minutes=20), min(timedelta(hours=2), since_midnight - timedelta(minutes=3))
    )


def _minutes(delta: timedelta) -> str:
    minutes = delta.total_seconds() / 60
    return f"{minutes / 1440:.1f} days" if minutes >= 2880 else f"{minutes:.0f} min"


def _server_store(settings: Settings) -> Store:
    from pipeline.store import connect

    return connect(settings.clickhouse_dsn)
