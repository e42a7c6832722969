"""``vigil enrich`` and ``vigil cost report|project|reprice``: the cost commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter
from pathlib import Path

from pipeline.settings import ConfigError, Settings, parse_date
from pipeline.store import sql_literal


def cmd_enrich(args: argparse.Namespace, settings: Settings) -> int:
    """JSON events on stdin -> the same events with cost_usd, cost_status, price_version,
    owner and team on stdout; what could not be priced, summarised on stderr."""
    from pipeline.config import load_config
    from pipeline.enrich import enrich
    from pipeline.events import InvalidEvent, event_from_json, json_line

    config = load_config(settings.config_path, os.environ)
    statuses: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            obj = json_line(line)
            event = enrich(event_from_json(obj), config.catalog, config.agents)
        except InvalidEvent as exc:
            print(
                f"vigil: error: line {number}: {exc}; stopping so no line is skipped",
                file=sys.stderr,
            )
            return 2
        e = event.enrichment
        assert e is not None
        statuses[e.cost_status] += 1
        if e.cost_status == "unknown_model":
            unknown[obj.get("model", "?")] += 1
        obj.update(dataclasses.asdict(e))
        print(json.dumps(obj, ensure_ascii=False))
    print(", ".join(f"{k}={n}" for k, n in statuses.most_common()) or "no events", file=sys.stderr)
    for model, n in unknown.most_common():
        print(f"not in catalog {config.catalog.version}: {model} ({n} events)", file=sys.stderr)
    return 0


REPORT_SQL = {
    "unit": "SELECT tenant_id, unit_type, agent_id, count() AS units, "
    "round(sum(cost_usd), 4) AS total_usd, round(avg(toFloat64(cost_usd)), 6) AS mean_usd, "
    "round(quantile(0.5)(toFloat64(cost_usd)), 6) AS p50_usd, "
    "round(quantile(0.95)(toFloat64(cost_usd)), 6) AS p95_usd "
    "FROM vigil.unit_costs WHERE {where} GROUP BY ALL ORDER BY total_usd DESC",
    "agent": "SELECT tenant_id, team, agent_id, sum(events) AS events, "
    "round(sum(cost_usd), 4) AS cost_usd, sum(unpriced_events) AS unpriced "
    "FROM vigil.spend_daily WHERE {where} GROUP BY ALL ORDER BY cost_usd DESC",
    "team": "SELECT tenant_id, team, sum(events) AS events, round(sum(cost_usd), 4) AS cost_usd, "
    "sum(unpriced_events) AS unpriced FROM vigil.spend_daily WHERE {where} "
    "GROUP BY ALL ORDER BY cost_usd DESC",
    "model": "SELECT tenant_id, model, sum(events) AS events, round(sum(cost_usd), 4) AS cost_usd, "
    "sum(unpriced_events) AS unpriced FROM vigil.spend_daily WHERE {where} AND model != '' "
    "GROUP BY ALL ORDER BY cost_usd DESC",
}


def cmd_cost_report(args: argparse.Namespace, settings: Settings) -> int:
    """Spend and cost per unit of work from the views, as a table, CSV or JSON."""
    from pipeline.store import LIST_FORMATS, date_literal, open_store, unheld

    day = "started_at" if args.by == "unit" else "day"
    where = ["1"]
    if args.tenant:
        where.append(f"tenant_id = {sql_literal(args.tenant)}")
    if args.since:  # in UTC unless it names its zone, as every command's --since
        where.append(f"{day} >= {date_literal(args.since, '--since')}")
    store = open_store(settings)
    try:
        sql = REPORT_SQL[args.by].format(where=" AND ".join(where))
        out = store.query_raw(sql, LIST_FORMATS[args.format])
        rows = int(store.query_rows(f"SELECT count() FROM ({sql})")[0][0])
        missing = [] if rows else unheld(store, "vigil.audit_log", "event", tenant_id=args.tenant)
    finally:
        store.close()
    sys.stdout.buffer.write(out)
    # said apart from the table, as `dlq list` and `alerts list` say theirs: an empty table
    # printed nothing at all
    print(f"{rows:,} row(s) by {args.by}" if rows else "nothing stored matches: no spend to "
          "report", file=sys.stderr)  # fmt: skip
    for said in missing:
        print(f"vigil cost report: {said}", file=sys.stderr)
    return 0


def cmd_cost_project(args: argparse.Namespace, settings: Settings) -> int:
    """What N more units of work by one agent will cost, from its observed units."""
    from pipeline.projection import NotEnoughData, project
    from pipeline.store import open_store, unheld

    where = [f"agent_id = {sql_literal(args.agent)}"]
    if args.tenant:
        where.append(f"tenant_id = {sql_literal(args.tenant)}")
    if args.unit_type:
        where.append(f"unit_type = {sql_literal(args.unit_type)}")
    store = open_store(settings)
    try:
        rows = store.query_rows(
            "SELECT toFloat64(cost_usd), unit_type FROM vigil.unit_costs WHERE "
            + " AND ".join(where)
        )
        # a mistyped agent was "only 0 unit(s) observed", as if it had worked too little
        missing = [] if rows else unheld(
            store, "vigil.audit_log", "event",
            agent_id=args.agent, tenant_id=args.tenant, unit_type=args.unit_type,
        )  # fmt: skip
    finally:
        store.close()
    types = sorted({r[1] for r in rows})
    if len(types) > 1:
        print(
            f"vigil: error: agent {args.agent} works on several unit types ({', '.join(types)}); "
            "choose one with --unit-type",
            file=sys.stderr,
        )
        return 2
    try:
        p = project([r[0] for r in rows], args.units)
    except NotEnoughData as exc:
        print(f"vigil: error: {args.agent}: {exc}", file=sys.stderr)
        for said in missing:
            print(f"vigil cost project: {said}", file=sys.stderr)
        return 2
    unit = types[0] if types else "unit"
    print(
        f"{args.agent}: {args.units:,} {unit}s per {args.period}, "
        f"projected from {p.based_on_units:,} observed {unit}s"
    )
    print(
        f"  per {unit}: mean ${p.per_unit_mean:,.4f}, p50 ${p.per_unit_p50:,.4f}, "
        f"p95 ${p.per_unit_p95:,.4f}"
    )
    print(
        f"  per {args.period}: expected ${p.total_expected:,.2f}, p50 ${p.total_p50:,.2f}, "
        f"p95 ${p.total_p95:,.2f}"
    )
    return 0


def cmd_cost_reprice(args: argparse.Namespace, settings: Settings) -> int:
    """Recompute history under another catalog; differences go to vigil.cost_adjustments."""
    from pipeline.config import load_config
    from pipeline.events import InvalidEvent
    from pipeline.prices import Catalog
    from pipeline.progress import Every
    from pipeline.reprice import reprice
    from pipeline.store import connect, ensure_not_owned, migrate

    config = load_config(settings.config_path, os.environ)
    catalog = Catalog.load(Path(args.catalog), config.catalog.aliases)
    since = parse_date(args.since) if args.since else None
    ensure_not_owned(settings, "repricing writes adjustments")
    every = Every(2.0)

    def progress(examined: int, recorded: int) -> None:
        if every.due():
            print(f"reprice: {examined:,} interactions examined, {recorded:,} adjustments "
                  "recorded ...", file=sys.stderr)  # fmt: skip

    store = connect(settings.clickhouse_dsn)
    try:
        migrate(store)
        result = reprice(store, catalog, since, progress=progress)
    except InvalidEvent as exc:  # nothing was recorded
        raise ConfigError(f"--catalog {args.catalog}: {exc.reason}") from None
    finally:
        store.close()
    print(
        f"repriced {result.examined:,} interactions under catalog {result.version}: "
        f"{result.changed:,} changed ({result.already_recorded:,} recorded before), "
        f"{result.newly_priced:,} newly priced, {result.newly_unpriced:,} no longer priced"
    )
    print(
        f"  old total ${result.old_total:,.6f}  new total ${result.new_total:,.6f}  "
        f"difference ${result.delta:+,.6f}"
    )
    for model, delta in sorted(result.by_model.items(), key=lambda kv: -abs(kv[1])):
        print(f"  {model:<44} {delta:+,.6f}")
    return 0
