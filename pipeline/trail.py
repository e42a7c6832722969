"""The audit trail: the ordered story of one trace, unit of work or user, from the ledger.

Each interaction (model, tokens, cost, redacted input and output), tool call, evaluation and
cost, and every human decision on any of them, also when the decision was recorded outside
the trace or unit it is about.

A trail is read in bounded memory, sorted in spilled runs: a user's may span years of work,
more than memory holds. Its ``Summary`` is counted from the same rows, as they are read.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pipeline.spill import in_order
from pipeline.store import Store, sql_literal

FIELDS = (
    "ts", "kind", "event_id", "tenant_id", "agent_id", "trace_id", "unit_type", "unit_id",
    "actor_user_id", "actor_role", "provider", "model", "operation", "input_tokens",
    "output_tokens", "cost_usd", "cost_status", "status", "error_type", "tool_name",
    "input_text", "output_text", "metric", "score", "threshold", "value", "decision",
    "reviewer_id", "reason", "subject_event_id", "amount", "currency", "category",
    "description", "redactions",
)  # fmt: skip
_SELECT = ", ".join(
    {
        "ts": "toUnixTimestamp64Milli(ts)",
        "cost_usd": "toString(cost_usd)",
        "amount": "toString(amount)",
        "redactions": "arrayMap(r -> concat(r.2, ' in ', r.1, ' x', toString(r.3)), redactions)",
    }.get(f, f)
    for f in FIELDS
)
_TS, _KIND, _EVENT_ID, _TENANT, _COST = (
    FIELDS.index(f) for f in ("ts", "kind", "event_id", "tenant_id", "cost_usd")
)
MAX_TEXT = 240
TRAIL_RUN = 10_000  # rows sorted in memory before they are spilled (each holds its texts)


@dataclass(frozen=True)
class Selector:
    """What the trail is of: ``trace``, ``unit`` (``TYPE:ID``) or ``user``."""

    what: str
    value: str
    tenant: str | None = None

    def where(self) -> str:
        v = sql_literal(self.value)
        if self.what == "trace":
            cond = f"trace_id = {v}"
        elif self.what == "unit":
            unit_type, _, unit_id = self.value.partition(":")
            cond = f"unit_type = {sql_literal(unit_type)} AND unit_id = {sql_literal(unit_id)}"
        else:
            cond = f"(actor_user_id = {v} OR reviewer_id = {v})"
        return cond + (f" AND tenant_id = {sql_literal(self.tenant)}" if self.tenant else "")

    def __str__(self) -> str:
        return f"{self.what} {self.value}" + (f" (tenant {self.tenant})" if self.tenant else "")


@dataclass(frozen=True)
class Summary:
    """What a trail holds: its events, their tenants, first and last times and cost."""

    events: int
    tenants: tuple[str, ...]
    first: datetime
    last: datetime
    cost: Decimal  # every event's cost in USD: priced interactions and reported costs alike
    unpriced: int  # interactions and costs without one (an unknown model or currency)


class _Tally:
    """A trail's summary, counted row by row."""

    def __init__(self) -> None:
        self.events = 0
        self.tenants: set[str] = set()
        self.first = self.last = 0
        self.cost = Decimal(0)
        self.unpriced = 0

    def add(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        ms = int(row[_TS])
        if not self.events:
            self.first = self.last = ms
        self.first, self.last = min(self.first, ms), max(self.last, ms)
        self.events += 1
        self.tenants.add(row[_TENANT])
        if row[_COST]:
            self.cost += Decimal(row[_COST])
        elif row[_KIND] in ("interaction", "cost"):
            self.unpriced += 1
        return row

    def summary(self) -> Summary:
        return Summary(self.events, tuple(sorted(self.tenants)), _time(self.first),
                       _time(self.last), self.cost, self.unpriced)  # fmt: skip


def trail(store: Store, selector: Selector) -> tuple[Summary | None, Iterator[dict[str, Any]]]:
    """The trail's summary (None: no events), and the selected events and the evaluations and
    decisions about them, in time order (a decision after what it decides at the same
    millisecond). The rows are read from the store as they come and sorted here in runs
    spilled to temporary files (``spill.in_order``): sorted by the embedded engine, a trail of
    300,000 events took 1.2 GB, the engine holding every row and its texts
    (docs/benchmarks.md). Every row is read, and the store free again, before it returns."""
    tally = _Tally()
    rows = store.stream_rows(f"SELECT {_SELECT} FROM vigil.audit_log WHERE {_of(selector)}")
    ordered = in_order(map(tally.add, rows), _in_time_order, "vigil-trail-", run=TRAIL_RUN)
    try:
        first = next(ordered)  # sorting, it reads every row first
    except StopIteration:
        return None, iter(())
    finally:
        rows.close()
    return tally.summary(), _records(first, ordered)


def _records(
    first: tuple[Any, ...], ordered: Generator[tuple[Any, ...], None, None]
) -> Iterator[dict[str, Any]]:
    with closing(ordered):  # its temporary files
        for row in itertools.chain([first], ordered):
            record = dict(zip(FIELDS, row, strict=True))
            record["ts"] = _time(row[_TS])
            yield record


def _in_time_order(row: tuple[Any, ...]) -> tuple[int, bool, str]:
    """A row's place in the trail: its time, a decision after what it decides at the same
    millisecond, then its event id."""
    return row[_TS], row[_KIND] == "decision", row[_EVENT_ID]


def _of(selector: Selector) -> str:
    """Where a row is in the trail: selected, or an evaluation or decision about one that is
    (event ids are unique within a tenant: a decision is about its own tenant's event)."""
    chosen = selector.where()
    return (
        f"({chosen}) OR (tenant_id, subject_event_id) IN "
        f"(SELECT tenant_id, event_id FROM vigil.audit_log WHERE {chosen})"
    )


def _time(ms: Any) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(ms))


