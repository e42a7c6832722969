"""Writes Vigil's Grafana dashboards (``dashboards/*.json``) from the panel list below.

    python dashboards/build.py

The JSON files are what Grafana provisions and what the tests run; this script keeps their
variables, filters and layout consistent. Queries are for the official ClickHouse datasource
(``grafana-clickhouse-datasource``) and use its macros: ``$__timeFilter(col)``,
``$__timeInterval(col)``, ``$__fromTime``/``$__toTime``; but ``prometheus/processes.json``'s,
PromQL on the worker's and the gateway's own metrics, for a Prometheus datasource.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "vigil-clickhouse"}

# filters every panel on the ledger gets from the dashboard's variables
LEDGER = (
    "tenant_id IN (${tenant:singlequote}) AND team IN (${team:singlequote}) "
    "AND agent_id IN (${agent:singlequote}) AND environment IN (${environment:singlequote})"
)
VARIABLES = {
    "tenant": "SELECT DISTINCT tenant_id FROM vigil.audit_log ORDER BY 1",
    "team": "SELECT DISTINCT team FROM vigil.audit_log WHERE tenant_id IN (${tenant:singlequote}) "
    "ORDER BY 1",
    "agent": "SELECT DISTINCT agent_id FROM vigil.audit_log WHERE tenant_id IN "
    "(${tenant:singlequote}) AND team IN (${team:singlequote}) ORDER BY 1",
    "environment": "SELECT DISTINCT environment FROM vigil.audit_log ORDER BY 1",
}
SEARCH = ("user", "trace", "unit")  # free-text boxes on the audit dashboard

# (title, type, SQL, the columns the panel expects, width)
Panel = tuple[str, str, str, list[str], int]

COST: list[Panel] = [
    ("Spend by team", "timeseries",
     "SELECT $__timeInterval(ts) AS time, team, sum(ifNull(cost_usd, 0)) AS cost_usd "
     f"FROM vigil.audit_log WHERE $__timeFilter(ts) AND {LEDGER} GROUP BY time, team ORDER BY time",
     ["time", "team", "cost_usd"], 12),
    ("Spend by agent", "timeseries",
     "SELECT $__timeInterval(ts) AS time, agent_id, sum(ifNull(cost_usd, 0)) AS cost_usd "
     f"FROM vigil.audit_log WHERE $__timeFilter(ts) AND {LEDGER} GROUP BY time, agent_id "
     "ORDER BY time",
     ["time", "agent_id", "cost_usd"], 12),
    ("Spend by model", "barchart",
     "SELECT model, sum(ifNull(cost_usd, 0)) AS cost_usd, count() AS calls FROM vigil.audit_log "
     f"WHERE $__timeFilter(ts) AND {LEDGER} AND kind = 'interaction' GROUP BY model "
     "ORDER BY cost_usd DESC",
     ["model", "cost_usd", "calls"], 12),
    ("Cost per unit of work (p50 / p95) by agent", "table",
     "SELECT agent_id, unit_type, count() AS units, quantile(0.5)(cost_usd) AS p50_usd, "
     "quantile(0.95)(cost_usd) AS p95_usd, sum(cost_usd) AS total_usd FROM vigil.unit_costs "
     "WHERE started_at >= $__fromTime AND started_at <= $__toTime AND tenant_id IN "
     "(${tenant:singlequote}) AND agent_id IN (${agent:singlequote}) GROUP BY agent_id, unit_type "
     "ORDER BY p95_usd DESC",
     ["agent_id", "unit_type", "units", "p50_usd", "p95_usd", "total_usd"], 12),
    ("Budget burn-down this month: spent, projected and limit", "timeseries",
     "SELECT toDateTime(day) AS time, spent, spent / elapsed * month_seconds AS projected, "
     "limit_usd FROM (SELECT toDate(ts) AS day, sum(sum(ifNull(cost_usd, 0))) OVER (ORDER BY day) "
     "AS spent FROM vigil.audit_log WHERE ts >= toStartOfMonth(now()) AND tenant_id IN "
     "(${tenant:singlequote}) GROUP BY day) AS s CROSS JOIN (SELECT greatest(dateDiff('second', "
     "toDateTime(toStartOfMonth(now())), now()), 1) AS elapsed, dateDiff('second', "
     "toDateTime(toStartOfMonth(now())), toDateTime(toStartOfMonth(now()) + INTERVAL 1 MONTH)) "
     "AS month_seconds) AS m CROSS JOIN (SELECT sum(limit_usd) AS limit_usd FROM vigil.budgets "
     "WHERE period = 'month' AND team = '' AND agent_id = '' AND tenant_id IN "
     "(${tenant:singlequote})) AS b ORDER BY time",
     ["time", "spent", "projected", "limit_usd"], 12),
    ("Unpriced model usage (models missing from the catalog)", "table",
     "SELECT tenant_id, agent_id, model, count() AS calls, sum(input_tokens + output_tokens) AS "
     f"tokens FROM vigil.audit_log WHERE $__timeFilter(ts) AND {LEDGER} AND cost_status = "
     "'unknown_model' GROUP BY tenant_id, agent_id, model ORDER BY calls DESC",
     ["tenant_id", "agent_id", "model", "calls", "tokens"], 12),
]  # fmt: skip

AUDIT: list[Panel] = [
    ("Recent interactions and decisions", "table",
     "SELECT ts, kind, tenant_id, agent_id, unit_type, unit_id, trace_id, actor_user_id, "
     "model, cost_usd, decision, reviewer_id, reason FROM vigil.audit_log WHERE $__timeFilter(ts) "
     f"AND {LEDGER} AND kind IN ('interaction', 'decision') AND ('${{user}}' = '' OR "
     "actor_user_id = '${user}' OR reviewer_id = '${user}') AND ('${trace}' = '' OR trace_id = "
     "'${trace}') AND ('${unit}' = '' OR unit_id = '${unit}') ORDER BY ts DESC LIMIT 500",
     ["ts", "kind", "tenant_id", "agent_id", "unit_type", "unit_id", "trace_id", "actor_user_id",
      "model", "cost_usd", "decision", "reviewer_id", "reason"], 24),
    ("Redactions by type", "barchart",
     "SELECT r.type AS type, sum(r.count) AS found FROM vigil.audit_log ARRAY JOIN redactions AS "
     f"r WHERE $__timeFilter(ts) AND {LEDGER} GROUP BY type ORDER BY found DESC",
     ["type", "found"], 12),
    ("Human decisions by outcome", "piechart",
     "SELECT decision, count() AS decisions FROM vigil.audit_log WHERE $__timeFilter(ts) AND "
     f"{LEDGER} AND kind = 'decision' GROUP BY decision ORDER BY decisions DESC",
     ["decision", "decisions"], 12),
]  # fmt: skip

QUALITY: list[Panel] = [
    ("Drift statistics against their thresholds", "timeseries",
     "SELECT fired_at AS time, metric, observed, threshold FROM vigil.alerts FINAL WHERE "
     "kind = 'drift' AND fired_at >= $__fromTime AND fired_at <= $__toTime ORDER BY time",
     ["time", "metric", "observed", "threshold"], 12),
    ("Output tokens per call, p50 and p95 (1-minute rollups)", "timeseries",
     "SELECT $__timeInterval(window_start) AS time, agent_id, "
     "quantilesMerge(0.5, 0.95, 0.99)(latency_ms)[1] AS latency_p50_ms, "
     "sum(output_tokens) / greatest(sum(interactions), 1) AS output_tokens_per_call "
     "FROM vigil.rollups_1m WHERE $__timeFilter(window_start) AND tenant_id IN "
     "(${tenant:singlequote}) AND agent_id IN (${agent:singlequote}) GROUP BY time, agent_id "
     "ORDER BY time",
     ["time", "agent_id", "latency_p50_ms", "output_tokens_per_call"], 12),
    ("Eval scores", "timeseries",
     "SELECT $__timeInterval(ts) AS time, metric, avg(score) AS score, min(threshold) AS "
     f"threshold FROM vigil.audit_log WHERE $__timeFilter(ts) AND {LEDGER} AND kind = 'eval' "
     "GROUP BY time, metric ORDER BY time",
     ["time", "metric", "score", "threshold"], 12),
    ("Alerts", "table",
     "SELECT fired_at, kind, severity, tenant_id, agent_id, metric, observed, threshold, "
     "predicted_breach_at, message FROM vigil.alerts FINAL WHERE fired_at >= $__fromTime AND "
     "fired_at <= $__toTime AND tenant_id IN (${tenant:singlequote}, '*') ORDER BY fired_at DESC",
     ["fired_at", "kind", "severity", "tenant_id", "agent_id", "metric", "observed", "threshold",
      "predicted_breach_at", "message"], 12),
]  # fmt: skip

HEALTH: list[Panel] = [
    ("Events per second: stored and rejected", "timeseries",
     "SELECT time, sum(stored) / $__interval_s AS stored_per_s, sum(rejected) / $__interval_s AS "
     "rejected_per_s FROM (SELECT $__timeInterval(ingested_at) AS time, count() AS stored, 0 AS "
     "rejected FROM vigil.audit_log WHERE $__timeFilter(ingested_at) GROUP BY time UNION ALL "
     "SELECT $__timeInterval(stored_at) AS time, 0, count() FROM vigil.dlq WHERE "
     "$__timeFilter(stored_at) GROUP BY time) GROUP BY time ORDER BY time",
     ["time", "stored_per_s", "rejected_per_s"], 12),
    ("Freshness: event time to stored (p50 / p99)", "timeseries",
     "SELECT $__timeInterval(ingested_at) AS time, quantile(0.5)(dateDiff('millisecond', ts, "
     "ingested_at)) AS p50_ms, quantile(0.99)(dateDiff('millisecond', ts, ingested_at)) AS p99_ms "
     f"FROM vigil.audit_log WHERE $__timeFilter(ingested_at) AND {LEDGER} GROUP BY time "
     "ORDER BY time",
     ["time", "p50_ms", "p99_ms"], 12),
    ("Consumer lag by topic (messages not yet committed)", "timeseries",
     "SELECT $__timeInterval(at) AS time, topic, max(lag) AS lag FROM (SELECT at, topic, "
     "sum(lag) AS lag FROM vigil.consumer_lag WHERE $__timeFilter(at) GROUP BY at, topic) "
     "GROUP BY time, topic ORDER BY time",
     ["time", "topic", "lag"], 12),
    ("Behind: seconds since the last stored event", "stat",
     "SELECT dateDiff('second', max(ingested_at), now()) AS seconds_behind FROM vigil.audit_log",
     ["seconds_behind"], 12),
    # the clock quiet tenants' drift and eval windows are judged by (pipeline/alerting.py,
    # CaughtUp): a minute behind under steady traffic, as far as the pipeline while it is behind
    ("Caught up: seconds since the time every event sent before was evaluated", "stat",
     "SELECT dateDiff('second', maxOrNull(caught_up), now()) AS seconds_behind "
     "FROM vigil.caught_up",
     ["seconds_behind"], 12),
    ("Dead-letter queue by reason", "barchart",
     "SELECT reason_code, count() AS rejected FROM vigil.dlq WHERE $__timeFilter(stored_at) "
     "GROUP BY reason_code ORDER BY rejected DESC",
     ["reason_code", "rejected"], 12),
    # an alert's state for a route is the greatest of its latest round's rows' (pending <
    # delivered < given_up); a round begins with its pending row (vigil alerts redeliver)
    ("Alert webhooks: pages owed, delivered and given up, by route", "table",
     "SELECT route, countIf(standing = 'pending') AS owed, "
     "countIf(standing = 'delivered') AS delivered, countIf(standing = 'given_up') AS given_up, "
     "minIf(raised, standing = 'pending') AS oldest_owed "
     "FROM (SELECT alert_id, route, tupleElement(max((round, state)), 2) AS standing, "
     "argMaxIf(at, round, state = 'pending') AS raised FROM "
     "vigil.alert_deliveries WHERE fired_at >= $__fromTime AND fired_at <= $__toTime AND "
     "tenant_id IN (${tenant:singlequote}, '') GROUP BY alert_id, route) GROUP BY route "
     "ORDER BY owed DESC, route",
     ["route", "owed", "delivered", "given_up", "oldest_owed"], 12),
]  # fmt: skip

# Vigil's own processes, from their /metrics through Prometheus (dashboards/prometheus): what
# the ledger cannot say, such as what the gateway refused before anything reached Kafka. Each
# panel: (title, [(legend, PromQL)], unit, width, whether a running worker and gateway that
# have taken one export always give it data). $__rate_interval is Grafana's.
PROMETHEUS = {"type": "prometheus", "uid": "vigil-prometheus"}
RATE = "[$__rate_interval]"
ProcessPanel = tuple[str, list[tuple[str, str]], str, int, bool]
PROCESSES: list[ProcessPanel] = [
    ("Gateway: export requests per second, by status",
     [("{{code}}", f"sum by (code) (rate(vigil_gateway_requests_total{RATE}))")], "reqps", 12,
     True),
    ("Gateway: spans and log events per second",
     [("accepted", f"sum(rate(vigil_gateway_spans_accepted_total{RATE}))"),
      ("rejected (to the DLQ)", f"sum(rate(vigil_gateway_spans_rejected_total{RATE}))"),
      ("ignored (not GenAI)", f"sum(rate(vigil_gateway_spans_ignored_total{RATE}))")],
     "ops", 12, True),
    ("Gateway: time to answer an export, p50 and p99",
     [(f"p{q}", f"histogram_quantile(0.{q}, sum by (le) "
                f"(rate(vigil_gateway_request_seconds_bucket{RATE})))") for q in (50, 99)],
     "s", 12, True),
    ("Gateway: bytes of requests held, requests waiting for room, requests refused per second",
     [("held {{instance}}", "sum by (instance) (vigil_gateway_request_bytes_held)"),
      ("waiting {{instance}}", "sum by (instance) (vigil_gateway_requests_waiting)"),
      ("refused {{instance}}", f"sum by (instance) (rate(vigil_gateway_busy_total{RATE}))")],
     "bytes", 12, True),
    ("Gateway: messages waiting for Kafka",
     [("{{instance}}", "sum by (instance) (vigil_gateway_producer_queue_depth)")], "short", 12,
     True),
    ("Worker: events per second, by what was done with them",
     [("{{count}}", f"sum by (count) (rate(vigil_worker_events_total{RATE}))")], "ops", 12, True),
    ("Worker: failed attempts retried per second (the backlog waits in Kafka)",
     [("{{what}}", f"sum by (what) (rate(vigil_worker_retries_total{RATE}))")], "ops", 12, True),
    ("Worker: consumer lag by topic (messages)",
     [("{{group}} {{topic}}", "sum by (group, topic) (max by (group, topic, partition) "
                              "(vigil_worker_consumer_lag))")], "short", 12, True),
    ("Worker: resident memory",
     [("{{instance}}", "vigil_worker_resident_memory_bytes")], "bytes", 12, True),
    ("Certificates: days until each expires",
     [("{{instance}} {{variable}}",
       "(vigil_worker_certificate_expiry_timestamp_seconds - time()) / 86400 or "
       "(vigil_gateway_certificate_expiry_timestamp_seconds - time()) / 86400")], "d", 12,
     False),
]  # fmt: skip

DASHBOARDS = {
    "cost": ("Vigil: cost", COST),
    "audit": ("Vigil: audit", AUDIT),
    "quality": ("Vigil: quality and drift", QUALITY),
    "health": ("Vigil: pipeline health", HEALTH),
}


def _variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": name, "type": "query", "datasource": DATASOURCE,
        "query": query, "definition": query, "refresh": 2, "multi": True, "includeAll": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }  # fmt: skip


def dashboard(uid: str, title: str, panels: list[Panel]) -> dict[str, Any]:
    templating = [_variable(n, q) for n, q in VARIABLES.items()]
    if uid == "audit":
        templating += [{"name": s, "label": s, "type": "textbox", "query": "",
                        "current": {"text": "", "value": ""}} for s in SEARCH]  # fmt: skip
    out: list[dict[str, Any]] = []
    x = y = 0
    for i, (panel_title, kind, sql, columns, width) in enumerate(panels, start=1):
        if x + width > 24:
            x, y = 0, y + 9
        out.append({
            "id": i, "title": panel_title, "type": kind, "datasource": DATASOURCE,
            "gridPos": {"x": x, "y": y, "w": width, "h": 9},
            "targets": [{
                "refId": "A", "datasource": DATASOURCE, "editorType": "sql",
                "format": 1 if kind == "table" else 0, "queryType": "table" if kind == "table"
                else "timeseries" if kind == "timeseries" else "table",
                "rawSql": sql,
            }],
            "vigil": {"expected_columns": columns},
        })  # fmt: skip
        x += width
    return {
        "uid": f"vigil-{uid}", "title": title, "tags": ["vigil"], "schemaVersion": 39,
        "time": {"from": "now-24h", "to": "now"}, "refresh": "1m",
        "templating": {"list": templating}, "panels": out,
    }  # fmt: skip


def processes() -> dict[str, Any]:
    """The dashboard of Vigil's own processes, on the Prometheus datasource."""
    out: list[dict[str, Any]] = []
    for i, (title, queries, unit, width, always) in enumerate(PROCESSES, start=1):
        x, y = (i - 1) * width % 24, (i - 1) * width // 24 * 9
        out.append({
            "id": i, "title": title, "type": "timeseries", "datasource": PROMETHEUS,
            "gridPos": {"x": x, "y": y, "w": width, "h": 9},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + n), "datasource": PROMETHEUS, "expr": expr,
                         "legendFormat": legend} for n, (legend, expr) in enumerate(queries)],
            "vigil": {"always_has_data": always},
        })  # fmt: skip
    return {
        "uid": "vigil-processes", "title": "Vigil: its own processes", "tags": ["vigil"],
        "schemaVersion": 39, "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": []}, "panels": out,
    }  # fmt: skip


def main() -> None:
    for uid, (title, panels) in DASHBOARDS.items():
        path = HERE / f"{uid}.json"
        path.write_text(json.dumps(dashboard(uid, title, panels), indent=2) + "\n")
        print(f"wrote {path}")
    path = HERE / "prometheus" / "processes.json"
    path.write_text(json.dumps(processes(), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
