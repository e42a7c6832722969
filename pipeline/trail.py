"""The audit trail: the ordered story of one trace, unit of work or user, from the ledger.

Each interaction (model, tokens, cost, redacted input and output), tool call, evaluation and
cost, and every human decision on any of them, also when the decision was recorded outside
the trace or unit it is about.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

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
MAX_TEXT = 240


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


def trail(store: Store, selector: Selector) -> list[dict[str, Any]]:
    """The selected events and the evaluations and decisions about them, in time order."""
    where = selector.where()
    rows = _fetch(store, where)
    if rows:  # decisions and evaluations about them, wherever they were recorded
        rows += _fetch(
            store,
            # event ids are unique within a tenant: a decision is about its own tenant's event
            "(tenant_id, subject_event_id) IN "
            f"(SELECT tenant_id, event_id FROM vigil.audit_log WHERE {where}) "
            f"AND NOT ({where})",
        )
    return sorted(rows, key=lambda r: (r["ts"], r["kind"] == "decision", r["event_id"]))


def _fetch(store: Store, where: str) -> list[dict[str, Any]]:
    out = []
    for row in store.query_rows(f"SELECT {_SELECT} FROM vigil.audit_log WHERE {where}"):
        record = dict(zip(FIELDS, row, strict=True))
        record["ts"] = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(row[0]))
        out.append(record)
    return out


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


def render(selector: Selector, records: Sequence[dict[str, Any]]) -> str:
    """The trail as text for a person."""
    if not records:
        return f"No events for {selector}.\n"
    # cost_usd is every event's cost in USD: priced interactions and reported costs alike
    cost = sum((Decimal(str(r["cost_usd"])) for r in records if r["cost_usd"]), Decimal(0))
    tenants = ", ".join(sorted({r["tenant_id"] for r in records}))
    first, last = records[0]["ts"], records[-1]["ts"]
    out = [
        f"Trail of {selector}:{'' if selector.tenant else ' tenant ' + tenants + ','} "
        f"{len(records)} events, "
        f"{first:%Y-%m-%d %H:%M:%S} to {last:%H:%M:%S} UTC, cost ${cost:.6f}"
    ]
    for r in records:
        out += _line(r)
    return "\n".join(out) + "\n"
