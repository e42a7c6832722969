"""Alerts in the running worker: the evaluators fed by the ledger, and delivery.

The worker feeds ``pipeline.alerts.Evaluator`` with exactly the events the ledger sink has just
stored (each event once, whatever Kafka redelivers). Whenever it is assigned clean partitions,
the evaluator is rebuilt from the ledger itself for the tenants of those partitions
(``HeldAlerts``): the spend of the current budget periods (summed an hour of an agent) and the
samples of the drift and eval baselines are replayed, and what they would fire is dropped (it
fired before the restart or the rebalance, or is history now), but for what the worker never
raised of it (``unraised``).

Every alert goes to the ``vigil.alerts`` table (idempotent: ``alert_id`` is derived from what
fired) and the alerts topic, and to each webhook route whose ``match`` it meets, as JSON or as
a Slack-compatible ``{"text": ...}`` payload. Each route is posted from a thread of its own with
a timeout and retries; an unreachable one is logged and never holds the pipeline back, and what
it did not get stays owed in ``vigil.alert_deliveries`` and is posted again (``Notifier``).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import http.client
import json
import logging
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import closing, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, NamedTuple

from pipeline.alerts import (
    ALERTS_KEYS,
    ANOMALY_HISTORY,
    CATEGORICAL_FIELDS,
    EVAL_BASELINE_WINDOWS,
    KINDS,
    NUMERIC_FIELDS,
    SEVERITIES,
    Alert,
    AlertRules,
    DriftMonitor,
    EvalRule,
    Evaluator,
    as_stored,
    period_bounds,
)
from pipeline.events import Cost, Decision, Drift, Enrichment, Eval, Event, Interaction
from pipeline.settings import ConfigError, as_utc, list_of, mapping_of, name_of
from pipeline.store import Store, sql_literal

log = logging.getLogger("vigil.alerts")

ALERT_TABLE = "vigil.alerts"
ALERT_COLUMNS = (
    "alert_id", "kind", "severity", "tenant_id", "team", "agent_id", "metric", "fired_at",
    "observed", "threshold", "predicted_breach_at", "message", "stored_at",
)  # fmt: skip


def alert_id(alert: Alert) -> str:
    what = [alert.kind, sorted(alert.scope.items()), alert.metric, alert.threshold,
            alert.fired_at.isoformat()]  # fmt: skip
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]


def alert_row(alert: Alert, stored_at: datetime) -> tuple[Any, ...]:
    s = alert.scope
    return (
        alert_id(alert), alert.kind, alert.severity, s.get("tenant", ""), s.get("team", ""),
        s.get("agent", ""), alert.metric, alert.fired_at, alert.observed, alert.threshold,
        alert.predicted_breach_at, alert.message, stored_at,
    )  # fmt: skip


def alert_json(alert: Alert) -> bytes:
    return json.dumps({"alert_id": alert_id(alert), **alert.to_json()}).encode()


# --- delivery --------------------------------------------------------------------------

ALERT_DELIVERY_TABLE = "vigil.alert_deliveries"
DELIVERY_COLUMNS = ("alert_id", "route", "tenant_id", "fired_at", "state", "at", "body", "round")
# how a delivery stands, over its rows grouped by (alert_id, route): the greatest state of its
# latest round
DELIVERY_STATE = "tupleElement(max((round, state)), 2)"
RETRY_BACKOFF_SECONDS = 0.5  # doubled at each attempt of one post


@dataclass(frozen=True)
class Route:
    webhook: str = field(repr=False)  # a Slack webhook's path is a secret
    match: Mapping[str, str] = field(default_factory=dict)
    format: str = "json"  # json | slack
    name: str = ""  # what the deliveries table calls it; else a digest of all the above

    def matches(self, alert: Alert) -> bool:
        fields = {"kind": alert.kind, "severity": alert.severity, **alert.scope}
        return all(fields.get(k) == v for k, v in self.match.items())

    @property
    def key(self) -> str:
        """The route's name in ``vigil.alert_deliveries``: never its URL."""
        if self.name:
            return self.name
        what = json.dumps([self.format, self.webhook, sorted(self.match.items())])
        return "webhook-" + hashlib.sha256(what.encode()).hexdigest()[:12]


def parse_routes(raw: Mapping[str, Any]) -> list[Route]:
    """``alerts: {routes: [{match: {severity: critical}, webhook: URL, format: slack,
    name: oncall}]}``."""
    alerts = mapping_of(raw.get("alerts") or {}, ALERTS_KEYS, "alerts")
    routes: list[Route] = []
    for i, spec in enumerate(list_of(alerts.get("routes"), "alerts.routes")):
        where = f"alerts.routes[{i}]"
        if not isinstance(spec, Mapping) or not str(spec.get("webhook", "")).startswith(
            ("http://", "https://")
        ):
            raise ConfigError(f"{where}.webhook: expected an http(s) URL")
        mapping_of(spec, ("webhook", "match", "format", "name"), where)
        match = mapping_of(spec.get("match") or {}, ("kind", "severity", "tenant", "team", "agent"),
                           f"{where}.match")  # fmt: skip
        for key, known in (("kind", KINDS), ("severity", SEVERITIES)):
            if key in match and match[key] not in known:
                raise ConfigError(f"{where}.match.{key}: expected one of {', '.join(known)}, "
                                  f"got {match[key]!r}")  # fmt: skip
        fmt = spec.get("format", "json")
        if fmt not in ("json", "slack"):
            raise ConfigError(f"{where}.format: expected json or slack, got {fmt!r}")
        name = str(spec.get("name") or "")
        if name and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"{where}.name: expected letters, digits, '_', '.' or '-', got "
                              f"{name!r}")  # fmt: skip
        matched = {str(k): name_of(match, k, f"{where}.match", "") for k in match}
        route = Route(str(spec["webhook"]), matched, fmt, name)
        if any(r.key == route.key for r in routes):
            raise ConfigError(f"{where}: a second route named {route.key!r} (the same webhook, "
                              "format and match as another, or the same name)")  # fmt: skip
        routes.append(route)
    return routes


