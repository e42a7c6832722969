"""``vigil alerts backtest|list|redeliver``: the alert rules tried on history, the alerts
raised with how their webhooks' deliveries stand, and a page given up on owed again.

A webhook that did not take a page for ``VIGIL_ALERT_DELIVERY_HOURS`` has it given up on
(``alerting.Notifier``). Once the webhook is mended, ``redeliver`` begins a new delivery round
for those pages: a ``pending`` row in ``vigil.alert_deliveries``, which the worker's next sweep
posts, for as long again. It writes to the store, so on the embedded one it runs while no worker
owns it; on a ClickHouse server, as a user who may INSERT into ``vigil.alert_deliveries``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from operator import itemgetter
from typing import TYPE_CHECKING, TextIO

from pipeline.alerting import (
    ALERT_DELIVERY_TABLE,
    DELIVERY_COLUMNS,
    DELIVERY_STATE,
    caught_up_times,
    ledger_history,
)
from pipeline.alerts import KINDS
from pipeline.events import Cost, Decision, Event, Interaction
from pipeline.progress import Every
from pipeline.settings import (
    ConfigError,
    Settings,
    as_utc,
    config_option,
    count_argument,
    parse_date,
)
from pipeline.store import LIST_FORMATS, Store, open_store, options_filter, unheld

if TYPE_CHECKING:
    from pipeline.config import Config


def cmd_alerts_backtest(args: argparse.Namespace, settings: Settings) -> int:
    """The events of --events (JSON, one per line) or of the ledger (--since, stored since
    then), replayed on event time through the alert evaluators of --config; the alerts on
    stdout as JSON lines as they fire, a summary on stderr, and how far it has got every 2 s.
    The ledger's events come with the caught-up times the workers stored between them
    (``alerting.CaughtUp``), which their evaluators were told of (``Evaluator.caught_up``)."""
    from pipeline.alerts import Alert, Evaluator
    from pipeline.config import load_config

    if (args.events is None) == (args.since is None):
        raise ConfigError("vigil alerts backtest: give --events FILE or --since DATE")
    if args.events is not None and (args.until is not None or args.tenant is not None):
        raise ConfigError("--until and --tenant choose the ledger's events: give them with --since")
    since = parse_date(args.since) if args.since is not None else None
    until = parse_date(args.until, "--until") if args.until is not None else None
    if until is not None and since is not None and until <= since:
        raise ConfigError(f"--until: {until:%Y-%m-%d %H:%M} UTC is not after --since")
    config = load_config(settings.config_path, os.environ)
    evaluator = Evaluator(config.rules)
    every = Every(2.0)
    replayed = 0
    kinds: Counter[str] = Counter()
    missing: list[str] = []
    with ExitStack() as held:
        file: _FileEvents | None = None
        store: Store | None = None
        quiet: deque[datetime] = deque()  # the caught-up times still to be told of
        if args.events is not None:
            file = _FileEvents(args.events, settings, config, every)
            events = held.enter_context(file.in_time_order())
        else:
            assert since is not None
            store = held.enter_context(closing(open_store(settings)))
            quiet.extend(caught_up_times(store, since, until, settings.consumer_group))
            events = held.enter_context(closing(ledger_history(store, since, until, args.tenant)))

        def printed(fired: list[Alert]) -> None:
            for alert in fired:
                print(json.dumps(alert.to_json()), flush=True)
                kinds[alert.kind] += 1

        for replayed, event in enumerate(events, start=1):
            while quiet and quiet[0] <= event.ts:  # a time before the events stored after it
                printed(evaluator.caught_up(quiet.popleft()))
            printed(evaluator.observe(event))
            if every.due():
                of = f" of {file.taken:,}" if file is not None else ""
                print(f"backtest: {replayed:,}{of} events replayed ...", file=sys.stderr,
                      flush=True)  # fmt: skip
        while quiet:
            printed(evaluator.caught_up(quiet.popleft()))
        if store is not None and not replayed:  # a mistyped tenant: "0 alert(s) from 0 events"
            missing = unheld(store, "vigil.audit_log", "event", tenant_id=args.tenant)
    skipped = file.skipped if file is not None else 0
    print(
        f"{kinds.total()} alert(s) from {replayed:,} events"
        + (f" ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})" if kinds else "")
        + (f"; {skipped} line(s) skipped" if skipped else ""),
        file=sys.stderr,
    )
    for said in missing:
        print(f"vigil alerts backtest: {said}", file=sys.stderr)
    return 0


class _FileEvents:
    """The JSON events of a file, one per line, checked as the worker checks them (but for
    their age: history may be older than it accepts) and enriched if they are not; a line it
    would reject is skipped, named on stderr with its reason. ``in_time_order`` reads the file
    as it goes and sorts it by event time in runs kept in temporary files (``spill.in_order``),
    each event as the worker's Avro bytes: held whole, 300,000 events took 750 MB."""

    def __init__(self, path: str, settings: Settings, config: Config, every: Every) -> None:
        from pipeline.codec import Registry

        self.path = path
        self.taken = self.skipped = 0
        self._settings = settings
        self._config = config
        self._every = every
        self._registry = Registry.load()

    @contextmanager
    def in_time_order(self) -> Iterator[Iterator[Event]]:
        from pipeline.spill import in_order

        read = self._registry.read_event
        with ExitStack() as files:
            source: TextIO = sys.stdin  # ``main`` keeps its bytes that are not UTF-8 too
            if self.path != "-":
                try:  # bytes that are not UTF-8 kept, so that their line is named (json_line)
                    source = files.enter_context(
                        open(self.path, encoding="utf-8", errors="surrogateescape")
                    )
                except OSError as exc:
                    raise ConfigError(
                        f"--events: cannot read {self.path} ({exc.strerror})"
                    ) from None
            checked = in_order(self._checked(source), itemgetter(0), "vigil-backtest-")
            events = files.enter_context(closing(checked))
            yield (read(body) for _, body in events)

    def _checked(self, lines: Iterable[str]) -> Iterator[tuple[datetime, bytes]]:
        from pipeline.enrich import enrich
        from pipeline.events import InvalidEvent, event_from_json, json_line
        from pipeline.validate import check_event

        config = self._config
        for number, line in enumerate(lines, start=1):
            if self._every.due():
                print(f"backtest: {number:,} lines read ...", file=sys.stderr, flush=True)
            if not line.strip():
                continue
            try:
                event = check_event(event_from_json(json_line(line)), self._settings.limits, None)
                if event.enrichment is None:
                    event = enrich(event, config.catalog, config.agents)
                self._registry.encode_checked(event)  # one the worker would refuse is skipped
                # kept as the worker would store it, read back after the sort (pickled as it
                # is, an Event took twice as long to spill and to read back)
                body = self._registry.encode_event(_what_evaluators_read(event))
            except InvalidEvent as exc:
                self.skipped += 1
                where = "stdin" if self.path == "-" else self.path
                print(f"{where}:{number}: skipped: {exc}", file=sys.stderr)
                continue
            self.taken += 1
            yield event.ts, body


