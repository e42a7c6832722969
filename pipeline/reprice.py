"""Repricing history under another catalog, without touching the ledger: every difference is
recorded in ``vigil.cost_adjustments`` (once per tenant, event and catalog version), with a
reconciliation of old and new totals. Blocking; needs the store's owner (a stopped worker)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from pipeline.events import Interaction
from pipeline.prices import Catalog, interaction_cost
from pipeline.rows import money
from pipeline.sink import Key, stored_in_scopes, unstored
from pipeline.store import Store, sql_literal

QUANTUM = Decimal("0.000000001")
ADJUSTMENT_COLUMNS = (
    "adjustment_id", "event_id", "ts", "tenant_id", "agent_id", "model", "old_cost_usd",
    "new_cost_usd", "delta_usd", "old_version", "new_version", "computed_at",
)  # fmt: skip
_CHUNK = 10_000


@dataclass
class Reconciliation:
    version: str
    examined: int = 0
    changed: int = 0
    already_recorded: int = 0
    old_total: Decimal = Decimal(0)
    new_total: Decimal = Decimal(0)
    newly_priced: int = 0
    newly_unpriced: int = 0
    by_model: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))

    @property
    def delta(self) -> Decimal:
        return self.new_total - self.old_total


def reprice(
    store: Store,
    catalog: Catalog,
    since: datetime | None = None,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Reconciliation:
    """Recompute every interaction's cost (since ``since``) under ``catalog`` and record the
    differences. Re-running with the same catalog records nothing new. Raises StoreError, or
    InvalidEvent naming the event and model whose new cost the ledger's columns cannot hold (a
    price far too large), before anything is recorded."""
    where = "kind = 'interaction'"
    if since is not None:
        where += f" AND ts >= toDateTime64('{since:%Y-%m-%d %H:%M:%S}', 3, 'UTC')"
    rows = store.query_rows(
        "SELECT event_id, ts, tenant_id, agent_id, provider, model, input_tokens, output_tokens, "
        "cache_read_tokens, cache_write_tokens, cost_usd, price_version FROM vigil.audit_log "
        f"WHERE {where} ORDER BY ts, event_id"
    )
    result = Reconciliation(catalog.version)
    now = clock()
    pending: list[tuple[Key, tuple[object, ...]]] = []
    for event_id, ts, tenant, agent, provider, model, inp, out, cr, cw, old, old_version in rows:
        result.examined += 1
        price = catalog.price(provider, model, ts if ts.tzinfo else ts.replace(tzinfo=UTC))
        body = Interaction(provider, model, input_tokens=inp, output_tokens=out,
                           cache_read_tokens=cr, cache_write_tokens=cw)  # fmt: skip
        new = None
        if price:
            what = f"cost_usd of event {event_id} ({provider}/{model}) under {catalog.version}"
            new = money(interaction_cost(body, price), what)
        old = Decimal(old).quantize(QUANTUM) if old is not None else None
        result.old_total += old or 0
        result.new_total += new or 0
        if new == old:
            continue
        result.changed += 1
        result.newly_priced += old is None
        result.newly_unpriced += new is None
        delta = (new or Decimal(0)) - (old or Decimal(0))
        result.by_model[model] += delta
        adjustment_id = hashlib.sha256(
            f"{tenant}\x00{event_id}\x00{catalog.version}".encode()
        ).hexdigest()[:32]
        adjustment = (adjustment_id, event_id, ts, tenant, agent, model, old, new, delta,
                      old_version, catalog.version, now)  # fmt: skip
        pending.append(((tenant, event_id), adjustment))
    # An adjustment is recorded once per (tenant, event, catalog version): looked up by those
    # columns, not by adjustment_id, whose formula an earlier release computed without the tenant.
    recorded_under = f"new_version = {sql_literal(catalog.version)}"
    for start in range(0, len(pending), _CHUNK):
        chunk = pending[start : start + _CHUNK]
        known = stored_in_scopes(store, "vigil.cost_adjustments", "event_id", "tenant_id",
                                 {key for key, _ in chunk}, recorded_under)  # fmt: skip
        fresh = [row for _, row in unstored(chunk, known)]
        result.already_recorded += len(chunk) - len(fresh)
        if fresh:
            token = f"reprice-{catalog.version}-{fresh[0][0]}-{fresh[-1][0]}"
            store.insert("vigil.cost_adjustments", fresh, ADJUSTMENT_COLUMNS, token)
        if progress is not None:
            progress(start + len(chunk))
    return result