def payload(alert: Mapping[str, Any], fmt: str) -> bytes:
    """The body posted for ``alert`` (its JSON, ``alert_json``) in format ``fmt``."""
    if fmt == "slack":
        icon = ":rotating_light:" if alert["severity"] == "critical" else ":warning:"
        return json.dumps({"text": f"{icon} *{alert['kind']}* {alert['message']}"}).encode()
    return json.dumps(alert).encode()


def pending_rows(
    alerts: Iterable[Alert], routes: Iterable[Route], now: datetime
) -> list[tuple[Any, ...]]:
    """``vigil.alert_deliveries`` rows saying each alert is owed to each route it matches,
    stored before the alert is (``Notifier.sweep`` posts what was never delivered)."""
    routes = list(routes)
    rows = []
    for alert in alerts:
        body = alert_json(alert).decode()
        doc = json.loads(body)
        for route in routes:
            if route.matches(alert):
                rows.append(_state_row(doc, route.key, "pending", now, body))
    return rows


def _state_row(
    alert: Mapping[str, Any],
    route: str,
    state: str,
    at: datetime,
    body: str = "",
    delivery_round: int = 0,
) -> tuple[Any, ...]:
    """A ``vigil.alert_deliveries`` row of ``alert`` (its JSON, ``alert_json``) in delivery
    round ``delivery_round`` (``vigil alerts redeliver`` begins a new one)."""
    fired_at = datetime.fromisoformat(alert["fired_at"])
    tenant = alert["scope"].get("tenant", "")
    return (alert["alert_id"], route, tenant, fired_at, state, at, body, delivery_round)


class Notifier:
    """Posts alerts to webhooks off the pipeline's path, and keeps posting what was not
    delivered until it is.

    Each route has a thread of its own, so a webhook that hangs delays no other. A post is
    tried ``attempts`` times with backoff; one not delivered then (or not posted: the backlog
    was full, or the worker stopped first) stays owed in ``vigil.alert_deliveries``
    (``pending_rows``), and ``sweep`` posts it again, once each sweep, until it is delivered or
    ``give_up_after`` has passed since it was raised (then it is recorded ``given_up`` and
    logged at ERROR). A sweep says at WARNING how many each route still owes; its posts fail
    quietly. ``record(rows, dedup_token=...)`` stores deliveries' rows (DELIVERY_COLUMNS).
    Delivery is at least once: a receiver tells a repeat by ``alert_id``."""

    def __init__(
        self,
        routes: Sequence[Route],
        record: Callable[..., None],
        timeout: float = 5.0,
        attempts: int = 3,
        backlog: int = 1000,
        give_up_after: timedelta = timedelta(hours=24),
    ) -> None:
        self.routes = {route.key: route for route in routes}
        self.timeout = timeout
        self.attempts = attempts
        self.give_up_after = give_up_after
        self._record = record
        self._posters = {key: _Poster(key) for key in self.routes}
        self._slots = threading.BoundedSemaphore(backlog)
        self._lock = threading.Lock()
        self._in_flight: set[tuple[str, str]] = set()  # (alert_id, route key)
        self._counts = {"delivered": 0, "failed": 0, "given_up": 0}
        # route -> alerts it owed at this worker's last sweep; empty while it does not sweep
        self.owed_now: dict[str, int] = {}

    @property
    def longest_post(self) -> float:
        """The most seconds one ``submit``'s post takes before it is given up for the sweep."""
        backoff = sum(RETRY_BACKOFF_SECONDS * 2**a for a in range(1, self.attempts))
        return float(self.attempts * self.timeout + backoff)

    @property
    def _window(self) -> str:
        return f"{self.give_up_after.total_seconds() / 3600:g} h"

    def submit(self, alert: Alert) -> None:
        """Post ``alert`` to every route it matches (its rows are pending already)."""
        doc = json.loads(alert_json(alert))
        for route in self.routes.values():
            if route.matches(alert):
                self._post_later(route, doc, self.attempts)

    def _post_later(
        self, route: Route, doc: Mapping[str, Any], attempts: int, delivery_round: int = 0
    ) -> bool:
        """Queue a post of ``doc`` to ``route`` (owed in round ``delivery_round``); False if it
        is being posted already or the backlog is full (it stays owed)."""
        key = (doc["alert_id"], route.key)
        with self._lock:
            if key in self._in_flight:
                return False
            if not self._slots.acquire(blocking=False):
                log.error("webhook backlog full; %s alert not posted to %s yet (it is owed, and "
                          "posted at a later sweep)", doc["kind"], route.key)  # fmt: skip
                return False
            self._in_flight.add(key)
        self._posters[route.key].submit(partial(self._post, route, doc, attempts, delivery_round))
        return True

    def _post(
        self, route: Route, doc: Mapping[str, Any], attempts: int, delivery_round: int
    ) -> None:
        # a sweep's post (one attempt) fails quietly: the sweep says what is owed, once a route
        level = logging.DEBUG if attempts == 1 else logging.WARNING
        try:
            body = payload(doc, route.format)
            for attempt in range(1, attempts + 1):
                if attempt > 1:
                    time.sleep(RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1))
                request = urllib.request.Request(
                    route.webhook, data=body, method="POST",
                    headers={"Content-Type": "application/json", "User-Agent": "vigil-alerts"},
                )  # fmt: skip
                try:
                    with _WEBHOOKS.open(request, timeout=self.timeout) as reply:
                        reply.read(_MOST_REPLY_BYTES)  # an answer's size is the webhook's
                except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                    log.log(level, "webhook %s (%s), attempt %d/%d: %s", route.key,
                            _host(route.webhook), attempt, attempts, _why(exc))  # fmt: skip
                    continue
                self._delivered(route, doc, delivery_round)
                return
            self._count("failed")
            log.log(logging.DEBUG if attempts == 1 else logging.ERROR,
                    "webhook %s (%s): %s alert not delivered after %d attempt(s); posted again "
                    "at the next sweep", route.key, _host(route.webhook), doc["kind"],
                    attempts)  # fmt: skip
        finally:
            with self._lock:
                self._in_flight.discard((doc["alert_id"], route.key))
            self._slots.release()

    def _delivered(self, route: Route, doc: Mapping[str, Any], delivery_round: int) -> None:
        self._count("delivered")
        row = _state_row(
            doc, route.key, "delivered", datetime.now(UTC), delivery_round=delivery_round
        )
        try:
            self._record([row], dedup_token=f"delivered-{row[0]}-{row[1]}-{delivery_round}")
        except Exception as exc:  # the store is down: the sweep posts it again (a repeat)
            log.warning("%s alert delivered to %s but not recorded (%s): it will be posted "
                        "again", doc["kind"], route.key, exc)  # fmt: skip

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1

    def counts(self) -> dict[str, int]:
        """Posts delivered, posts that failed every attempt (left for the sweep), and alerts
        given up on."""
        with self._lock:
            return dict(self._counts)

    def sweep(self, store: Store, now: datetime) -> int:
        """Post again, once, each alert still owed to a route (``vigil.alert_deliveries``)
        that is not being posted now and was raised more than ``longest_post`` ago (by this
        worker or another: the one holding clean partition 0 sweeps); give up those raised
        more than ``give_up_after`` ago, and those owed to a route no longer configured.
        Returns how many it posted."""
        settled = now - timedelta(seconds=self.longest_post + 1)
        posted = 0
        owed: dict[str, tuple[int, datetime]] = {}  # route -> (alerts, the first raised)
        given_up: list[tuple[Any, ...]] = []
        owed_rows = store.query_rows(_OWED_SQL.format(before=_at(settled)))
        for alert, route_key, raised, delivery_round in owed_rows:
            route = self.routes.get(route_key)
            raised = as_utc(raised)
            doc = json.loads(alert)
            if route is not None and raised >= now - self.give_up_after:
                posted += self._post_later(route, doc, 1, int(delivery_round))
                count, first = owed.get(route_key, (0, raised))
                owed[route_key] = (count + 1, min(first, raised))
                continue
            why = ("its route is no longer configured" if route is None else
                   f"it was not delivered in {self._window}")  # fmt: skip
            log.error("%s alert %s (fired %s) given up on for %s: %s", doc["kind"],
                      doc["alert_id"], doc["fired_at"], route_key, why)  # fmt: skip
            given_up.append(
                _state_row(doc, route_key, "given_up", now, delivery_round=int(delivery_round))
            )
        self.owed_now = {key: owed[key][0] if key in owed else 0 for key in self.routes}
        for route_key, (count, first) in sorted(owed.items()):
            route = self.routes[route_key]
            log.warning("webhook %s (%s) still owes %d alert(s), the first raised %s: posting "
                        "again, until %s after each was raised", route_key, _host(route.webhook),
                        count, f"{first:%Y-%m-%d %H:%M:%S} UTC", self._window)  # fmt: skip
        if given_up:
            self._record(given_up, dedup_token=f"given-up-{given_up[0][0]}-{now.isoformat()}")
            for _ in given_up:
                self._count("given_up")
        return posted

    def close(self, wait: bool = True) -> None:
        """Stop posting: with ``wait``, once what is queued is posted; without, at once (what
        is queued or in progress stays owed, for the next sweep)."""
        for poster in self._posters.values():
            poster.close(wait)


