"""Alert evaluators: budgets (thresholds and forecasts), spend anomalies, drift and eval
regressions. Pure and driven by event time, so the worker and ``vigil alerts backtest`` run the
same code: feed enriched events in time order, collect the alerts each one fires.

Forecasts: the spend of the current period is bucketed (hours for a daily budget, days
otherwise). The trend is a least-squares line over the complete buckets, used only when its
slope is significant (|t| >= 2); otherwise the mean rate. Projected period-end spend = spent +
the trend over the buckets left; the upper bound adds two standard errors of the residuals
over the remaining buckets. A forecast alert fires, at least MIN_BUCKETS into the period, when
even the cautious projection (the slope at the low end of its ~95% interval) passes the limit,
and names ``predicted_breach_at``: the bucket in which the projected cumulative spend crosses
the limit. Noise in steady spend thus never extrapolates into an alert.
"""

from __future__ import annotations

import math
import random
import re
from bisect import bisect_right
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import accumulate
from operator import itemgetter
from typing import Any

from pipeline.events import Drift, Eval, Event, Interaction
from pipeline.rollup import LastWindow, floor_time
from pipeline.settings import ConfigError, list_of, mapping_of, name_of, parse_date

KINDS = ("budget_threshold", "budget_forecast", "spend_anomaly", "drift", "eval_regression")
THRESHOLD_LEVELS = (0.5, 0.8, 1.0)  # ascending
# what most events fire: the evaluators return lists, and this one for nothing
_NOTHING: tuple[Alert, ...] = ()
MIN_BUCKETS = 3
NUMERIC_FIELDS = ("output_tokens", "input_tokens", "latency_ms", "reasoning_tokens")
CATEGORICAL_FIELDS = ("finish_reason", "tool_name", "status", "model", "error_type")


@dataclass(frozen=True)
class Alert:
    kind: str
    scope: Mapping[str, str]
    fired_at: datetime
    metric: str
    observed: float
    threshold: float
    message: str
    severity: str = "warning"
    predicted_breach_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "scope": dict(self.scope),
            "fired_at": self.fired_at.isoformat(),
            "metric": self.metric,
            "observed": round(self.observed, 6),
            "threshold": round(self.threshold, 6),
            "severity": self.severity,
            "message": self.message,
        }
        if self.predicted_breach_at is not None:
            out["predicted_breach_at"] = self.predicted_breach_at.isoformat()
        return out


# --- configuration ---------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
SEVERITIES = ("warning", "critical")
# what the alerts section of vigil.yaml holds (its routes are ``alerting.parse_routes``')
ALERTS_KEYS = ("cooldown", "window_grace", "routes")


def duration(value: Any, where: str) -> timedelta:
    """``30m``, ``6h``, ``1d``, ``2w``: longer than nothing. Raises ConfigError naming
    ``where``."""
    found = _DURATION.match(str(value))
    if found is None or int(found[1]) == 0:
        raise ConfigError(f"{where}: expected a duration like 30m, 6h, 1d or 2w, got {value!r}")
    return timedelta(**{_UNITS[found[2]]: int(found[1])})


def _number(spec: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
    return float(value)


def _count(spec: Mapping[str, Any], key: str, where: str, default: int) -> int:
    """A whole number of at least 1."""
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}.{key}: expected a whole number of at least 1, got {value!r}")
    return value


@dataclass(frozen=True)
class Budget:
    tenant: str
    period: str  # day | week | month
    limit_usd: float
    team: str | None = None
    agent: str | None = None

    @property
    def scope(self) -> dict[str, str]:
        out = {"tenant": self.tenant}
        if self.team:
            out["team"] = self.team
        if self.agent:
            out["agent"] = self.agent
        return out

    def covers(self, event: Event) -> bool:
        if event.tenant_id != self.tenant:
            return False
        if self.agent and event.agent_id != self.agent:
            return False
        team = event.enrichment.team if event.enrichment else None
        return not self.team or team == self.team


@dataclass(frozen=True)
class DriftMonitor:
    metric: str
    test: str  # psi | js | ks
    threshold: float
    window: timedelta
    baseline_window: timedelta | None  # trailing, or
    baseline_from: datetime | None = None  # a pinned period
    baseline_to: datetime | None = None
    agent: str = "*"
    tenant: str = "*"
    min_samples: int = 30


@dataclass(frozen=True)
class EvalRule:
    metric: str
    min_score: float
    window: timedelta = timedelta(hours=1)
    min_samples: int = 5
    max_drop: float = 0.1  # a fall of the window mean by this much against the baseline


@dataclass(frozen=True)
class AlertRules:
    budgets: tuple[Budget, ...] = ()
    drift: tuple[DriftMonitor, ...] = ()
    evals: tuple[EvalRule, ...] = ()
    cooldown: timedelta = timedelta(hours=6)
    anomaly_factor: float = 3.0
    # how long after its end a drift or eval window waits for its last samples when no later
    # one of its own comes to close it, by its tenant's clock (``Evaluator.advance``)
    window_grace: timedelta = timedelta(minutes=5)


