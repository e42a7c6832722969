"""``vigil report``: one self-contained HTML page with the dashboards' main views, for people
without Grafana. Charts are inline SVG drawn here (no scripts, no network), so the file can be
mailed or attached to a ticket as it is.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pipeline.alerts import Budget, forecast, period_bounds
from pipeline.store import Store, sql_literal

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
W, H, PAD = 760, 260, 48


def _esc(value: Any) -> str:
    return html.escape(str(value))


def line_chart(
    title: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    x_label: str,
    y_label: str,
    hlines: Mapping[str, float] | None = None,
    dashed: Sequence[str] = (),
    x_ticks: Sequence[tuple[float, str]] = (),
) -> str:
    """An SVG line chart; x and y are plain numbers (callers map times to numbers)."""
    points = [p for s in series.values() for p in s]
    if not points:
        return f"<h2>{_esc(title)}</h2><p class=empty>No data.</p>"
    hl = dict(hlines or {})
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y1 = max([p[1] for p in points] + list(hl.values()) + [1e-9]) * 1.08
    x1 = x1 if x1 > x0 else x0 + 1

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def sy(y: float) -> float:
        return H - PAD + 10 - y / y1 * (H - 2 * PAD)

    parts = [
        f'<svg class="chart" viewBox="0 0 {W} {H + 30}" role="img" aria-label="{_esc(title)}">'
    ]
    for k in range(5):
        y = y1 * k / 4
        parts.append(f'<line x1="{PAD}" x2="{W - PAD}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>'
                     f'<text x="{PAD - 6}" y="{sy(y) + 4:.1f}" class="tick" text-anchor="end">{y:,.4g}</text>')  # fmt: skip
    for x, label in x_ticks:
        if not x0 <= x <= x1:
            continue
        parts.append(f'<text x="{sx(x):.1f}" y="{H - PAD + 26}" class="tick" text-anchor="middle">{_esc(label)}</text>')  # fmt: skip
    legend = []
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}"
                        for j, (x, y) in enumerate(sorted(pts)))  # fmt: skip
        dash = ' stroke-dasharray="6 4"' if name in dashed else ""
        parts.append(f'<path d="{path}" stroke="{colour}" fill="none" stroke-width="2"{dash}/>')
        legend.append((name, colour))
    for name, y in hl.items():
        parts.append(f'<line x1="{PAD}" x2="{W - PAD}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="limit"/>'
                     f'<text x="{W - PAD}" y="{sy(y) - 4:.1f}" class="tick" text-anchor="end">{_esc(name)}</text>')  # fmt: skip
    for i, (name, colour) in enumerate(legend):
        parts.append(f'<rect x="{PAD + i * 150}" y="{H + 12}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{PAD + i * 150 + 14}" y="{H + 21}" class="tick">{_esc(name)}</text>')  # fmt: skip
    parts.append(f'<text x="12" y="{H / 2}" class="axis" transform="rotate(-90 12 {H / 2})" text-anchor="middle">{_esc(y_label)}</text>')  # fmt: skip
    parts.append(f'<text x="{W / 2}" y="{H - 4}" class="axis" text-anchor="middle">{_esc(x_label)}</text></svg>')  # fmt: skip
    return f"<h2>{_esc(title)}</h2>" + "".join(parts)


def bar_chart(title: str, rows: Sequence[tuple[str, Sequence[float]]], names: Sequence[str]) -> str:
    """Horizontal grouped bars: one group per row label, one bar per value name."""
    if not rows:
        return f"<h2>{_esc(title)}</h2><p class=empty>No data.</p>"
    top = max(max(v) for _, v in rows) or 1.0
    step = 12 * len(names) + 10
    height = len(rows) * step + 40
    parts = [
        f'<svg class="chart" viewBox="0 0 {W} {height}" role="img" aria-label="{_esc(title)}">'
    ]
    for r, (label, values) in enumerate(rows):
        y = 10 + r * step
        parts.append(f'<text x="190" y="{y + 10 * len(names) / 2 + 6}" class="tick" text-anchor="end">{_esc(label)}</text>')  # fmt: skip
        for i, value in enumerate(values):
            width = value / top * (W - 300)
            parts.append(f'<rect x="200" y="{y + i * 12}" width="{width:.1f}" height="10" fill="{COLOURS[i]}"/>'
                         f'<text x="{204 + width:.1f}" y="{y + i * 12 + 9}" class="tick">{value:,.4f}</text>')  # fmt: skip
    for i, name in enumerate(names):
        parts.append(f'<rect x="{200 + i * 120}" y="{height - 18}" width="10" height="10" fill="{COLOURS[i]}"/>'
                     f'<text x="{214 + i * 120}" y="{height - 9}" class="tick">{_esc(name)}</text>')  # fmt: skip
    return f"<h2>{_esc(title)}</h2>" + "".join(parts) + "</svg>"


def _hours(since: datetime, ts: datetime) -> float:
    return (ts - since).total_seconds() / 3600


def spend_against_budget(store: Store, budget: Budget, now: datetime) -> str:
    """Cumulative spend of the budget's current period, the forecast to its end (the same
    model as the budget_forecast alert) and the limit. Hours for a daily budget, else days."""
    start, end = period_bounds(budget.period, now)
    hourly = budget.period == "day"
    step = timedelta(hours=1) if hourly else timedelta(days=1)
    bucket = "toStartOfHour(ts)" if hourly else "toStartOfDay(ts)"
    where = [f"tenant_id = {sql_literal(budget.tenant)}",
             f"ts >= toDateTime('{start:%Y-%m-%d %H:%M:%S}')"]  # fmt: skip
    if budget.team:
        where.append(f"team = {sql_literal(budget.team)}")
    if budget.agent:
        where.append(f"agent_id = {sql_literal(budget.agent)}")
    rows = store.query_rows(
        f"SELECT toUnixTimestamp({bucket}) AS b, sum(ifNull(cost_usd, 0)) FROM vigil.audit_log "
        f"WHERE {' AND '.join(where)} GROUP BY b ORDER BY b"
    )
    amounts = {int((datetime.fromtimestamp(int(b), UTC) - start) / step): float(v) for b, v in rows}
    total_buckets = int((end - start) / step)
    current = int((now - start) / step)
    buckets = [amounts.get(i, 0.0) for i in range(current + 1)]
    spent: list[tuple[float, float]] = []
    total = 0.0
    for i, amount in enumerate(buckets):
        total += amount
        spent.append((i + 1, total))
    series: dict[str, list[tuple[float, float]]] = {"spent": spent}
    complete = buckets[:-1]
    if len(complete) >= 2:
        f = forecast(complete, total_buckets, sum(complete))
        running = sum(complete)
        projection = [(float(current), running)]
        for k, amount in enumerate(f.ahead):
            running += amount
            projection.append((current + k + 1, running))
        series["forecast"] = projection
    fmt = "%H:00" if hourly else "%b %d"
    every = 4 if hourly else 5
    ticks = [(i + 1, f"{start + step * i:{fmt}}") for i in range(0, total_buckets, every)]
    scope = "/".join(f"{k}={v}" for k, v in budget.scope.items())
    return line_chart(
        f"Spend this {budget.period} against the budget ({scope})", series,
        "hour (UTC)" if hourly else "day", "USD",
        {f"budget ${budget.limit_usd:,.0f}": budget.limit_usd}, dashed=("forecast",),
        x_ticks=ticks,
    )  # fmt: skip


def _series_by(
    rows: Sequence[Sequence[Any]], since: datetime
) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for when, name, value in rows:
        ts = when if isinstance(when, datetime) else datetime.fromisoformat(str(when))
        ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
        out.setdefault(str(name), []).append((_hours(since, ts), float(value)))
    return out


def render(store: Store, budgets: Sequence[Budget], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=6)
    per_unit = store.query_rows(
        "SELECT concat(agent_id, ' (', unit_type, ')'), quantile(0.5)(cost_usd), "
        "quantile(0.95)(cost_usd) FROM vigil.unit_costs GROUP BY agent_id, unit_type "
        "ORDER BY agent_id"
    )
    totals = store.query_rows(
        "SELECT count(), sum(ifNull(cost_usd, 0)), uniqExact(tenant_id), uniqExact(agent_id), "
        "countIf(cost_status = 'unknown_model') FROM vigil.audit_log"
    )[0]
    window = f"ts >= toDateTime('{since:%Y-%m-%d %H:%M:%S}')"
    tokens = store.query_rows(
        "SELECT toStartOfInterval(ts, INTERVAL 10 minute) AS t, agent_id, avg(output_tokens) "
        f"FROM vigil.audit_log WHERE kind = 'interaction' AND {window} GROUP BY t, agent_id "
        "ORDER BY t"
    )
    scores = store.query_rows(
        "SELECT toStartOfInterval(ts, INTERVAL 10 minute) AS t, metric, avg(score) FROM "
        f"vigil.audit_log WHERE kind = 'eval' AND {window} GROUP BY t, metric ORDER BY t"
    )
    alerts = store.query_rows(
        "SELECT fired_at, kind, severity, message FROM vigil.alerts FINAL ORDER BY fired_at DESC "
        "LIMIT 50"
    )
    ticks = [(float(h), f"{since + timedelta(hours=h):%H:%M}") for h in range(7)]
    sections = [
        bar_chart("Cost per unit of work by agent (USD)",
                  [(str(r[0]), [float(r[1] or 0), float(r[2] or 0)]) for r in per_unit],
                  ["p50", "p95"]),
        *(spend_against_budget(store, b, now) for b in budgets),
        line_chart("Output tokens per call, 10-minute means (drift shows here)",
                   _series_by(tokens, since), "UTC", "tokens", x_ticks=ticks),
        line_chart("Eval scores, 10-minute means", _series_by(scores, since), "UTC", "score",
                   x_ticks=ticks),
    ]  # fmt: skip
    alert_rows = (
        "".join(
            f"<tr class={_esc(sev)}><td>{_esc(str(at)[:19])}</td><td>{_esc(kind)}</td>"
            f"<td>{_esc(sev)}</td><td>{_esc(msg)}</td></tr>"
            for at, kind, sev, msg in alerts
        )
        or "<tr><td colspan=4>No alerts.</td></tr>"
    )
    events, cost, tenants, agents, unpriced = totals
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Vigil report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 820px; color: #222; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
.chart {{ width: 100%; background: #fafafa; border: 1px solid #eee; }}
.grid {{ stroke: #e4e4e4; }} .limit {{ stroke: #d62728; stroke-dasharray: 3 3; }}
.tick {{ font-size: 11px; fill: #555; }} .axis {{ font-size: 12px; fill: #333; }}
table {{ border-collapse: collapse; width: 100%; font-size: 12px; }}
td, th {{ border-bottom: 1px solid #eee; padding: 4px; text-align: left; vertical-align: top; }}
tr.critical td {{ color: #b00; }} .empty {{ color: #888; }}
</style></head><body>
<h1>Vigil report</h1>
<p>Generated {now:%Y-%m-%d %H:%M} UTC. {int(events):,} events from {int(tenants)} tenants and
{int(agents)} agents, ${Decimal(str(cost)):,.2f} in all; {int(unpriced):,} calls to models the
price catalog does not know.</p>
{"".join(sections)}
<h2>Alerts</h2>
<table><tr><th>fired (event time)</th><th>kind</th><th>severity</th><th>what</th></tr>
{alert_rows}</table>
</body></html>
"""
