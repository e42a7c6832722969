"""``vigil dlq list|replay``: what was rejected and why, and a second chance for what a
configuration change has since made acceptable.

Replay re-runs each dead letter's payload through the same stages as the worker (validate,
redact, enrich) under today's settings and vigil.yaml. Those that pass are published again to
the raw topic, with their original key, and the worker stores them as it stores anything. A
replay is idempotent: the ledger keeps each event_id once, so replaying twice stores once. The
dead letters themselves stay in ``vigil.dlq``, the history of what was refused. Only payloads
that came from Kafka can be replayed (stage ``validate`` or ``ledger``). The gateway keeps a
description of what it rejected, not bytes to resend.

Payloads in the DLQ had their PII overwritten with ``*`` before they were stored. A replayed
event carries those asterisks, never the original values.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections import Counter
from datetime import UTC, datetime

from pipeline.settings import ConfigError, Settings
from pipeline.store import sql_literal

REPLAYABLE_STAGES = ("validate", "ledger")


def _where(args: argparse.Namespace) -> str:
    where = ["1"]
    if args.reason:
        where.append(f"reason_code = {sql_literal(args.reason)}")
    if args.since:
        try:
            since = datetime.fromisoformat(args.since)
        except ValueError:
            raise ConfigError(f"--since: {args.since!r} is not a date (YYYY-MM-DD)") from None
        where.append(f"received_at >= toDateTime64('{since:%Y-%m-%d %H:%M:%S}', 3, 'UTC')")
    if args.tenant:
        where.append(f"tenant_hint = {sql_literal(args.tenant)}")
    return " AND ".join(where)


def cmd_dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.store import open_store

    sql = (
        "SELECT received_at, stage, reason_code, tenant_hint, origin_topic, origin_partition, "
        "origin_offset, payload_bytes, reason FROM vigil.dlq "
        f"WHERE {_where(args)} ORDER BY received_at DESC LIMIT {int(args.limit)}"
    )
    fmt = {"table": "PrettyCompactMonoBlock", "json": "JSONEachRow", "csv": "CSVWithNames"}
    store = open_store(settings)
    try:
        out = store.query_raw(sql, fmt[args.format])
        counts = store.query_rows(
            f"SELECT reason_code, count() FROM vigil.dlq WHERE {_where(args)} GROUP BY 1 "
            "ORDER BY 2 DESC"
        )
    finally:
        store.close()
    sys.stdout.buffer.write(out)
    total = sum(int(n) for _, n in counts)
    summary = ", ".join(f"{code} {int(n):,}" for code, n in counts)
    print(f"{total:,} dead letter(s)" + (f": {summary}" if summary else ""), file=sys.stderr)
    return 0


def cmd_dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 when every selected dead letter was replayed or is still rightly rejected."""
    from connectors.sdk import Emitter
    from pipeline.codec import Registry
    from pipeline.config import load_config
    from pipeline.enrich import enrich
    from pipeline.events import InvalidEvent
    from pipeline.rows import Origin
    from pipeline.store import open_store
    from pipeline.validate import route

    config = load_config(settings.config_path, os.environ)
    registry = Registry.load()
    stages = ", ".join(sql_literal(s) for s in REPLAYABLE_STAGES)
    store = open_store(settings)
    try:
        rows = store.query_rows(
            "SELECT stage, reason_code, origin_key, base64Encode(payload), origin_topic, "
            f"origin_partition, origin_offset FROM vigil.dlq WHERE {_where(args)} AND stage IN "
            f"({stages}) ORDER BY received_at"
        )
        skipped = store.query_rows(
            f"SELECT count() FROM vigil.dlq WHERE {_where(args)} AND stage NOT IN ({stages})"
        )[0][0]
    finally:
        store.close()
    now = datetime.now(UTC)
    passing: list[tuple[bytes | None, bytes]] = []
    still: Counter[str] = Counter()
    for stage, _was, key_b64, payload_b64, topic, partition, offset in rows:
        key = base64.b64decode(key_b64) if key_b64 else None
        payload = base64.b64decode(payload_b64)
        try:
            # the ledger rejects a whole EventBatch it cannot read (an older ledger during an
            # upgrade would): its events are replayed one by one
            events = registry.events_in(payload) if stage == "ledger" else [payload]
        except InvalidEvent as exc:
            still[exc.code] += 1
            continue
        for event in events:
            routed = route(
                event, key, Origin(str(topic), int(partition), int(offset)), registry,
                settings.limits, now, config.policy_for,
                lambda e: enrich(e, config.catalog, config.agents),
            )  # fmt: skip
            if routed.target == "clean":
                passing.append((key, event))
            else:
                still[routed.reason_code or "unknown"] += 1
    verb = "would replay" if args.dry_run else "replayed"
    if passing and not args.dry_run:
        emitter = Emitter(settings.bootstrap, settings.topics.raw)
        for key, payload in passing:
            emitter.emit_raw(key, payload)
        emitter.close()
    print(json.dumps({
        "selected": len(rows), verb.replace(" ", "_"): len(passing),
        "still_rejected": dict(still), "not_replayable": int(skipped),
    }))  # fmt: skip
    print(
        f"{len(rows):,} replayable dead letter(s): {verb} {len(passing):,} to "
        f"{settings.topics.raw} (idempotent: an event already stored stays stored once); "
        f"{sum(still.values()):,} still rejected"
        + (f" ({', '.join(f'{k} {n}' for k, n in still.most_common())})" if still else "")
        + (f"; {int(skipped):,} from the gateway cannot be replayed" if skipped else ""),
        file=sys.stderr,
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dlq = sub.add_parser("dlq", help="the dead-letter queue: list it, replay what now passes")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    ls = dlq_sub.add_parser("list", help="rejected inputs with their reasons, newest first")
    rp = dlq_sub.add_parser("replay", help="re-ingest the dead letters that pass today's config")
    for p in (ls, rp):
        p.add_argument("--reason", help="only this reason_code (e.g. timestamp_past)")
        p.add_argument("--since", help="only those received from this date (YYYY-MM-DD)")
        p.add_argument("--tenant", help="only this tenant (from the message key)")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--format", choices=["table", "json", "csv"], default="table")
    ls.set_defaults(func=cmd_dlq_list)
    rp.add_argument("--dry-run", action="store_true", help="count, do not publish")
    rp.set_defaults(func=cmd_dlq_replay)