def parse_rules(raw: Mapping[str, Any]) -> AlertRules:
    """The budgets, drift, evals and alerts sections of vigil.yaml. Raises ConfigError."""
    budgets = []
    for i, spec in enumerate(list_of(raw.get("budgets"), "budgets")):
        where = f"budgets[{i}]"
        spec = mapping_of(spec, ("scope", "period", "limit_usd"), where)
        scope = spec.get("scope") or {}
        if not isinstance(scope, Mapping) or not scope.get("tenant"):
            raise ConfigError(f"{where}.scope: needs a tenant (and optionally team or agent)")
        mapping_of(scope, ("tenant", "team", "agent"), f"{where}.scope")
        named = {key: name_of(scope, key, f"{where}.scope", "") for key in scope}
        period = spec.get("period", "month")
        if period not in ("day", "week", "month"):
            raise ConfigError(f"{where}.period: expected day, week or month, got {period!r}")
        limit = _number(spec, "limit_usd", where)
        if limit <= 0:
            raise ConfigError(f"{where}.limit_usd: must be positive")
        budgets.append(Budget(named["tenant"], period, limit, named.get("team"),
                              named.get("agent")))  # fmt: skip
    monitors = []
    for i, spec in enumerate(list_of(raw.get("drift"), "drift")):
        where = f"drift[{i}]"
        if not isinstance(spec, Mapping) or not spec.get("metric"):
            raise ConfigError(f"{where}: needs a metric")
        mapping_of(spec, ("metric", "test", "threshold", "window", "baseline", "agent", "tenant",
                     "min_samples"), where)  # fmt: skip
        test = spec.get("test", "psi")
        if test not in ("psi", "js", "ks"):
            raise ConfigError(f"{where}.test: expected psi, js or ks, got {test!r}")
        threshold = _number(spec, "threshold", where, 0.2)
        if threshold <= 0:
            raise ConfigError(f"{where}.threshold: must be positive, got {threshold:g}")
        baseline = spec.get("baseline") or {"window": "1d"}
        if isinstance(baseline, Mapping) and "window" in baseline:
            mapping_of(baseline, ("window",), f"{where}.baseline")
            trailing, pinned_from, pinned_to = (
                duration(baseline["window"], f"{where}.baseline.window"),
                None,
                None,
            )
        else:
            if not isinstance(baseline, Mapping) or set(baseline) != {"from", "to"}:
                raise ConfigError(
                    f"{where}.baseline: expected {{window: 1d}} or {{from: DATE, to: DATE}}"
                )
            pinned_from = parse_date(str(baseline["from"]), f"{where}.baseline.from")
            pinned_to = parse_date(str(baseline["to"]), f"{where}.baseline.to")
            if pinned_from >= pinned_to:
                raise ConfigError(
                    f"{where}.baseline: from ({pinned_from:%Y-%m-%d %H:%M} UTC) is not before "
                    f"to ({pinned_to:%Y-%m-%d %H:%M} UTC): the baseline would hold nothing"
                )
            trailing = None
        monitors.append(DriftMonitor(
            name_of(spec, "metric", where, ""), test, threshold,
            duration(spec.get("window", "1h"), f"{where}.window"), trailing, pinned_from,
            pinned_to, name_of(spec, "agent", where, "*"), name_of(spec, "tenant", where, "*"),
            _count(spec, "min_samples", where, 30),
        ))  # fmt: skip
    evals = []
    for i, spec in enumerate(list_of(raw.get("evals"), "evals")):
        where = f"evals[{i}]"
        if not isinstance(spec, Mapping) or not spec.get("metric"):
            raise ConfigError(f"{where}: needs a metric")
        mapping_of(spec, ("metric", "min_score", "window", "min_samples", "max_drop"), where)
        max_drop = _number(spec, "max_drop", where, 0.1)
        if max_drop < 0:
            raise ConfigError(f"{where}.max_drop: must not be negative, got {max_drop:g}")
        evals.append(EvalRule(
            name_of(spec, "metric", where, ""), _number(spec, "min_score", where),
            duration(spec.get("window", "1h"), f"{where}.window"),
            _count(spec, "min_samples", where, 5), max_drop,
        ))  # fmt: skip
    alerts = mapping_of(raw.get("alerts") or {}, ALERTS_KEYS, "alerts")
    cooldown = duration(alerts.get("cooldown", "6h"), "alerts.cooldown")
    grace = duration(alerts.get("window_grace", "5m"), "alerts.window_grace")
    return AlertRules(tuple(budgets), tuple(monitors), tuple(evals), cooldown, window_grace=grace)


# --- budgets ---------------------------------------------------------------------------


def period_bounds(period: str, ts: datetime) -> tuple[datetime, datetime]:
    if period == "day":
        start = ts.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period == "week":
        start = (ts - timedelta(days=ts.weekday())).replace(hour=0, minute=0, second=0,
                                                              microsecond=0)  # fmt: skip
        return start, start + timedelta(days=7)
    start = ts.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def _t_critical(dof: int) -> float:
    """About Student's t at 97.5% for ``dof`` degrees of freedom (12.7 at 1, 2.26 at 9)."""
    return 1.96 + 2.4 / dof + 8.3 / dof**2 if dof > 1 else 12.7


@dataclass(frozen=True)
class Forecast:
    projected: float  # period-end spend on the fitted trend
    cautious: float  # the same with the slope at the low end of its ~95% interval
    upper: float  # projected + two standard errors of the remaining spend
    ahead: list[float]  # projected spend of each remaining bucket