def clipped(text: str, width: int) -> str:
    """``text``, or its first ``width`` - 1 characters and an ellipsis, which says it goes on."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(text: str | None) -> str:
    return clipped(" ".join(text.split()), MAX_TEXT) if text else ""


def _usd(value: Any) -> str:
    return "" if value in (None, "") else f"${Decimal(str(value)):.6f}"


def _line(r: dict[str, Any]) -> list[str]:
    when = r["ts"].strftime("%H:%M:%S.%f")[:-3]
    head = f"  {when}  "
    kind = r["kind"]
    if kind == "interaction":
        cost = _usd(r["cost_usd"]) or f"cost {r['cost_status'] or 'unknown'}"
        error = f" ({r['error_type']})" if r["error_type"] else ""
        if r["tool_name"]:
            tool = f"{r['tool_name']} via {r['agent_id']}"
            lines = [f"{head}tool call    {tool}  {r['status']}{error}"]
        else:
            lines = [
                f"{head}interaction  {r['agent_id']}  {r['model']} {r['operation']}  "
                f"{r['input_tokens']} in / {r['output_tokens']} out tokens  {cost}  "
                f"{r['status']}{error}"
            ]
        who = r["actor_user_id"] or "unknown user"
        if r["input_text"]:
            lines.append(f"                input from {who}: {_short(r['input_text'])}")
        if r["output_text"]:
            lines.append(f"                output: {_short(r['output_text'])}")
    elif kind == "eval":
        below = r["threshold"] is not None and r["score"] < r["threshold"]
        verdict = "below threshold" if below else "ok"
        lines = [
            f"{head}evaluation   {r['metric']} {r['score']:.2f} (threshold "
            f"{r['threshold'] if r['threshold'] is not None else '-'}) {verdict}"
        ]
    elif kind == "decision":
        about = f" on {r['subject_event_id']}" if r["subject_event_id"] else ""
        lines = [
            f"{head}decision     {r['decision'].upper()} by {r['reviewer_id']}{about}: "
            f"{_short(r['reason']) or '(no reason given)'}"
        ]
    elif kind == "cost":
        lines = [
            f"{head}cost         {_usd(r['amount'])} {r['category']}: {_short(r['description'])}"
        ]
    else:
        lines = [f"{head}{kind:<12} {r['metric']} = {r['value']}"]
    if r["redactions"]:
        lines.append(f"                redacted: {', '.join(r['redactions'])}")
    return lines


def render(
    selector: Selector, about: Summary | None, rows: Iterable[dict[str, Any]]
) -> Iterator[str]:
    """The trail as text for a person, a line at a time (each ending in a newline): a heading
    from ``about``, then ``rows`` (``records``), each at its time of day, under a line with the
    date where a day begins after the first."""
    if about is None:
        yield f"No events for {selector}.\n"
        return
    tenants = "" if selector.tenant else f" tenant {', '.join(about.tenants)},"
    to = "%H:%M:%S" if about.last.date() == about.first.date() else "%Y-%m-%d %H:%M:%S"
    unpriced = f" ({about.unpriced} unpriced)" if about.unpriced else ""
    yield (
        f"Trail of {selector}:{tenants} {about.events} events, "
        f"{about.first:%Y-%m-%d %H:%M:%S} to {about.last.strftime(to)} UTC, "
        f"cost ${about.cost:.6f}{unpriced}\n"
    )
    day = about.first.date()
    for r in rows:
        if r["ts"].date() != day:
            day = r["ts"].date()
            yield f"  {day:%Y-%m-%d}\n"
        for line in _line(r):
            yield line + "\n"
