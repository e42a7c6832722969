"""A store filled by the demo's workload without Kafka: the same events, routed (validated,
redacted, enriched) and written by the real sinks, alerts evaluated by the real rules of the
repository's vigil.yaml (and posted to a webhook that took all but the first). For tests of what reads the store: dashboards and the report."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

from pipeline.access import apply_policies
from pipeline.alerting import ALERT_COLUMNS, DELIVERY_COLUMNS, Route, alert_row, pending_rows
from pipeline.alerts import Evaluator
from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.config import load_config
from pipeline.enrich import enrich
from pipeline.events import event_from_avro, event_to_avro
from pipeline.rows import Origin
from pipeline.sink import DlqSink, LedgerSink, Message
from pipeline.store import ClickHouseStore
from pipeline.validate import Limits, route
from pipeline.workload import generate, span_events
from tests.conftest import ROOT


def fill(store: ClickHouseStore, events: int = 8000, now: datetime | None = None) -> datetime:
    """Write the demo workload into a migrated store; returns the 'now' it was generated at."""
    now = now or datetime.now(UTC)
    registry = Registry.load()
    config = load_config(ROOT / "vigil.yaml", os.environ)
    apply_policies(store, config, server=False)
    workload = generate(events, now, seed=11, run_id="dash",
                        drift=("support-bot", now - timedelta(minutes=45)))  # fmt: skip
    raw = [(b"k", registry.encode(EVENT_SCHEMA, event_to_avro(e)))
           for e in span_events(workload.spans, seed=11)]  # fmt: skip
    raw += [(b"k", registry.encode(EVENT_SCHEMA, event_to_avro(e))) for e in workload.events]
    raw += [(b.key, b.value) for b in workload.bad]
    clean, dead = [], []
    for offset, (key, value) in enumerate(raw):
        origin = Origin("vigil.events.raw", offset % 4, offset)
        routed = route(value, key, origin, registry, Limits(), now, config.policy_for,
                       lambda e: enrich(e, config.catalog, config.agents))  # fmt: skip
        target = clean if routed.target == "clean" else dead
        target.append(Message(Origin("vigil.events." + routed.target, offset % 4, offset),
                              routed.key, routed.value))  # fmt: skip
    ledger = LedgerSink(store, registry, clock=lambda: now + timedelta(seconds=1))
    for i in range(0, len(clean), 2000):
        ledger.write(clean[i : i + 2000])
    DlqSink(store, registry, clock=lambda: now).write(dead)
    evaluator = Evaluator(config.rules)
    stored = sorted((event_from_avro(registry.decode(m.value, EVENT_SCHEMA)) for m in clean),
                    key=lambda e: e.ts)  # fmt: skip
    alerts = [a for e in stored for a in evaluator.observe(e)]
    if alerts:
        store.insert("vigil.alerts", [alert_row(a, now) for a in alerts], ALERT_COLUMNS, "demo")
        # an on-call webhook that took every page but the first, raised 20 minutes ago
        owed = pending_rows(alerts, [Route("http://127.0.0.1:9/oncall", name="oncall")], now)
        owed[0] = (*owed[0][:5], now - timedelta(minutes=20), *owed[0][6:])
        taken = [(*row[:4], "delivered", now + timedelta(seconds=1), "", 0) for row in owed[1:]]
        store.insert("vigil.alert_deliveries", owed + taken, DELIVERY_COLUMNS, "demo-pages")
    return now