def forecast(buckets: Sequence[float], total_buckets: int, spent: float) -> Forecast:
    """Period-end spend from the spend of the complete buckets so far."""
    n = len(buckets)
    remaining = max(total_buckets - n, 0)
    mean = sum(buckets) / n
    x_mean = (n - 1) / 2
    sxx = sum((x - x_mean) ** 2 for x in range(n))
    sxy = sum((x - x_mean) * (y - mean) for x, y in enumerate(buckets))
    slope = sxy / sxx if sxx else 0.0
    residuals = [y - (mean + slope * (x - x_mean)) for x, y in enumerate(buckets)]
    sigma = math.sqrt(sum(r * r for r in residuals) / max(n - 2, 1))
    se_slope = sigma / math.sqrt(sxx) if sxx else math.inf
    t = _t_critical(max(n - 2, 1))
    # a trend counts when it is significant (a perfect line, with no residuals, counts)
    if not (sxx and slope and (se_slope == 0 or abs(slope) / se_slope >= t)):
        slope = 0.0
    low_slope = max(0.0, slope - t * se_slope) if slope > 0 else slope

    def line(b: float) -> list[float]:
        return [max(0.0, mean + b * (n + k - x_mean)) for k in range(remaining)]

    ahead = line(slope)
    projected = spent + sum(ahead)
    return Forecast(
        projected,
        spent + sum(line(low_slope)),
        projected + 2 * sigma * math.sqrt(remaining),
        ahead,
    )


@dataclass
class _BudgetState:
    period_start: datetime | None = None
    spent: float = 0.0
    buckets: dict[int, float] = field(default_factory=dict)
    levels_fired: set[float] = field(default_factory=set)
    forecast_fired: bool = False
    last_checked_bucket: int = -1
    latest: datetime | None = None  # the latest event time seen in the period