def _what_evaluators_read(event: Event) -> Event:
    """``event`` without the texts, attributes, actor and unit no alert rule reads: the
    temporary files of a backtest hold none of what a prompt, an answer or a user's name says
    (the file's events are not redacted), and less."""
    body = event.body
    if isinstance(body, Interaction):
        body = replace(body, input_text=None, output_text=None)
    elif isinstance(body, Cost):
        body = replace(body, description=None)
    elif isinstance(body, Decision):
        body = replace(body, reason=None)
    return replace(event, body=body, attributes={}, actor=None, unit=None, redactions=())


# each alert's webhook routes by how its delivery stands (vigil.alert_deliveries: an alert's
# state for a route is the greatest of its latest round's rows', DELIVERY_STATE)
_ALERTS_LIST_SQL = """
SELECT a.fired_at AS fired_at, a.kind AS kind, a.severity AS severity, a.tenant_id AS tenant,
       a.message AS message, d.delivered AS delivered_to, d.owed AS owed_to,
       d.given_up AS given_up_for, a.alert_id AS alert_id
FROM (SELECT * FROM vigil.alerts FINAL WHERE {where}) AS a
LEFT JOIN (
    SELECT alert_id,
           arrayStringConcat(arraySort(groupArrayIf(route, standing = 'delivered')), ',')
               AS delivered,
           arrayStringConcat(arraySort(groupArrayIf(route, standing = 'pending')), ',') AS owed,
           arrayStringConcat(arraySort(groupArrayIf(route, standing = 'given_up')), ',')
               AS given_up
    FROM (SELECT alert_id, route, {state} AS standing FROM vigil.alert_deliveries
          GROUP BY alert_id, route)
    GROUP BY alert_id
) AS d ON a.alert_id = d.alert_id
{owed}
ORDER BY fired_at DESC
"""


def cmd_alerts_list(args: argparse.Namespace, settings: Settings) -> int:
    """The alerts stored, newest first, with the webhook routes each was delivered to, is
    owed to, or was given up for; a count on stderr."""
    where = options_filter(("fired_at", args.since), tenant_id=args.tenant, kind=args.kind)
    sql = _ALERTS_LIST_SQL.format(
        where=where, state=DELIVERY_STATE, owed="WHERE d.owed != ''" if args.owed else ""
    )
    store = open_store(settings)
    try:
        out = store.query_raw(f"{sql} LIMIT {int(args.limit)}", LIST_FORMATS[args.format])
        (alerts, owed) = store.query_rows(f"SELECT count(), countIf(owed_to != '') FROM ({sql})")[0]
        missing = [] if int(alerts) else unheld(store, "vigil.alerts FINAL", "alert",
                                                tenant_id=args.tenant)  # fmt: skip
    finally:
        store.close()
    sys.stdout.buffer.write(out)
    print(f"{int(alerts):,} alert(s); {int(owed):,} still owed to a webhook", file=sys.stderr)
    for said in missing:
        print(f"vigil alerts list: {said}", file=sys.stderr)
    return 0