class _Poster:
    """A route's posts, one at a time, on a daemon thread of its own: a post in progress when
    the worker exits does not hold the exit up (a webhook that hangs would, for the whole of its
    attempts), and stays owed."""

    def __init__(self, route: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"vigil-webhook-{route}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        self._calls.put(call)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                call()
            except Exception as exc:  # a route's thread outlives any one post
                # its kind only: a message may hold the webhook's URL, whose path is a secret
                log.error("webhook post failed: %s (the alert stays owed)", type(exc).__name__)

    def close(self, wait: bool) -> None:
        if not wait:
            with suppress(queue.Empty):
                while True:
                    self._calls.get_nowait()
        self._calls.put(None)
        if wait:
            self._thread.join()


# the body of each alert owed to a route, when its delivery round began and the round: its
# latest round is pending, neither delivered nor given up (the states' order: pending <
# delivered < given_up), and began before {before}
_OWED_SQL = f"""
SELECT argMaxIf(body, round, state = 'pending'), route, argMaxIf(at, round, state = 'pending'),
       max(round)
FROM vigil.alert_deliveries
GROUP BY alert_id, route
HAVING {DELIVERY_STATE} = 'pending' AND argMaxIf(at, round, state = 'pending') < {{before}}
ORDER BY 3
"""


class _NotFollowed(urllib.request.HTTPRedirectHandler):
    """A webhook's redirect is a failed post. urllib followed a 301, 302 or 303 by a GET of
    the new address, without the alert, and took its 200 for a delivery; and a route's
    alerts should go where the route says, not wherever it sends them."""

    def redirect_request(self, *args: Any) -> None:
        return None  # urllib then raises HTTPError with the 3xx


_WEBHOOKS = urllib.request.build_opener(_NotFollowed)
_MOST_REPLY_BYTES = 1 << 16


def _why(exc: Exception) -> str:
    """Why a post failed, a redirect's new address by its host only (its path may be as
    secret as a Slack webhook's)."""
    if isinstance(exc, urllib.error.HTTPError) and 300 <= exc.code < 400:
        moved = exc.headers.get("Location") or ""
        to = _host(moved) if "://" in moved else "another path" if moved else "nowhere said"
        return (f"answered {exc.code}, to {to}: a webhook is not followed to another "
                "address; point the route at it")  # fmt: skip
    return str(exc)


def _host(url: str) -> str:
    """Where a webhook goes, without its path (Slack webhook paths are secrets)."""
    return "/".join(url.split("/")[:3])


# --- rebuilding state from the ledger --------------------------------------------------


def _spend_since(rules: AlertRules, now: datetime) -> datetime:
    """Since when the budgets and the spend anomaly need the spend: the start of every
    budget's period, the anomaly's trailing day."""
    return min([now - ANOMALY_HISTORY, *(period_bounds(b.period, now)[0] for b in rules.budgets)])


def _drift_since(monitor: DriftMonitor, now: datetime) -> datetime:
    """Since when a drift monitor needs its samples: its baseline, and the window before."""
    trailing = monitor.baseline_window or timedelta(0)
    return monitor.baseline_from or now - trailing - 2 * monitor.window


def _eval_since(rule: EvalRule, now: datetime) -> datetime:
    """Since when an eval rule needs its scores: its baseline's windows and the current."""
    return now - (EVAL_BASELINE_WINDOWS + 1) * rule.window


def _samples_since(rules: AlertRules, now: datetime) -> datetime | None:
    """Since when the drift and eval rules need their samples: the drift baselines, a day of
    eval windows. None without such rules."""
    starts = [_drift_since(m, now) for m in rules.drift]
    starts += [_eval_since(r, now) for r in rules.evals]
    return min(starts, default=None)


# An event's time as the worker's evaluators took it when it was stored (``alerts.as_stored``):
# no later than its ingested_at. Each query keeps its bound on ts itself too (what is no
# later than ingested_at is no later than ts): that is what the engine prunes parts by.
_STORED_TS = "least(ts, ingested_at)"


def _sample_clauses(rules: AlertRules, now: datetime) -> list[str]:
    """A condition on the ledger's rows for each drift and eval rule: the events it reads
    (``alerts.DriftWatch``, ``alerts.EvalWatch``; they skip every other) since its history
    begins. A monitor of one agent's latency reads that agent's interactions of its baseline,
    not every interaction since the longest rule's history."""
    clauses = []
    for m in rules.drift:
        if m.metric in NUMERIC_FIELDS or m.metric in CATEGORICAL_FIELDS:
            what = "kind = 'interaction'"
        else:
            what = f"kind = 'drift' AND metric = {sql_literal(m.metric)}"
        for column, value in (("agent_id", m.agent), ("tenant_id", m.tenant)):
            if value != "*":
                what += f" AND {column} = {sql_literal(value)}"
        clauses.append(f"({what} AND {_STORED_TS} >= {_at(_drift_since(m, now))})")
    for r in rules.evals:
        since = _at(_eval_since(r, now))
        clauses.append(
            f"(kind = 'eval' AND metric = {sql_literal(r.metric)} AND {_STORED_TS} >= {since})"
        )
    return clauses


def lookback(rules: AlertRules, now: datetime) -> datetime:
    """How far back the evaluators need history: the start of every budget's period, the
    spend anomaly's trailing day, the drift baselines, a day of eval windows."""
    samples = _samples_since(rules, now)
    spend = _spend_since(rules, now)
    return spend if samples is None else min(spend, samples)


# The spend, an hour of an agent (and team) a row: the budgets bucket it by the hour (a day's
# budget) or the day, the spend anomaly by the hour, so the sums stand for the events exactly,
# and the replay's Python grows with the hours and agents, not with the events.
_SPEND_SQL = (
    f"SELECT toUnixTimestamp(toStartOfHour({_STORED_TS})) AS hour, tenant_id, agent_id, team, "
    "toString(sum(cost_usd)) FROM vigil.audit_log WHERE ts >= fromUnixTimestamp64Milli({since}) "
    f"AND {_STORED_TS} >= fromUnixTimestamp64Milli({{since}}) "
    "AND kind IN ('interaction', 'cost') AND cost_usd IS NOT NULL{tenants} "
    "GROUP BY hour, tenant_id, agent_id, team ORDER BY hour"
)
# An event as the evaluators read it of the ledger (``_stored_event``), and its cost
_EVENT_COLUMNS = (
    f"event_id, kind, toUnixTimestamp64Milli({_STORED_TS}) AS stored_ts, tenant_id, agent_id, "
    "provider, model, input_tokens, output_tokens, reasoning_tokens, latency_ms, status, "
    "finish_reason, tool_name, error_type, metric, value, category, score, threshold, team"
)
_COST_COLUMNS = "toString(cost_usd), toString(amount), currency"
# The drift and eval rules' samples, each event of them (``_sample_clauses``)
_SAMPLES_SQL = (
    f"SELECT {_EVENT_COLUMNS} "
    "FROM vigil.audit_log WHERE ts >= fromUnixTimestamp64Milli({since}) AND ({clauses}){tenants} "
    "ORDER BY stored_ts"
)
# Every event stored in a span of time (``ledger_history``): decisions too, which no rule reads
# but which move their tenant's clock (``Evaluator.advance``) as they do the worker's
_HISTORY_SQL = (
    f"SELECT {_EVENT_COLUMNS}, {_COST_COLUMNS} FROM vigil.audit_log "
    f"WHERE ts >= fromUnixTimestamp64Milli({{since}}) "
    f"AND {_STORED_TS} >= fromUnixTimestamp64Milli({{since}}){{where}} "
    "ORDER BY stored_ts, event_id"
)
# Each tenant's clock (``tenant_clocks``)
_CLOCKS_SQL = (
    f"SELECT tenant_id, toUnixTimestamp64Milli(max({_STORED_TS})) FROM vigil.audit_log "
    f"WHERE ts >= fromUnixTimestamp64Milli({{since}}) "
    f"AND {_STORED_TS} >= fromUnixTimestamp64Milli({{since}}){{tenants}} GROUP BY tenant_id"
)
# the tenants with events stored from some clean partitions: all of a tenant's events are in
# one partition (``validate.clean_key``), but not those stored before clean was keyed by tenant
_TENANTS_OF = (
    " AND tenant_id IN (SELECT DISTINCT tenant_id FROM vigil.audit_log WHERE ts >= "
    "fromUnixTimestamp64Milli({since}) AND source_partition IN ({partitions}))"
)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _at(at: datetime) -> str:
    return f"fromUnixTimestamp64Milli({_ms(at)})"


def _spend(store: Store, since: datetime, tenants: str) -> Iterator[Event]:
    """The ledger's spend since ``since`` as a cost event an hour of an agent, in time order."""
    for hour, tenant, agent, team, cost in store.query_rows(
        _SPEND_SQL.format(since=_ms(since), tenants=tenants)
    ):
        yield Event(
            event_id="", kind="cost", ts=datetime.fromtimestamp(int(hour), tz=UTC),
            tenant_id=tenant, agent_id=agent, body=Cost(float(Decimal(cost)), "USD"),
            enrichment=Enrichment("stored", cost, team=team or None),
        )  # fmt: skip


def _samples(store: Store, rules: AlertRules, now: datetime, tenants: str) -> Iterator[Event]:
    """The interactions, drift and eval events the drift and eval ``rules`` read of the
    ledger at ``now``, in time order, with what they read and no cost (``_spend`` has it)."""
    since, clauses = _samples_since(rules, now), _sample_clauses(rules, now)
    assert since is not None and clauses
    sql = _SAMPLES_SQL.format(since=_ms(since), clauses=" OR ".join(clauses), tenants=tenants)
    # streamed: a day of a busy agent's answers is millions of rows, and the monitors keep a
    # bounded sample of them
    for row in store.stream_rows(sql):
        yield _stored_event(row)


def ledger_history(
    store: Store, since: datetime, until: datetime | None = None, tenant: str | None = None
) -> Generator[Event, None, None]:
    """Every event stored from ``since`` to ``until`` (of ``tenant``), with its cost, as the
    worker's evaluators took it when it was stored (``alerts.as_stored``), in that order:
    ``vigil alerts backtest --since``. A decision comes with no more than its tenant, agent
    and time: no rule reads one, but its time moves its tenant's clock, as in the worker.
    Streamed; the store is held until it is read or closed."""
    where = ""
    if until is not None:
        where += f" AND {_STORED_TS} < {_at(until)}"
    if tenant is not None:
        where += f" AND tenant_id = {sql_literal(tenant)}"
    with closing(store.stream_rows(_HISTORY_SQL.format(since=_ms(since), where=where))) as rows:
        for row in rows:
            yield _stored_event(row)


def _stored_event(row: Sequence[Any]) -> Event:
    """A row of ``_EVENT_COLUMNS`` as the evaluators take it, with what they read; with its
    cost where the row goes on with ``_COST_COLUMNS`` (the samples' rows do not: ``_spend``
    has their cost)."""
    (eid, kind, ms, tenant, agent, provider, model, tin, tout, treason, latency, status, finish,
     tool, error, metric, value, category, score, threshold, team) = row[:21]  # fmt: skip
    costed: Sequence[Any] = row[21:] or (None, None, "")
    cost, amount, currency = costed
    body: Any
    if kind == "interaction":
        body = Interaction(provider, model, input_tokens=int(tin), output_tokens=int(tout),
                           reasoning_tokens=int(treason), latency_ms=latency, status=status,
                           error_type=error or None, finish_reason=finish or None,
                           tool_name=tool or None)  # fmt: skip
    elif kind == "drift":
        body = Drift(metric, value, category or None)
    elif kind == "eval":
        body = Eval(metric, float(score), threshold)
    elif kind == "decision":
        body = Decision("", "", "")  # what was decided is no rule's input
    else:
        body = Cost(float(Decimal(amount)), currency)
    return Event(
        event_id=eid, kind=kind, ts=datetime.fromtimestamp(int(ms) / 1000, tz=UTC),
        tenant_id=tenant, agent_id=agent, body=body,
        enrichment=Enrichment("stored", cost, team=team or None),
    )  # fmt: skip


def _of_tenants(rules: AlertRules, now: datetime, partitions: Collection[int] | None) -> str:
    """A condition on the ledger's rows: of the tenants stored from clean ``partitions``."""
    if partitions is None:
        return ""
    listed = ", ".join(str(int(p)) for p in sorted(partitions))
    return _TENANTS_OF.format(since=_ms(lookback(rules, now)), partitions=listed)


def tenant_clocks(
    store: Store, rules: AlertRules, now: datetime, partitions: Collection[int] | None = None
) -> list[tuple[str, datetime]]:
    """Each tenant's clock in the ledger at ``now`` (``Evaluator.advance``): the latest time
    of its events of any kind, as the worker took each (no later than it was stored), since
    the drift and eval rules' history begins; none without such rules. The replay reads the
    samples alone (and the spend an hour a row), so its tenants' clocks are set from this at
    its end: a window closed by another agent's events closes in the replay too."""
    since = _samples_since(rules, now)
    if since is None:
        return []
    sql = _CLOCKS_SQL.format(since=_ms(since), tenants=_of_tenants(rules, now, partitions))
    return [(tenant, datetime.fromtimestamp(int(ms) / 1000, tz=UTC))
            for tenant, ms in store.query_rows(sql)]  # fmt: skip


CAUGHT_UP_TABLE = "vigil.caught_up"
CAUGHT_UP_COLUMNS = ("at", "consumer_group", "caught_up")
# the most samples a CaughtUp keeps whose ends are not reached yet: a day's at the default 30 s
# (a pipeline behind for longer is judged by its events' clocks, as a backlog is)
_KEPT_SAMPLES = 2880


class CaughtUp:
    """From a store worker's lag samples in time order, the latest time before which every
    event sent has been evaluated, as soon as the samples show it (``HeldAlerts.caught_up``).

    ``watched`` is ``lag.caught_up_groups``: the raw group on raw, then the store group on
    clean, read in that order in each sample. Once a sample k's raw commits reach a sample j's
    raw ends (j no later than k), every event appended to raw before j's time was validated
    and its clean records appended before k read raw (the raw group commits a batch once its
    clean records are appended); k's clean ends, read after, cover those records; once a
    sample m's clean commits reach them, they have been evaluated. So m shows the pipeline
    caught up at j's time. A sample that finds nothing left to read is j, k and m at once;
    under steady traffic, where a sample may seldom find every partition committed to its end,
    j, k and m follow each other and the time is two samples old. While the pipeline is behind,
    the time trails by as much."""

    def __init__(self, watched: Sequence[tuple[str, str]]) -> None:
        self._raw, self._clean = watched
        # samples whose raw ends no sample has reached: (time, ends)
        self._unvalidated: deque[tuple[datetime, dict[int, int]]] = deque(maxlen=_KEPT_SAMPLES)
        # samples whose clean ends no sample has reached: (the latest j its raw commits
        # reached, ends)
        self._unevaluated: deque[tuple[datetime | None, dict[int, int]]] = deque(
            maxlen=_KEPT_SAMPLES
        )
        self._validated: datetime | None = None  # the latest j reached
        self._shown: datetime | None = None  # the latest caught-up time shown
        self.at: datetime | None = None  # the latest caught-up time told (``told``)

    def sample(self, rows: Iterable[Sequence[Any]]) -> datetime | None:
        """Take the next sample (``lag.consumer_lag``'s rows of one time, ``lag.LAG_COLUMNS``):
        the latest caught-up time shown so far if later than the last ``told``, else None. A
        time not told (the worker could not store it) is returned again at the next sample
        that shows none later. A sample without the partitions of raw or of clean (a topic
        not made yet) is passed over."""
        at = None
        done: dict[tuple[str, str], dict[int, int]] = {self._raw: {}, self._clean: {}}
        ends: dict[tuple[str, str], dict[int, int]] = {self._raw: {}, self._clean: {}}
        for sampled, group, topic, partition, committed, end, _lag in rows:
            if (group, topic) in done:
                at = sampled
                done[group, topic][partition] = committed
                ends[group, topic][partition] = end
        if at is None or not ends[self._raw] or not ends[self._clean]:
            return None
        _forget_beyond(self._unvalidated, ends[self._raw])
        _forget_beyond(self._unevaluated, ends[self._clean])
        self._unvalidated.append((at, ends[self._raw]))
        while self._unvalidated and _reached(done[self._raw], self._unvalidated[0][1]):
            self._validated = self._unvalidated.popleft()[0]
        self._unevaluated.append((self._validated, ends[self._clean]))
        while self._unevaluated and _reached(done[self._clean], self._unevaluated[0][1]):
            shown = self._unevaluated.popleft()[0]
            if shown is not None and (self._shown is None or shown > self._shown):
                self._shown = shown
        if self._shown is None or (self.at is not None and self._shown <= self.at):
            return None
        return self._shown

    def told(self, at: datetime) -> None:
        """The worker stored ``at`` and acted on it: ``sample`` returns no time up to it again."""
        self.at = at if self.at is None else max(self.at, at)


def _forget_beyond(kept: deque[tuple[Any, dict[int, int]]], ends: Mapping[int, int]) -> None:
    """Drop from ``kept`` the samples that found a partition further on than it now ends, or
    one it no longer has: the topic was deleted and made again (or a leader's log cut short),
    so no commit would reach them until ``_KEPT_SAMPLES`` more had pushed them out, holding the
    clock that long. The events appended before them are gone; the samples after them show the
    time again. (Dropping one is never wrong, only later: a time is shown by a sample kept.)"""
    held = [(at, found) for at, found in kept if _reached(ends, found)]  # ends reach it now
    if len(held) < len(kept):
        kept.clear()
        kept.extend(held)


def _reached(committed: Mapping[int, int], ends: Mapping[int, int]) -> bool:
    """Whether a group's ``committed`` offsets reach the ``ends`` of every partition."""
    return all(committed.get(partition, -1) >= end for partition, end in ends.items())


_CAUGHT_UP_SQL = (
    "SELECT toUnixTimestamp64Milli(caught_up) FROM vigil.caught_up "
    "WHERE consumer_group = {group} AND caught_up >= fromUnixTimestamp64Milli({since}){until} "
    "ORDER BY caught_up{order}"
)


def _caught_up(
    store: Store, group: str, since: datetime, until: datetime | None = None, order: str = ""
) -> list[datetime]:
    before = "" if until is None else f" AND caught_up < {_at(until)}"
    sql = _CAUGHT_UP_SQL.format(group=sql_literal(group), since=_ms(since), until=before,
                                order=order)  # fmt: skip
    return [datetime.fromtimestamp(int(ms) / 1000, tz=UTC) for (ms,) in store.query_rows(sql)]


def last_caught_up(store: Store, since: datetime, group: str) -> datetime | None:
    """The latest caught-up time since ``since`` that the store workers of ``group`` stored
    (``CaughtUp``): a worker's evaluator was told of each (``Evaluator.caught_up``), so a
    replay of the ledger ends with it told of the last."""
    return next(iter(_caught_up(store, group, since, order=" DESC LIMIT 1")), None)


def caught_up_times(
    store: Store, since: datetime, until: datetime | None, group: str
) -> list[datetime]:
    """The caught-up times from ``since`` to ``until`` that the store workers of ``group``
    stored, in order: what their evaluators were told of between the events (``vigil alerts
    backtest --since``): at most one a lag sample of each worker, 2,880 a day at 30 s."""
    return _caught_up(store, group, since, until)


def stored_history(
    store: Store, rules: AlertRules, now: datetime, partitions: Collection[int] | None = None
) -> Generator[Event, None, None]:
    """What the evaluators of ``rules`` need of the ledger at ``now``, in time order: the spend
    an hour of an agent since the budgets' periods and the anomaly's day began, and each
    sample a drift or eval rule reads (of its agent, its metric) since its own history began;
    with ``partitions``, only of the tenants stored from those clean partitions."""
    tenants = _of_tenants(rules, now, partitions)
    spend = _spend(store, _spend_since(rules, now), tenants)
    if not rules.drift and not rules.evals:
        yield from spend
        return
    # the spend of an hour comes before the hour's samples: an hour's cost at its start
    yield from heapq.merge(spend, _samples(store, rules, now, tenants), key=lambda e: e.ts)


class Superseded(Exception):
    """A rebuild of the alert state stopped before its end: the partitions it was for are no
    longer held."""


# how many replayed events a rebuild goes between two looks at whether it is still wanted
_SUPERSEDED_EVERY = 1000


class Replay(NamedTuple):
    """An evaluator that has seen the ledger's recent history, and what it fired meanwhile
    (not raised: ``unraised`` says which of it no alert was raised for)."""

    evaluator: Evaluator
    fired: list[Alert]


def replay_ledger(
    store: Store,
    rules: AlertRules,
    now: datetime,
    partitions: Collection[int] | None = None,
    superseded: Callable[[], bool] = lambda: False,
    caught_up: str | None = None,
) -> Replay:
    """The ledger's recent history through a new evaluator of ``rules``; with ``partitions``,
    the history of the tenants stored from those clean partitions. With ``caught_up`` (the
    store workers' consumer group), the evaluator is then told of the latest caught-up time
    they stored (``last_caught_up``), as the worker that stored it was: the windows it judged
    on that clock are judged again, not left open.

    Raises Superseded when ``superseded()`` is true before the ledger is read or at any
    thousandth replayed event: a worker that gives the partitions up does not finish a replay
    for them (a burst of rebalances, a stop)."""
    evaluator = Evaluator(rules)
    fired: list[Alert] = []
    if partitions is not None and not partitions:
        return Replay(evaluator, fired)
    held = ""
    if partitions is not None:
        held = " of clean partitions " + ", ".join(map(str, sorted(partitions)))
    replayed = 0
    try:
        if superseded():
            raise Superseded("before the ledger was read")
        # closed when given up: the store is held while the samples stream
        with closing(stored_history(store, rules, now, partitions)) as history:
            for event in history:
                fired += evaluator.observe(event)
                replayed += 1
                if replayed % _SUPERSEDED_EVERY == 0 and superseded():
                    raise Superseded(f"after {replayed} events")
        for tenant, clock in tenant_clocks(store, rules, now, partitions):
            fired += evaluator.advance(tenant, clock)
        since = _samples_since(rules, now)
        if caught_up is not None and since is not None:
            quiet = last_caught_up(store, since, caught_up)
            if quiet is not None:
                fired += evaluator.caught_up(quiet)
    except Superseded as given_up:
        log.info("alert state rebuild%s given up %s: no longer held", held, given_up)
        raise
    log.info("alert state rebuilt from %d events%s since %s", replayed, held,
             lookback(rules, now).isoformat())  # fmt: skip
    return Replay(evaluator, fired)


# The alerts stored since a time: what was raised, to tell what was not
_RAISED_SQL = (
    "SELECT kind, tenant_id, team, agent_id, metric, threshold, toUnixTimestamp64Milli(fired_at) "
    "FROM vigil.alerts WHERE fired_at >= {since}"
)
# what an alert raised late says of itself
_RAISED_LATE = (
    "; raised late, when the alert state was rebuilt from the ledger: no alert of it had been "
    "stored"
)
# The alerts of a window that closes once, and how much later than the replay's time for it
# the worker may have fired it: a spend anomaly fires at the event crossing the bar, the replay
# at the start of its hour (the spend is replayed an hour a row); drift and eval at the end of
# their window, both ways
_WINDOWED = {"drift": timedelta(0), "eval_regression": timedelta(0),
             "spend_anomaly": timedelta(hours=1)}  # fmt: skip


def unraised(store: Store, replay: Replay, now: datetime) -> list[Alert]:
    """What the worker should have raised of ``replay`` (of the ledger at ``now``) and did not:
    a worker raises a batch's alerts after the batch's insert, and one stopped, killed or
    given up its partitions in between left them unraised, while the replay drops what it
    fires. Each comes back with its message saying it is late.

    - A budget level crossed in its current period that ``vigil.alerts`` does not hold (a
      budget added after its spend is raised the same way).
    - A budget forecast of its current period that ``vigil.alerts`` does not hold (a budget
      forecasts once a period), as the replay made it: the replay's spend an hour a row fills
      the forecast's buckets (hours of a day, days of a week or month) as the events did.
    - A drift, eval or spend-anomaly alert of the last cooldown that ``vigil.alerts`` does not
      hold, nor an alert of the same kind and scope within the cooldown before it (which held it
      back). Older ones are left: a rule added since would raise a day of history."""
    evaluator, cooldown = replay.evaluator, replay.evaluator.rules.cooldown
    crossed = [w for w in evaluator.budgets if w.state.levels_fired]
    forecasts = list(_current_forecasts(evaluator, replay.fired, now))
    recent = [a for a in replay.fired if a.kind in _WINDOWED and a.fired_at >= now - cooldown]
    starts = [w.state.period_start for w in crossed if w.state.period_start is not None]
    starts += [start for _alert, start in forecasts]
    starts += [a.fired_at - cooldown for a in recent]
    if not starts:
        return []
    rows = store.query_rows(_RAISED_SQL.format(since=_at(min(starts))))
    stored: dict[tuple[str, str, str, str, str], list[tuple[float, int]]] = {}
    for kind, tenant, team, agent, metric, threshold, ms in rows:
        stored.setdefault((kind, tenant, team, agent, metric), []).append(
            (round(float(threshold), 6), int(ms))
        )
    late = []
    for watch in crossed:
        b, start = watch.budget, watch.state.period_start
        assert start is not None
        raised = stored.get(
            ("budget_threshold", b.tenant, b.team or "", b.agent or "", "spend_usd"), []
        )
        since = _ms(start)
        for level in sorted(watch.state.levels_fired):
            threshold = round(b.limit_usd * level, 6)
            if not any(t == threshold and ms >= since for t, ms in raised):
                late.append(watch.threshold_alert(level, _RAISED_LATE))
    for alert, start in forecasts:
        s = alert.scope
        key = (alert.kind, s.get("tenant", ""), s.get("team", ""), s.get("agent", ""), alert.metric)
        threshold, since = round(alert.threshold, 6), _ms(start)
        if not any(t == threshold and ms >= since for t, ms in stored.get(key, [])):
            late.append(replace(alert, message=alert.message + _RAISED_LATE))
    for alert in recent:
        s = alert.scope
        key = (alert.kind, s.get("tenant", ""), s.get("team", ""), s.get("agent", ""), alert.metric)
        after = _ms(alert.fired_at - cooldown)
        until = _ms(alert.fired_at + _WINDOWED[alert.kind])
        if not any(after < ms <= until for _t, ms in stored.get(key, [])):
            late.append(replace(alert, message=alert.message + _RAISED_LATE))
    return late


def _current_forecasts(
    evaluator: Evaluator, fired: Iterable[Alert], now: datetime
) -> Iterator[tuple[Alert, datetime]]:
    """The budget forecasts among ``fired`` of their budget's period at ``now``, each with the
    period's start (a replay reads the day before too; a forecast of a period over is moot)."""
    for alert in fired:
        if alert.kind != "budget_forecast":
            continue
        for watch in evaluator.budgets:
            b = watch.budget
            start = period_bounds(b.period, now)[0]
            same = b.scope == alert.scope and b.limit_usd == alert.threshold
            if same and alert.fired_at >= start:
                yield alert, start
                break


# how often a write that waits for the alert state of its generation looks again, and how
# often it says that it still waits
_READY_POLL_SECONDS = 0.05
_WAITING_WARNING_SECONDS = 30.0
# at most one line this often on samples left out as late (``HeldAlerts.late``)
LATE_SAID_SECONDS = 60.0


class HeldAlerts:
    """A store worker's alert state: an evaluator of the tenants whose clean partitions it
    holds, rebuilt from the ledger at every assignment.

    Clean is keyed by tenant (``validate.clean_key``), so each tenant's events are in one
    partition, and the worker that holds it sees all of the tenant's spend: its budgets (of the
    tenant, a team or an agent), its spend anomalies, its agents' drift and evals (a drift
    monitor that names no tenant pools the tenants this worker holds). When a
    rebalance moves a partition, its new owner replays the tenant's history from the ledger,
    which holds everything the old owner stored: it gave the partition up only once its insert
    in flight had landed, and writes nothing fetched before the rebalance (``pipeline.fence``).

    Each stored event is seen once by the state that holds its tenant: the rebuild for a
    generation reads what was stored before it, the ledger writes nothing of that generation
    until the rebuild is done (``ready``), and what was written in an earlier generation is not
    observed (``observe``): the current generation's replay read it."""

    def __init__(
        self, rebuild: Callable[[frozenset[int], Callable[[], bool]], Awaitable[Evaluator]]
    ) -> None:
        """``rebuild(partitions, superseded)``: an evaluator that has seen the ledger's history
        of the tenants of those clean partitions (``replay_ledger``; the worker's also raises
        what the replay fired that no worker raised, ``unraised``), which stops early once
        ``superseded()`` (callable from any thread) is true."""
        self._rebuild = rebuild
        self.generation: int | None = None  # of the last assignment
        self._evaluator: Evaluator | None = None  # once rebuilt for it
        self._building: asyncio.Task[None] | None = None
        self._given_up = threading.Event()  # the rebuild in progress is not wanted any more
        # samples left out as late (``Evaluator.late``) by the evaluators before this one, and
        # what this one's replay counted (not live: the worker that stored them counted them)
        self._late_before: Counter[tuple[str, str]] = Counter()
        self._late_replayed: Counter[tuple[str, str]] = Counter()
        self._late_said: tuple[int, float] = (0, -LATE_SAID_SECONDS)  # how many, when (monotonic)

    def late(self) -> Counter[tuple[str, str]]:
        """The drift samples and eval scores left out of their window because it had been
        judged when they were stored, since the worker started, by rule and tenant."""
        live = Counter(self._late_before)
        if self._evaluator is not None:
            live.update(self._evaluator.late() - self._late_replayed)
        return live

    def caught_up(self, at: datetime) -> list[Alert]:
        """The alerts that judging every tenant's windows by ``at`` fires: a lag sample stored
        at ``at`` found the pipeline with nothing left to read (``Evaluator.caught_up``). None
        while the state is rebuilt: the rebuilt one is told by the replay, or the next sample."""
        return self._evaluator.caught_up(at) if self._evaluator is not None else []

    def assigned(self, generation: int, partitions: Iterable[int]) -> None:
        """This worker holds ``partitions`` of clean in ``generation``: rebuild the state."""
        self.revoked()
        self._late_before = self.late()
        self.generation, self._evaluator = generation, None
        self._given_up = threading.Event()
        self._building = asyncio.ensure_future(
            self._build(generation, frozenset(partitions), self._given_up.is_set)
        )

    def revoked(self) -> None:
        """The partitions held are given up (a rebalance has begun, or the worker stops): a
        rebuild for them stops within a thousand replayed events, and one still waiting for
        the ClickHouse thread never starts. The writes waiting for it wait for the next
        assignment's (``ready``); the fence leaves them to their partitions' owner."""
        if self._building is not None and not self._building.done():
            self._given_up.set()
            self._building.cancel()

    async def _build(
        self, generation: int, partitions: frozenset[int], superseded: Callable[[], bool]
    ) -> None:
        evaluator = await self._rebuild(partitions, superseded)
        if generation == self.generation:  # no later assignment meanwhile
            self._evaluator, self._late_replayed = evaluator, evaluator.late()

    async def ready(self, generation: int) -> None:
        """Return once events fetched in ``generation`` may be written: the state of that
        generation is rebuilt, or a later one has begun (the fence leaves them to their
        partitions' owner). Raises what the rebuild raised."""
        waited = warned = 0.0
        while True:
            building = self._building
            if building is not None and building.done() and not building.cancelled():
                failure = building.exception()
                if failure is not None:
                    raise failure
            current = self.generation
            if current is not None and (
                current > generation or (current == generation and self._evaluator is not None)
            ):
                return
            if waited - warned >= _WAITING_WARNING_SECONDS:
                log.warning("the ledger's writes have waited %.0fs for the alert state to be "
                            "rebuilt from the ledger", waited)  # fmt: skip
                warned = waited
            await asyncio.sleep(_READY_POLL_SECONDS)
            waited += _READY_POLL_SECONDS

    def observe(
        self, events: Iterable[Event], generation: int, stored_at: datetime | None = None
    ) -> list[Alert]:
        """The alerts ``events``, just stored from a batch fetched in ``generation`` (at
        ``stored_at``, their ingested_at, if given: each is taken no later than that, as the
        replay takes it, ``as_stored``), fire: none when a later generation has begun, whose
        replay has them."""
        evaluator = self._evaluator
        if generation != self.generation or evaluator is None:
            return []
        if stored_at is not None:
            events = [as_stored(e, stored_at) for e in events]
        fired = [a for e in sorted(events, key=lambda e: e.ts) for a in evaluator.observe(e)]
        self._say_late(evaluator.rules.window_grace)
        return fired

    def _say_late(self, grace: timedelta) -> None:
        """A warning, at most once a ``LATE_SAID_SECONDS``, when samples were left out as late
        since the last: an operator sees a producer's backlog judged without it and may give
        its windows longer (``alerts.window_grace``)."""
        said, at = self._late_said
        now = time.monotonic()
        if now - at < LATE_SAID_SECONDS:
            return  # said within the minute: not counted again until it is up
        late = self.late()
        total = sum(late.values())
        if total == said:
            return
        self._late_said = (total, now)
        log.warning(
            "%d drift sample(s) or eval score(s) came after their window had been judged and "
            "were left out of it (since the worker started, by rule and tenant: %s): their "
            "tenant's other events, or the wall clock once the pipeline had caught up, were "
            "more than alerts.window_grace (%s) ahead of them, as when a producer's backlog is "
            "sent after an outage; a longer window_grace waits for them longer", total - said,
            ", ".join(f"{rule} {tenant} {n}" for (rule, tenant), n in sorted(late.items())),
            f"{grace.total_seconds():g} s",
        )  # fmt: skip
