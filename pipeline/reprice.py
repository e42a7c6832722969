"""Repricing history under another catalog, without touching the ledger: every difference is
recorded in ``vigil.cost_adjustments`` (once per tenant, event and catalog version), with a
reconciliation of old and new totals. Blocking; needs the store's owner (a stopped worker)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pipeline.events import Interaction
from pipeline.prices import Catalog, interaction_cost
from pipeline.rows import money
from pipeline.sink import Key, stored_in_scopes, unstored
from pipeline.spill import Spill
from pipeline.store import Store, sql_literal

QUANTUM = Decimal("0.000000001")
ADJUSTMENT_COLUMNS = (
    "adjustment_id", "event_id", "ts", "tenant_id", "agent_id", "model", "old_cost_usd",
    "new_cost_usd", "delta_usd", "old_version", "new_version", "computed_at",
)  # fmt: skip
_CHUNK = 10_000  # adjustments recorded in one insert
# an adjustment to record: its tenant and event, and its row of ADJUSTMENT_COLUMNS
Adjustment = tuple[Key, tuple[object, ...]]


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
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Reconciliation:
    """Recompute every interaction's cost (since ``since``) under ``catalog`` and record the
    differences. Re-running with the same catalog records nothing new. Raises StoreError, or
    InvalidEvent naming the event and model whose new cost the ledger's columns cannot hold (a
    price far too large), before anything is recorded. ``progress(examined, recorded)`` is
    called after each chunk of interactions read and each chunk of adjustments recorded.

    The ledger's interactions are read as they come, and the adjustments to record kept in a
    temporary file (compressed) until all have been computed. Held at once as Python objects,
    the rows took 1.3 KB of memory each, and a month of a busy deployment's interactions is
    millions (docs/benchmarks.md, "Repricing in bounded memory")."""
    where = "kind = 'interaction'"
    if since is not None:
        where += f" AND ts >= toDateTime64('{since:%Y-%m-%d %H:%M:%S}', 3, 'UTC')"
    query = (
        "SELECT event_id, ts, tenant_id, agent_id, provider, model, input_tokens, output_tokens, "
        "cache_read_tokens, cache_write_tokens, cost_usd, price_version FROM vigil.audit_log "
        f"WHERE {where} ORDER BY tenant_id, ts, event_id"  # the table's order: read, not sorted
    )
    result = Reconciliation(catalog.version)
    now = clock()
    with Spill[Adjustment]("vigil-reprice-", _CHUNK) as spill:
        _priced_into(spill, store.stream_rows(query), catalog, now, result, progress)
        recorded = 0
        for chunk in spill.chunks():
            recorded += _record(store, catalog.version, chunk, result)
            if progress is not None:
                progress(result.examined, recorded)
    return result


def _priced_into(
    spill: Spill[Adjustment],
    rows: Generator[tuple[Any, ...], None, None],
    catalog: Catalog,
    now: datetime,
    result: Reconciliation,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Price each of the ledger's ``rows`` under ``catalog``, counted in ``result``, and add
    the adjustments to ``spill``. ``rows`` is closed once read, or at an error, and the store
    is then free again."""
    with closing(rows):
        for row in rows:
            result.examined += 1
            if (adjustment := _adjustment(row, catalog, now, result)) is not None:
                spill.add(adjustment)
            if progress is not None and result.examined % _CHUNK == 0:
                progress(result.examined, 0)


def _adjustment(
    row: tuple[Any, ...], catalog: Catalog, now: datetime, result: Reconciliation
) -> Adjustment | None:
    """The adjustment of one ledger row under ``catalog``, counted in ``result``; None if its
    cost does not change."""
    event_id, ts, tenant, agent, provider, model, inp, out, cr, cw, old, old_version = row
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
        return None
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
    return (tenant, event_id), adjustment


def _record(store: Store, version: str, chunk: list[Adjustment], result: Reconciliation) -> int:
    """Insert the adjustments of ``chunk`` not recorded before; how many were inserted.

    An adjustment is recorded once per (tenant, event, catalog version): looked up by those
    columns, not by adjustment_id, whose formula an earlier release computed without the
    tenant."""
    recorded_under = f"new_version = {sql_literal(version)}"
    known = stored_in_scopes(store, "vigil.cost_adjustments", "event_id", "tenant_id",
                             {key for key, _ in chunk}, recorded_under)  # fmt: skip
    fresh = [row for _, row in unstored(chunk, known)]
    result.already_recorded += len(chunk) - len(fresh)
    if fresh:
        token = f"reprice-{version}-{fresh[0][0]}-{fresh[-1][0]}"
        store.insert("vigil.cost_adjustments", fresh, ADJUSTMENT_COLUMNS, token)
    return len(fresh)