# each page given up on, by alert and route: how its latest round stands, that round, the
# alert's body, tenant and time
_GIVEN_UP_SQL = """
SELECT alert_id, route, any(tenant_id), any(fired_at), max(round),
       argMaxIf(body, round, state = 'pending')
FROM vigil.alert_deliveries
WHERE {where}
GROUP BY alert_id, route
HAVING {state} = 'given_up'
ORDER BY 4, 1, 2
"""


def cmd_alerts_redeliver(args: argparse.Namespace, settings: Settings) -> int:
    """Owe again, in a new delivery round, the pages given up on that match the options and
    whose route is still configured; the worker's next sweep posts them. Counts on stderr."""
    from pipeline.config import load_config
    from pipeline.store import ensure_not_owned

    config = load_config(settings.config_path, os.environ)
    routes = {route.key for route in config.routes}
    if args.route is not None and args.route not in routes:
        raise ConfigError(f"--route: no route {args.route!r} in the policy file")
    where = options_filter(
        ("fired_at", args.since), tenant_id=args.tenant, route=args.route, alert_id=args.alert
    )
    if not args.dry_run:
        ensure_not_owned(settings, "redeliver writes to it")
    store = open_store(settings)
    try:
        given_up = store.query_rows(_GIVEN_UP_SQL.format(where=where, state=DELIVERY_STATE))
        now = datetime.now(UTC)
        owed = [
            (alert, route, tenant, as_utc(fired_at), "pending", now, body, int(last) + 1)
            for alert, route, tenant, fired_at, last, body in given_up
            if route in routes
        ]
        gone = Counter(row[1] for row in given_up if row[1] not in routes)
        missing = (
            []
            if given_up
            else unheld(
                store, "vigil.alerts FINAL", "alert", tenant_id=args.tenant, alert_id=args.alert
            )
        )
        if owed and not args.dry_run:
            store.insert(ALERT_DELIVERY_TABLE, owed, DELIVERY_COLUMNS,
                         f"redeliver-{now.isoformat()}")  # fmt: skip
    finally:
        store.close()
    for route, count in sorted(gone.items()):
        print(f"{count:,} page(s) for route {route} left given up: it is no longer in the "
              "policy file", file=sys.stderr)  # fmt: skip
    by_route = Counter(row[1] for row in owed)
    each = ", ".join(f"{route} {count:,}" for route, count in sorted(by_route.items()))
    if args.dry_run:
        print(f"{len(owed):,} page(s) given up on would be owed again" + (f" ({each})" if each
              else ""), file=sys.stderr)  # fmt: skip
    elif owed:
        print(f"{len(owed):,} page(s) owed again ({each}); the worker posts them at its next "
              f"sweep, for {settings.alert_delivery_hours:g} h", file=sys.stderr)  # fmt: skip
    else:
        print("no page given up on matches", file=sys.stderr)
    for said in missing:
        print(f"vigil alerts redeliver: {said}", file=sys.stderr)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    alerts = sub.add_parser("alerts", help="alert rules, and the alerts raised")
    alerts_sub = alerts.add_subparsers(dest="action", required=True)
    bt = alerts_sub.add_parser(
        "backtest", help="replay events (a file's, or the ledger's) through the alert rules"
    )
    bt.add_argument("--events", help="JSON events, one per line ('-': stdin)")
    # dates read by the command, as every --since is: as argparse's ``type``, parse_date's
    # ConfigError (a ValueError) came out as "invalid parse_date value: 'today'"
    bt.add_argument("--since", help="or the ledger's, stored from this date (YYYY-MM-DD, UTC)")
    bt.add_argument("--until", help="with --since: stored before this date")
    bt.add_argument("--tenant", help="with --since: only this tenant's")
    config_option(bt, "the rules")
    bt.set_defaults(func=cmd_alerts_backtest)
    ls = alerts_sub.add_parser(
        "list", help="the alerts stored, newest first, with their webhooks' deliveries"
    )
    ls.add_argument("--since", help="only those fired from this date (YYYY-MM-DD)")
    ls.add_argument("--tenant", help="only this tenant's")
    ls.add_argument("--kind", choices=KINDS, help="only this kind")
    ls.add_argument("--owed", action="store_true", help="only those a webhook has not got")
    ls.add_argument("--limit", type=count_argument, default=50, help="at most this many (50)")
    ls.add_argument("--format", choices=list(LIST_FORMATS), default="table",
                    help="how to print them (table)")  # fmt: skip
    ls.set_defaults(func=cmd_alerts_list)
    rd = alerts_sub.add_parser(
        "redeliver", help="owe again the pages a webhook was given up on, once it is mended"
    )
    rd.add_argument("--since", help="only alerts fired from this date (YYYY-MM-DD)")
    rd.add_argument("--tenant", help="only this tenant's")
    rd.add_argument("--route", help="only this route (its name, or the key alerts list shows)")
    rd.add_argument("--alert", help="only this alert_id")
    rd.add_argument("--dry-run", action="store_true", help="count, write nothing")
    config_option(rd, "the routes")
    rd.set_defaults(func=cmd_alerts_redeliver)