class BudgetWatch:
    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.state = _BudgetState()
        self.bucket = timedelta(hours=1) if budget.period == "day" else timedelta(days=1)
        # the bounds of the period the last event fell in, and the first of its buckets that
        # is forecast from; then those of the bucket it fell in, and its index: most events
        # fall in the same ones (found for every event, they took 3% of a store worker)
        self._period: tuple[datetime, datetime, int] | None = None
        self._in_bucket: tuple[datetime, datetime, int] | None = None

    def observe(self, event: Event, cost: float) -> Sequence[Alert]:
        """The alerts ``event`` (costing ``cost``) fires: a list, mostly empty (``_NOTHING``),
        not a generator, which cost a store worker 0.5 us an event for each budget."""
        b, ts = self.budget, event.ts
        period = self._period
        if period is None or not period[0] <= ts < period[1]:
            start, end = period_bounds(b.period, ts)
            # not before a quarter of the period (a week of a month, six hours of a day)
            ready_from = max(MIN_BUCKETS, int((end - start) / self.bucket) // 4)
            period = self._period = (start, end, ready_from)
            self._in_bucket = None
        start, end, ready_from = period
        s = self.state
        if s.period_start is not None and start < s.period_start:
            return _NOTHING  # a late event of a period already closed: long decided
        if s.period_start != start:
            self.state = s = _BudgetState(period_start=start)
        # Events may come out of time order (a backlog read from several partitions at once).
        # A level is known to be crossed only when the events that cross it are in, so a
        # threshold fires at the latest event time seen: one budget's alerts never go back in
        # time. Events in time order fire, as before, at the crossing event's own time.
        if s.latest is None or ts > s.latest:
            s.latest = ts
        bucket = self._in_bucket
        if bucket is not None and bucket[0] <= ts < bucket[1]:
            index = bucket[2]
        else:
            index = (ts - start) // self.bucket
            at = start + index * self.bucket
            self._in_bucket = (at, at + self.bucket, index)
        # a new bucket began: the ones before it are complete, re-forecast once, once enough
        # of the period is known
        fired: Sequence[Alert] = _NOTHING
        if index != s.last_checked_bucket and index >= ready_from and not s.forecast_fired:
            s.last_checked_bucket = index
            fired = list(self._forecast(start, end, index, ts))
        s.spent += cost
        s.buckets[index] = s.buckets.get(index, 0.0) + cost
        if s.spent >= b.limit_usd * THRESHOLD_LEVELS[0]:
            for level in THRESHOLD_LEVELS:
                if s.spent >= b.limit_usd * level and level not in s.levels_fired:
                    s.levels_fired.add(level)
                    fired = [*fired, self.threshold_alert(level)]
        return fired

    def threshold_alert(self, level: float, note: str = "") -> Alert:
        """The alert of ``level`` (of THRESHOLD_LEVELS) crossed, as of the spend seen so far."""
        b, s = self.budget, self.state
        assert s.latest is not None  # a level is crossed only by an event seen
        return Alert(
            "budget_threshold", b.scope, s.latest, "spend_usd", s.spent, b.limit_usd * level,
            f"{_ADJECTIVE[b.period]} budget of ${b.limit_usd:,.2f} for "
            f"{_scope_text(b.scope)} is {s.spent / b.limit_usd:.0%} spent (${s.spent:,.2f}){note}",
            "critical" if level >= 1.0 else "warning",
        )  # fmt: skip

    def _forecast(
        self, start: datetime, end: datetime, index: int, now: datetime
    ) -> Iterator[Alert]:
        b, s = self.budget, self.state
        total = int((end - start) / self.bucket)
        complete = [s.buckets.get(i, 0.0) for i in range(index)]
        spent = sum(complete)
        f = forecast(complete, total, spent)
        projected, upper, ahead = f.projected, f.upper, f.ahead
        # only a breach that even the cautious trend predicts: a false alarm costs trust
        if f.cautious <= b.limit_usd or s.spent >= b.limit_usd:
            return
        running, breach = spent, None
        for k, amount in enumerate(ahead):
            running += amount
            if running > b.limit_usd:
                breach = start + self.bucket * (index + k + 1)
                break
        s.forecast_fired = True
        yield Alert(
            "budget_forecast", b.scope, now, "projected_spend_usd", projected, b.limit_usd,
            f"{_scope_text(b.scope)} is on course to spend ${projected:,.2f} this {b.period} "
            f"(up to ${upper:,.2f}) against a ${b.limit_usd:,.2f} budget"
            + (f"; breach expected around {breach:%Y-%m-%d %H:%M} UTC" if breach else ""),
            "critical", breach,
        )  # fmt: skip


_ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly"}
# the trailing day's hours, made once: every stored event is observed (1.4% of a worker's time
# went to building them per event)
_PAST_HOURS = tuple(timedelta(hours=k) for k in range(1, 25))
_HOUR = timedelta(hours=1)
# the spend anomaly's history: the trailing day's hours before the current one
ANOMALY_HISTORY = timedelta(hours=25)


def _scope_text(scope: Mapping[str, str]) -> str:
    return "/".join(f"{k}={v}" for k, v in scope.items())


class SpendAnomaly:
    """Per tenant, hourly spend against the trailing 24 complete hours."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.hours: dict[str, dict[datetime, float]] = defaultdict(dict)
        self.fired: dict[str, set[datetime]] = defaultdict(set)  # per tenant, its hours
        # per tenant: the hour of its last event, and the mean and the bar of the 24 before it
        # (no bar with fewer than 12 of them spent in). They hold until an event of another
        # hour, which may change them, comes: computed per event, they took 2.6% of a worker.
        self._bars: dict[str, tuple[datetime, float, float | None]] = {}
        self._hours = LastWindow(_HOUR)

    def observe(self, event: Event, cost: float) -> Sequence[Alert]:
        hour = self._hours.start(event.ts)
        spend, fired = self.hours[event.tenant_id], self.fired[event.tenant_id]
        if hour not in spend:  # an hour begins: forget those past the trailing day
            kept_from = hour - ANOMALY_HISTORY
            for old in [h for h in spend if h < kept_from]:
                del spend[old]
            # an hour past it has no trailing day left to be judged on again
            fired.difference_update([h for h in fired if h < kept_from])
        spend[hour] = spend.get(hour, 0.0) + cost
        last = self._bars.get(event.tenant_id)
        if last is None or last[0] != hour:
            last = self._bars[event.tenant_id] = (hour, *self._bar(spend, hour))
        _, mean, bar = last
        if bar is None or hour in fired or not (spend[hour] > bar and mean > 0):
            return _NOTHING
        fired.add(hour)
        return [
            Alert(
                "spend_anomaly", {"tenant": event.tenant_id}, event.ts, "hourly_spend_usd",
                spend[hour], bar,
                f"tenant {event.tenant_id} spent ${spend[hour]:,.2f} this hour against "
                f"${mean:,.2f} an hour over the last day",
            )
        ]  # fmt: skip

    def _bar(self, spend: Mapping[datetime, float], hour: datetime) -> tuple[float, float | None]:
        """The mean spend of the 24 hours before ``hour``, and the spend above which ``hour``
        is an anomaly (None: fewer than 12 of those hours were spent in)."""
        history = [spend.get(hour - past, 0.0) for past in _PAST_HOURS]
        mean = sum(history) / len(history)
        if sum(1 for h in history if h > 0) < 12:
            return mean, None
        sd = math.sqrt(sum((h - mean) ** 2 for h in history) / (len(history) - 1))
        return mean, max(mean * self.factor, mean + 4 * sd)


# --- drift -----------------------------------------------------------------------------


def _sample(monitor: DriftMonitor, event: Event) -> float | str | None:
    body = event.body
    if monitor.agent not in ("*", event.agent_id) or monitor.tenant not in ("*", event.tenant_id):
        return None
    interaction_field = monitor.metric in NUMERIC_FIELDS or monitor.metric in CATEGORICAL_FIELDS
    if isinstance(body, Drift) and body.metric == monitor.metric and not interaction_field:
        return body.value if body.value is not None else body.category
    if isinstance(body, Interaction):
        value = getattr(body, monitor.metric, None)
        if monitor.metric in NUMERIC_FIELDS:
            return float(value) if value is not None else None
        if monitor.metric in CATEGORICAL_FIELDS:
            return str(value) if value is not None else "none"
    return None


# Weights of two samples, for samples thinned out of busy stretches (``DriftWatch``): each kept
# value stands for its weight's worth of values. Without weights, each stands for itself.
Weights = tuple[Sequence[float], Sequence[float]]


def _ordered(
    values: Sequence[Any], weights: Sequence[float] | None
) -> tuple[list[Any], list[float]]:
    """``values`` in order, and their weights in the same order (1 each without weights)."""
    if weights is None:
        return sorted(values), [1.0] * len(values)
    pairs = sorted(zip(values, weights, strict=True), key=itemgetter(0))
    return [v for v, _ in pairs], [w for _, w in pairs]


def _effective_size(weights: Sequence[float]) -> float:
    """How many unweighted values a weighted sample is worth (Kish): its size, unweighted."""
    return sum(weights) ** 2 / sum(w * w for w in weights)


def psi(
    baseline: Sequence[float],
    current: Sequence[float],
    bins: int = 10,
    weights: Weights | None = None,
) -> float:
    """Population stability index over the baseline's quantile bins."""
    ordered, base_weights = _ordered(baseline, weights and weights[0])
    current_weights = weights[1] if weights else [1.0] * len(current)
    total = sum(base_weights)
    # the q-th edge: the first value whose cumulative weight passes q/bins of the total
    edges, q = set(), 1
    for value, cumulative in zip(ordered, accumulate(base_weights), strict=True):
        while q < bins and cumulative > total * q / bins:
            edges.add(value)
            q += 1
    cuts = sorted(edges)

    def shares(values: Sequence[float], weights: Sequence[float]) -> tuple[list[float], float]:
        sums = [0.0] * (len(cuts) + 1)
        for v, w in zip(values, weights, strict=True):
            sums[bisect_right(cuts, v)] += w
        n, whole = _effective_size(weights), sum(weights)
        return [(x / whole * n + 0.5) / (n + 0.5 * len(sums)) for x in sums], n

    (b, n), (c, m) = shares(ordered, base_weights), shares(current, current_weights)
    raw = sum((ci - bi) * math.log(ci / bi) for bi, ci in zip(b, c, strict=True))
    # what sampling noise alone adds on average, (bins - 1)(1/n + 1/m): without this a small
    # window "drifts" from an identical population
    noise = (len(b) - 1) * (1 / m + 1 / n)
    return max(0.0, raw - noise)


def jensen_shannon(
    baseline: Sequence[Any], current: Sequence[Any], weights: Weights | None = None
) -> float:
    """Jensen-Shannon divergence (base 2, 0..1) of two categorical samples."""

    def shares(values: Sequence[Any], weights: Sequence[float] | None) -> dict[Any, float]:
        sums: dict[Any, float] = defaultdict(float)
        for v, w in zip(values, weights or [1.0] * len(values), strict=True):
            sums[v] += w
        whole = sum(sums.values())
        return {k: x / whole for k, x in sums.items()}

    p = shares(baseline, weights and weights[0])
    q = shares(current, weights and weights[1])
    keys = p.keys() | q.keys()
    m = {k: (p.get(k, 0.0) + q.get(k, 0.0)) / 2 for k in keys}

    def kl(a: Mapping[Any, float]) -> float:
        return sum(x * math.log2(x / m[k]) for k, x in a.items() if x > 0)

    return (kl(p) + kl(q)) / 2


def ks(
    baseline: Sequence[float], current: Sequence[float], weights: Weights | None = None
) -> float:
    """The two-sample Kolmogorov-Smirnov statistic."""
    a, wa = _ordered(baseline, weights and weights[0])
    b, wb = _ordered(current, weights and weights[1])
    total_a, total_b = sum(wa), sum(wb)
    i = j = 0
    below_a = below_b = d = 0.0
    while i < len(a) and j < len(b):
        x = min(a[i], b[j])
        while i < len(a) and a[i] <= x:
            below_a += wa[i]
            i += 1
        while j < len(b) and b[j] <= x:
            below_b += wb[j]
            j += 1
        d = max(d, abs(below_a / total_a - below_b / total_b))
    return d


# How many samples a drift monitor holds at most, about: a day-long baseline of a busy agent
# would otherwise hold millions. Past it, each stretch of time keeps a uniform sample of its
# values (``_Stretch``), and the tests weigh each kept value by how many it stands for.
DRIFT_SAMPLE_CAP = 200_000
_FEWEST_PER_STRETCH = 2_000


def _stretch(monitor: DriftMonitor) -> timedelta:
    """The longest time that divides both the window and the trailing baseline: the windows
    and baselines are whole numbers of stretches (all aligned as ``floor_time`` aligns)."""
    if monitor.baseline_window is None:
        return monitor.window
    us = timedelta(microseconds=1)
    return math.gcd(monitor.window // us, monitor.baseline_window // us) * us


class _Stretch:
    """The samples of one stretch of time: each one up to ``room`` of them, then a uniform
    sample of them all (reservoir sampling), each kept one standing for ``seen / len(kept)``."""

    __slots__ = ("kept", "seen")

    def __init__(self) -> None:
        self.kept: list[float | str] = []
        self.seen = 0

    def add(self, value: float | str, room: int, rng: random.Random) -> None:
        self.seen += 1
        if len(self.kept) < room:
            self.kept.append(value)
        else:
            slot = rng.randrange(self.seen)
            if slot < room:
                self.kept[slot] = value


def _pooled(stretches: Iterable[_Stretch]) -> tuple[list[float | str], list[float], int]:
    """The values kept of ``stretches``, their weights, and how many they stand for."""
    values: list[float | str] = []
    weights: list[float] = []
    seen = 0
    for s in stretches:
        if s.kept:
            values += s.kept
            weights += [s.seen / len(s.kept)] * len(s.kept)
            seen += s.seen
    return values, weights, seen


class DriftWatch:
    """One drift monitor: compares each window's samples with its baseline's. It holds the
    samples of the trailing baseline and the window by stretch of time (``_stretch``), each
    stretch up to ``per_stretch`` of them (by default ``DRIFT_SAMPLE_CAP`` shared among the
    stretches held, at least 2,000 each), and a pinned baseline's in one more (then the cap is
    shared half and half). Until a stretch is full every sample counts as itself, and the
    tests are exact."""

    def __init__(self, monitor: DriftMonitor, per_stretch: int | None = None) -> None:
        self.m = monitor
        self.stretch = _stretch(monitor)
        # the trailing baseline's stretches, the window's and the next's; a pinned baseline
        # takes half of the cap
        held = (monitor.baseline_window or timedelta(0)) // self.stretch + 2
        cap = DRIFT_SAMPLE_CAP // 2 if monitor.baseline_from else DRIFT_SAMPLE_CAP
        self.room = per_stretch or max(_FEWEST_PER_STRETCH, cap // held)
        self.pinned_room = per_stretch or DRIFT_SAMPLE_CAP // 2
        self.stretches: dict[datetime, _Stretch] = {}
        self.window_start: datetime | None = None
        self.pinned = _Stretch()
        self.first_seen: datetime | None = None
        self.rng = random.Random(0)  # the same sample each run: a backtest repeats its alerts
        # per tenant, samples of a window already judged: left out of it (a later window's
        # trailing baseline may still take them)
        self.late: Counter[str] = Counter()

    def observe(self, event: Event) -> Sequence[Alert]:
        """The alerts ``event`` fires: a list (not a generator: most events are no sample)."""
        value = _sample(self.m, event)
        if value is None:
            return _NOTHING
        m = self.m
        if self.window_start is None:
            self.window_start = floor_time(event.ts, m.window)
            self.first_seen = event.ts
        fired: Sequence[Alert] = _NOTHING
        if event.ts >= self.window_start + m.window:
            fired = list(self.close_until(event.ts))
        elif event.ts < self.window_start:
            self.late[event.tenant_id] += 1
        if m.baseline_from and m.baseline_from <= event.ts < (m.baseline_to or event.ts):
            self.pinned.add(value, self.pinned_room, self.rng)
        at = floor_time(event.ts, self.stretch)
        stretch = self.stretches.get(at)
        if stretch is None:
            stretch = self.stretches[at] = _Stretch()
        stretch.add(value, self.room, self.rng)
        return fired

    def close_until(self, to: datetime) -> Iterator[Alert]:
        """Close each window that ends by ``to``: a sample in a later window, or the clock of
        the monitor's tenant (``Evaluator.advance``), or of a pipeline caught up
        (``Evaluator.caught_up``), past its end and the grace."""
        m = self.m
        if self.window_start is None or to < self.window_start + m.window:
            return
        while self.window_start + m.window <= to:
            yield from self._close(self.window_start, self.window_start + m.window)
            self.window_start += m.window
            if all(at < self.window_start for at in self.stretches):
                # no sample in this window or after: those to ``to`` fire nothing (a monitor
                # silent for a week of one-minute windows is not 10,000 of them pooled)
                self.window_start = max(self.window_start, floor_time(to, m.window))
        # what no later window's baseline reaches
        keep = self.window_start - (m.baseline_window or timedelta(0))
        for old in [at for at in self.stretches if at < keep]:
            del self.stretches[old]

    def held(self) -> int:
        """How many samples this monitor holds."""
        return sum(len(s.kept) for s in self.stretches.values()) + len(self.pinned.kept)

    def _close(self, start: datetime, end: datetime) -> Iterator[Alert]:
        m = self.m
        current, current_weights, current_seen = _pooled(
            s for at, s in self.stretches.items() if start <= at < end
        )
        if m.baseline_window is not None:
            if self.first_seen is None or self.first_seen > start - m.baseline_window:
                return  # the trailing baseline is not complete yet
            base, base_weights, base_seen = _pooled(
                s for at, s in self.stretches.items() if start - m.baseline_window <= at < start
            )
        else:
            pinned = [self.pinned] if m.baseline_to and m.baseline_to <= start else []
            base, base_weights, base_seen = _pooled(pinned)
        if current_seen < m.min_samples or base_seen < m.min_samples:
            return
        # weighed only when thinned (fewer kept than seen): sorting values alone is faster
        thinned = len(base) < base_seen or len(current) < current_seen
        weights = (base_weights, current_weights) if thinned else None
        numeric = all(isinstance(v, float) for v in (*current, *base))
        if m.test == "js" or not numeric:
            stat, test = jensen_shannon(base, current, weights), "js"
        elif m.test == "ks":
            stat, test = ks(base, current, weights), "ks"  # type: ignore[arg-type]
        else:
            stat, test = psi(base, current, weights=weights), "psi"  # type: ignore[arg-type]
        if stat > m.threshold:
            scope = {"tenant": m.tenant, "agent": m.agent}
            # what the statistic was computed on, when it was a weighed sample of them
            kept = f", weighed from {len(current)} and {len(base)} kept" if thinned else ""
            yield Alert(
                "drift", scope, end, m.metric, stat, m.threshold,
                f"{m.metric} drifted: {test} {stat:.3f} > {m.threshold} between "
                f"{start:%Y-%m-%d %H:%M} and {end:%H:%M} ({current_seen} samples against "
                f"{base_seen}{kept})",
            )  # fmt: skip


# --- evals -----------------------------------------------------------------------------


# How many windows before the one closing an eval rule's baseline reaches back: a rebuild of the
# alert state replays these and the open one (``alerting._eval_since``), so a worker that has run
# for weeks and one started an hour ago judge an agent alike.
EVAL_BASELINE_WINDOWS = 24


class EvalWatch:
    """One eval rule: the mean score of each window of an agent, against the floor and against
    the windows before it. A window closes at the agent's next score in a later window.

    An agent whose scores all lie before what a rebuild replays (``alerting._eval_since``,
    counted back from the score being read) is forgotten, as a rebuild would not know it: its
    open window is then never judged, in a worker that has run for weeks as in one started an
    hour ago, and agents that score once and never again (a client that names each run anew)
    do not pile up until the next rebalance."""

    def __init__(self, rule: EvalRule) -> None:
        self.rule = rule
        # per tenant and agent: the open window (scores before it are late, left out)
        self.window_start: dict[tuple[str, str], datetime] = {}
        # the open window's sum and count of scores: its mean is all that is judged
        self.scores: dict[tuple[str, str], tuple[float, int]] = {}
        # per tenant, its agents with scores in their open window, in the order they came: what
        # its clock may close
        self.scored: defaultdict[str, dict[tuple[str, str], None]] = defaultdict(dict)
        # the end and mean of each closed window of the last EVAL_BASELINE_WINDOWS judged
        self.history: dict[tuple[str, str], deque[tuple[datetime, float]]] = defaultdict(deque)
        self._next_sweep: datetime | None = None  # when to look for agents to forget
        # per tenant, every window before it is closed (``close_until``): a score in one is late
        self.closed_before: dict[str, datetime] = {}
        self.late: Counter[str] = Counter()  # per tenant, the late scores left out

    def observe(self, event: Event) -> Sequence[Alert]:
        """The alerts ``event`` fires: a list (not a generator: most events are no score)."""
        body = event.body
        if not isinstance(body, Eval) or body.metric != self.rule.metric:
            return _NOTHING
        key = (event.tenant_id, event.agent_id)
        window = self.rule.window
        # where a rebuild's replay begins: an open window ending by then holds no score after it
        horizon = event.ts - (EVAL_BASELINE_WINDOWS + 1) * window
        if self._next_sweep is None or event.ts >= self._next_sweep:
            for old in [k for k, start in self.window_start.items() if start + window <= horizon]:
                self._forget(old)  # every agent's, once a window
            self._next_sweep = event.ts + window
        elif (start := self.window_start.get(key)) is not None and start + window <= horizon:
            self._forget(key)  # this agent's, back after a long silence
        start = self.window_start.setdefault(key, floor_time(event.ts, window))
        if event.ts < start or event.ts < self.closed_before.get(event.tenant_id, start):
            self.late[event.tenant_id] += 1
            return _NOTHING  # a late score of a window already closed: decided then
        fired: Sequence[Alert] = _NOTHING
        if event.ts >= start + window:
            fired = list(self._close(key, start + window))
            self.window_start[key] = floor_time(event.ts, window)
        total, count = self.scores.get(key, (0.0, 0))
        if not count:
            self.scored[key[0]][key] = None
        self.scores[key] = (total + body.score, count + 1)
        return fired

    def close_until(self, tenant: str, to: datetime) -> Iterator[Alert]:
        """Close each window of ``tenant``'s agents that ends by ``to`` (its clock past the
        end and the grace, ``Evaluator.advance``): an agent that scores in it no more is judged
        then, not at its next score."""
        window = self.rule.window
        before = floor_time(to, window)
        closed = self.closed_before.get(tenant)
        if closed is not None and before <= closed:
            return
        self.closed_before[tenant] = before
        for key in [k for k in self.scored.get(tenant, ()) if self.window_start[k] < before]:
            yield from self._close(key, self.window_start[key] + window)

    def _forget(self, key: tuple[str, str]) -> None:
        del self.window_start[key]
        self.scores.pop(key, None)
        self.scored[key[0]].pop(key, None)
        self.history.pop(key, None)

    def _close(self, key: tuple[str, str], end: datetime) -> Iterator[Alert]:
        r = self.rule
        total, count = self.scores.pop(key, (0.0, 0))
        self.scored[key[0]].pop(key, None)
        if count < r.min_samples:
            return
        mean = total / count
        history = self.history[key]
        while history and history[0][0] < end - EVAL_BASELINE_WINDOWS * r.window:
            history.popleft()  # past what the baseline reaches
        before = [m for _, m in history]
        baseline = sum(before) / len(before) if len(before) >= 3 else None
        history.append((end, mean))
        scope = {"tenant": key[0], "agent": key[1]}
        if mean < r.min_score:
            yield Alert(
                "eval_regression", scope, end, r.metric, mean, r.min_score,
                f"{r.metric} averaged {mean:.3f} over {count} scores, below {r.min_score}",
                "critical",
            )  # fmt: skip
        elif baseline is not None and baseline - mean >= r.max_drop:
            yield Alert(
                "eval_regression", scope, end, r.metric, mean, baseline - r.max_drop,
                f"{r.metric} fell to {mean:.3f} from a baseline of {baseline:.3f}",
            )  # fmt: skip


# --- all of it -------------------------------------------------------------------------


def as_stored(event: Event, stored_at: datetime) -> Event:
    """``event`` as the worker's evaluators take it, stored at ``stored_at``: no later than that.
    An event time ahead of it is a producer's clock running fast (validation lets one run up to
    ``VIGIL_MAX_CLOCK_SKEW_SECONDS`` ahead). Taken at its own time, one such event would move
    every window it reaches ahead: a daily budget into the next day (the rest of today's spend
    then late, left out), a drift monitor's or an eval rule's window up to an hour on (every
    sample on time then late, never judged). The replay of the ledger takes each stored event
    the same way (``alerting.stored_history``), so a rebuilt state is the state the events made
    as they were stored. ``vigil alerts backtest`` has no time of storing and takes event time."""
    return event if event.ts <= stored_at else replace(event, ts=stored_at)


class Evaluator:
    """Every rule of a vigil.yaml, fed enriched events in event-time order, with cool-down."""

    def __init__(self, rules: AlertRules) -> None:
        self.rules = rules
        self.budgets = [BudgetWatch(b) for b in rules.budgets]
        self._budgets_of: dict[str, list[BudgetWatch]] = defaultdict(list)  # by tenant
        for watch in self.budgets:
            self._budgets_of[watch.budget.tenant].append(watch)
        self.anomaly = SpendAnomaly(rules.anomaly_factor)
        self.drift = [DriftWatch(m) for m in rules.drift]
        self.evals = [EvalWatch(r) for r in rules.evals]
        self.last_fired: dict[tuple[str, tuple[tuple[str, str], ...], str], datetime] = {}
        # the windows a tenant's clock closes: its eval rules', its own drift monitors' (one
        # pooling tenants has no one clock)
        self._windows = {m.window for m in rules.drift if m.tenant != "*"}
        self._windows |= {r.window for r in rules.evals}
        # per tenant, its clock (``advance``) before which no drift or eval window of it can
        # end its grace
        self._due: dict[str, datetime] = {}

    def advance(self, tenant: str, clock: datetime) -> list[Alert]:
        """``tenant``'s clock at ``clock``, the latest time of its events (``observe``): its
        eval windows, and those of the drift monitors of it alone, that ended ``window_grace``
        or more before it close, each judged on the samples it has. So an agent whose scores
        stop (a nightly eval run, an agent taken out of service) is judged once its tenant's
        other agents' events pass the grace after its window's end, not at its next score, and
        a sample that comes after that is late, left out. The clock is event time, each
        tenant's own (its events are in one clean partition, in order), so a backlog caught up
        after an outage is judged as it was sent, and a replay of the ledger alike."""
        due = self._due.get(tenant)
        if not self._windows or (due is not None and clock < due):
            return []
        grace = self.rules.window_grace
        to = clock - grace
        fired: list[Alert] = []
        for drift in self.drift:
            if drift.m.tenant == tenant:
                fired += drift.close_until(to)
        for ev in self.evals:
            fired += ev.close_until(tenant, to)
        self._due[tenant] = min(floor_time(to, w) + w for w in self._windows) + grace
        return [a for a in fired if self._due_alert(a)]

    def caught_up(self, at: datetime) -> list[Alert]:
        """Every event appended to the pipeline's topics before ``at`` (wall time) has been
        observed: its consumer groups' lag samples showed it (``alerting.CaughtUp``).
        An event still to come is stored after ``at``, and stamped no more than its producer's
        delay before that: so ``at`` is every tenant's clock (``advance``), and the clock of the
        drift monitors that pool tenants, and a tenant that sends nothing more has its last
        windows judged ``window_grace`` after their end. A sample that comes after that, more
        than the grace behind its window's end (an SDK spool sent after an outage), is late."""
        fired: list[Alert] = []
        for tenant in list(self._due):
            fired += self.advance(tenant, at)
        to = at - self.rules.window_grace
        for drift in self.drift:
            if drift.m.tenant == "*":
                fired += [a for a in drift.close_until(to) if self._due_alert(a)]
        return fired

    def observe(self, event: Event) -> list[Alert]:
        """The alerts ``event`` fires, its tenant's clock advanced to its time first."""
        due = self._due.get(event.tenant_id)  # as ``advance`` checks, without a call an event
        closed = self.advance(event.tenant_id, event.ts) if due is None or event.ts >= due else []
        cost = 0.0
        if event.enrichment is not None and event.enrichment.cost_usd is not None:
            # the decimal text, rounded to the nearest float as float(Decimal(text)) rounds it
            cost = float(event.enrichment.cost_usd)
        fired: list[Alert] = []
        for watch in self._budgets_of.get(event.tenant_id, ()):
            if watch.budget.covers(event):
                fired += watch.observe(event, cost)
        if cost > 0:
            fired += self.anomaly.observe(event, cost)
        for drift in self.drift:
            fired += drift.observe(event)
        for ev in self.evals:
            fired += ev.observe(event)
        if not fired:
            return closed
        return closed + [a for a in fired if self._due_alert(a)]

    def late(self) -> Counter[tuple[str, str]]:
        """The samples left out of their window because it had been judged when they came, by
        rule (``drift``, ``eval``) and tenant: a tenant's producer whose backlog came more than
        ``window_grace`` behind its other events (an SDK spool sent after an outage)."""
        late: Counter[tuple[str, str]] = Counter()
        for rule, watches in (("drift", self.drift), ("eval", self.evals)):
            for watch in watches:
                late.update({(rule, tenant): n for tenant, n in watch.late.items()})
        return late

    def _due_alert(self, alert: Alert) -> bool:
        if alert.kind in ("budget_threshold", "budget_forecast"):
            return True  # once per level / per period by construction
        key = (alert.kind, tuple(sorted(alert.scope.items())), alert.metric)
        last = self.last_fired.get(key)
        if last is not None and alert.fired_at - last < self.rules.cooldown:
            return False
        self.last_fired[key] = alert.fired_at
        return True


def backtest(rules: AlertRules, events: Iterable[Event]) -> list[Alert]:
    """Replay events (sorted here by event time) through the evaluators."""
    evaluator = Evaluator(rules)
    out: list[Alert] = []
    for event in sorted(events, key=lambda e: e.ts):
        out += evaluator.observe(event)
    return out
