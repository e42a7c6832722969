"""The hash-chained ledger: how ``vigil.audit_log`` rows are linked, and how the links are checked.

A *chain* is one (tenant, clean-topic partition, month of ``ts``). Within it rows are numbered
``chain_seq`` 1, 2, 3... in the order the ledger writer stored them, and each row carries

    prev_hash = row_hash of the row before it (for seq 1: the chain's genesis hash)
    row_hash  = SHA-256 of the canonical encoding of every stored column except row_hash

The month is part of the chain so retention can expire a tenant's month without leaving holes
in a chain that goes on; the verifier knows from ``vigil.yaml`` which months may
have expired. The writer finds where each chain ends from what is stored (``chain_heads``), so
restarts, crashes and rebalances continue a chain rather than fork it; it remembers the ends it
wrote itself only while it holds their partitions without a break (``sink.LedgerSink``).

The canonical encoding is JSON of the column values normalised so that the row the writer
inserts and the row read back (natively or as JSON through the owner endpoint) encode to the
same bytes: times as epoch milliseconds, decimals as fixed 9-place strings, maps as sorted
pairs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import orjson

from pipeline.rows import AUDIT_COLUMNS
from pipeline.store import SQL_LIST_BYTES, Store, sized_chunks, sql_literal

CHAINED_COLUMNS = (*AUDIT_COLUMNS, "chain_seq", "prev_hash")
LEDGER_COLUMNS = (*CHAINED_COLUMNS, "row_hash")
BREAK_KINDS = ("modified", "deleted", "inserted", "reordered")

_TIME_COLUMNS = frozenset({"ts", "ingested_at"})
_DECIMAL_COLUMNS = frozenset({"reported_cost_usd", "amount", "cost_usd"})
_FLOAT_COLUMNS = frozenset({"latency_ms", "value", "score", "threshold"})
_NINE_PLACES = Decimal("1e-9")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_I = {name: i for i, name in enumerate(LEDGER_COLUMNS)}
PAGE_ROWS = 20_000


class Chain(NamedTuple):
    tenant: str
    partition: int
    month: int  # YYYYMM

    def __str__(self) -> str:
        return f"tenant={self.tenant} partition={self.partition} month={self.month}"


def genesis(chain: Chain) -> str:
    """The ``prev_hash`` of a chain's first row: bound to the chain, so a chain cannot be moved
    to another tenant or month."""
    return hashlib.sha256(
        f"vigil-ledger\0{chain.tenant}\0{chain.partition}\0{chain.month}".encode()
    ).hexdigest()


def epoch_ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MILLISECOND


def _time(value: Any) -> int:
    return value if isinstance(value, int) else epoch_ms(value)


def _decimal(value: Any) -> str:
    return format(Decimal(str(value)).quantize(_NINE_PLACES), "f")


def _float(value: Any) -> orjson.Fragment:
    """A measure as ``json`` writes a float, its ``repr``: orjson's own shortest form differs
    (1e16 for 1e+16). NaN and the infinities have no JSON: ValueError, as ``json`` raised."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{number} is not a finite number: it has no canonical JSON")
    return orjson.Fragment(repr(number))


def _attributes(value: Mapping[Any, Any]) -> list[list[str]]:
    return sorted([str(k), str(v)] for k, v in value.items())


def _redactions(value: Iterable[Any]) -> list[list[Any]]:
    items = (tuple(r.values()) if isinstance(r, Mapping) else r for r in value)
    return [[str(f), str(t), int(n)] for f, t, n in items]


_NORMALISE: dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(_TIME_COLUMNS, _time),
    **dict.fromkeys(_DECIMAL_COLUMNS, _decimal),
    **dict.fromkeys(_FLOAT_COLUMNS, _float),
    "attributes": _attributes,
    "redactions": _redactions,
}
# the columns whose value needs normalising; every other column is hashed as it is
_NORMALISED = tuple((i, _NORMALISE[c]) for i, c in enumerate(CHAINED_COLUMNS) if c in _NORMALISE)
# The canonical text is what json.dumps(values, ensure_ascii=False, separators=(",", ":"),
# allow_nan=False) wrote, UTF-8 encoded; orjson writes the same bytes (strings, integers, null,
# lists; floats come as ``_float``'s fragments) in a third of the time (docs/benchmarks.md). A
# datetime or a dataclass, which json refused, it is told to refuse too.
_ORJSON_REFUSE = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def row_hash(values: Sequence[Any]) -> str:
    """SHA-256 (hex) of a row given in CHAINED_COLUMNS order (row_hash itself excluded).
    Raises ValueError for a value canonical JSON cannot hold."""
    if len(values) != len(CHAINED_COLUMNS):
        raise ValueError(f"a chained row has {len(CHAINED_COLUMNS)} values, not {len(values)}")
    canonical = list(values)
    for i, normalise in _NORMALISED:
        if canonical[i] is not None:
            canonical[i] = normalise(canonical[i])
    try:
        text = orjson.dumps(canonical, option=_ORJSON_REFUSE)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"a chained row holds a value canonical JSON cannot: {exc}") from None
    return hashlib.sha256(text).hexdigest()


def chain_of(row: Sequence[Any]) -> Chain:
    """The chain an AUDIT_COLUMNS (or longer) row belongs to."""
    ts = row[_I["ts"]]
    month = ts.year * 100 + ts.month if isinstance(ts, datetime) else _month_of_ms(ts)
    return Chain(str(row[_I["tenant_id"]]), int(row[_I["source_partition"]]), month)


def _month_of_ms(ms: int) -> int:
    d = _EPOCH + timedelta(milliseconds=ms)
    return d.year * 100 + d.month


# --- writing ---------------------------------------------------------------------------


def _chain_filter(chains: Iterable[Chain]) -> str:
    """A condition on ``audit_log``: the row is in one of ``chains``."""
    return " OR ".join(
        f"(tenant_id = {sql_literal(c.tenant)} AND source_partition = {c.partition} "
        f"AND toYYYYMM(ts) = {c.month})"
        for c in chains
    )


def chain_heads(store: Store, chains: Iterable[Chain]) -> dict[Chain, tuple[int, str]]:
    """Where each chain ends now: (last seq, its row_hash); chains not started are absent.

    Asked of ``audit_log`` itself, so an insert that landed is always seen. The ``chain_ends``
    projection (migration 014) keeps each part's last link of every chain inside the part, so
    the answer reads a row per chain per part, however long the chains are.
    """
    heads: dict[Chain, tuple[int, str]] = {}
    # a batch of many tenants touches thousands of chains: ask in chunks that keep each query
    # far below max_query_size (3,600 chains in one query were refused, and retried forever)
    for wanted in sized_chunks(sorted(set(chains)), _chain_clause_bytes):
        for tenant, partition, month, seq, head in store.query_rows(
            "SELECT tenant_id, source_partition, toYYYYMM(ts), max(chain_seq), "
            "argMax(row_hash, chain_seq) FROM vigil.audit_log WHERE "
            + _chain_filter(wanted)
            + " GROUP BY tenant_id, source_partition, toYYYYMM(ts)"
            # the engine would otherwise rewrite toYYYYMM(ts) = M as a range of ts, which the
            # projection's key does not hold, and read every row of the chains instead
            + " SETTINGS optimize_time_filter_with_preimage = 0"
        ):
            heads[Chain(str(tenant), int(partition), int(month))] = (int(seq), str(head))
    return heads


def _chain_clause_bytes(chain: Chain) -> int:
    """About what one chain adds to a ``_chain_filter`` condition."""
    return len(sql_literal(chain.tenant).encode()) + 90


def link(
    rows: Sequence[Sequence[Any]], heads: Mapping[Chain, tuple[int, str]]
) -> tuple[list[tuple[Any, ...]], dict[Chain, tuple[int, str]]]:
    """AUDIT_COLUMNS rows, in the order they are to be stored -> LEDGER_COLUMNS rows, each
    chained after ``heads`` (as returned by ``chain_heads``) and after the rows before it; and
    where each chain of ``rows`` ends once they are stored (as ``heads``)."""
    ends: dict[Chain, tuple[int, str]] = {}
    linked = []
    for row in rows:
        chain = chain_of(row)
        seq, prev = ends.get(chain) or heads.get(chain) or (0, genesis(chain))
        values = (*row, seq + 1, prev)
        digest = row_hash(values)
        ends[chain] = (seq + 1, digest)
        linked.append((*values, digest))
    return linked, ends


# --- retention -------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """Per-tenant retention and the legal hold, from vigil.yaml.

    A tenant without ``retention_days`` keeps everything. Rows of a month expire together,
    ``retention_days`` after the month ends, unless the tenant or the row's unit of work is on
    legal hold.
    """

    days: Mapping[str, int] = field(default_factory=dict)
    held_tenants: frozenset[str] = frozenset()
    held_units: frozenset[tuple[str, str, str]] = frozenset()  # (tenant, unit type, unit id)

    def month_expired(self, tenant: str, month: int, now: datetime) -> bool:
        """Whether rows of ``tenant`` in ``month`` (YYYYMM) may have been removed by now."""
        days = self.days.get(tenant)
        if days is None or tenant in self.held_tenants:
            return False
        year, mon = divmod(month, 100)
        month_end = date(year + mon // 12, mon % 12 + 1, 1)
        return now.date() >= month_end + timedelta(days=days)

    def ttl_statement(self) -> str:
        """The ALTER that makes ClickHouse expire the ledger by this policy."""
        if not self.days:
            return "ALTER TABLE vigil.audit_log REMOVE TTL"
        days = ", ".join(f"tenant_id = {sql_literal(t)}, {d}" for t, d in sorted(self.days.items()))
        keep = [f"tenant_id IN ({', '.join(sql_literal(t) for t in sorted(self.days))})"]
        if self.held_tenants:
            held = ", ".join(sql_literal(t) for t in sorted(self.held_tenants))
            keep.append(f"tenant_id NOT IN ({held})")
        if self.held_units:
            units = ", ".join(
                f"({sql_literal(t)}, {sql_literal(ut)}, {sql_literal(ui)})"
                for t, ut, ui in sorted(self.held_units)
            )
            keep.append(f"(tenant_id, unit_type, unit_id) NOT IN ({units})")
        return (
            "ALTER TABLE vigil.audit_log MODIFY TTL toStartOfMonth(ts) + toIntervalMonth(1) + "
            f"toIntervalDay(multiIf({days}, 0)) DELETE WHERE {' AND '.join(keep)}"
        )

    def tenant_ttl_statement(self, table: str) -> str:
        """The ALTER that makes ClickHouse expire the rows of vigil.``table`` (one of
        TENANT_TABLES) by this policy: a tenant's ``retention_days`` after the row's time
        (TENANT_TABLES says which), so that its rejected input and its alerts do not outlive its
        stored events. A tenant on legal hold keeps its rows, and so does one with a unit of
        work on hold (these rows do not say their unit). Rows that name no tenant with a
        retention are kept."""
        tenant, since = TENANT_TABLES[table]
        held = self.held_tenants | {t for t, _, _ in self.held_units}
        expiring = {t: d for t, d in sorted(self.days.items()) if t not in held}
        if not expiring:
            return f"ALTER TABLE vigil.{table} REMOVE TTL"
        days = ", ".join(f"{tenant} = {sql_literal(t)}, {d}" for t, d in expiring.items())
        tenants = ", ".join(sql_literal(t) for t in expiring)
        return (
            f"ALTER TABLE vigil.{table} MODIFY TTL {since} + "
            f"toIntervalDay(multiIf({days}, 0)) DELETE WHERE {tenant} IN ({tenants})"
        )


# the tables beside the ledger that hold a tenant's data, expired by its retention
# (``Retention.tenant_ttl_statement``): each one's tenant column, and when a row's days begin
TENANT_TABLES = {
    "dlq": ("tenant_hint", "toDateTime(received_at)"),  # a letter names its tenant if it can
    # alerts as the ledger's month they fired in, whose spend their replay reads with them
    "alerts": ("tenant_id", "toStartOfMonth(fired_at) + toIntervalMonth(1)"),
    "alert_deliveries": ("tenant_id", "toStartOfMonth(fired_at) + toIntervalMonth(1)"),
}


def apply_retention(store: Store, retention: Retention) -> bool:
    """Install the retention policy as the ledger's TTL and that of each of TENANT_TABLES the
    schema has, each unless it is installed already (a MODIFY TTL rewrites what the TTL covers).
    Returns whether it changed anything."""
    changed = _apply_ttl(store, "audit_log", retention.ttl_statement())
    tables = ", ".join(sql_literal(t) for t in TENANT_TABLES)
    present = {name for (name,) in store.query_rows(
        f"SELECT name FROM system.tables WHERE database = 'vigil' AND name IN ({tables})"
    )}  # fmt: skip
    for table in TENANT_TABLES:
        if table in present:  # a schema before its migration has none to expire
            changed = _apply_ttl(store, table, retention.tenant_ttl_statement(table)) or changed
    return changed


def _apply_ttl(store: Store, table: str, statement: str) -> bool:
    """Run ``statement`` (an ALTER of vigil.``table``'s TTL) and record it in
    vigil.ledger_policy, unless it is the last one recorded for that table and the table has a
    TTL (migration 015 made the ledger's table again, without one)."""
    digest = hashlib.sha256(statement.encode()).hexdigest()
    last = store.query_rows(
        "SELECT statement_sha256 FROM vigil.ledger_policy WHERE startsWith(statement, "
        f"{sql_literal(f'ALTER TABLE vigil.{table} ')}) ORDER BY applied_at DESC LIMIT 1"
    )
    expires = "MODIFY TTL" in statement
    installed = bool(last) and last[0][0] == digest
    if installed and expires and not _has_ttl(store, table):
        installed = False
    if installed or (not last and not expires):
        return False
    store.command(statement)
    store.insert(
        "vigil.ledger_policy", [(digest, statement)], ("statement_sha256", "statement"),
        dedup_token=f"policy-{digest}-{datetime.now(UTC).isoformat()}",
    )  # fmt: skip
    return True


def _has_ttl(store: Store, table: str) -> bool:
    (engine,) = store.query_rows(
        "SELECT engine_full FROM system.tables WHERE database = 'vigil' "
        f"AND name = {sql_literal(table)}"
    )[0]
    return " TTL " in f" {engine} "


# --- verifying -------------------------------------------------------------------------


@dataclass(frozen=True)
class Break:
    """One place where the stored ledger differs from what the writer wrote."""

    kind: str  # one of BREAK_KINDS
    chain: Chain
    seq: int
    event_id: str
    detail: str

    def __str__(self) -> str:
        eid = f" event_id={self.event_id}" if self.event_id else ""
        return f"{self.kind}: {self.chain} seq={self.seq}{eid}: {self.detail}"


@dataclass
class Verdict:
    chains: int = 0
    rows: int = 0
    expired_rows: int = 0
    expired_chains: int = 0
    breaks: list[Break] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks

    def line(self) -> str:
        expired = (
            f"; {self.expired_rows:,} rows and {self.expired_chains} chain(s) expired by retention"
            if self.expired_rows or self.expired_chains
            else ""
        )
        if self.ok:
            return f"OK: {self.rows:,} rows in {self.chains} chain(s) verified, no breaks{expired}"
        return (
            f"TAMPERED: {len(self.breaks)} break(s) in {self.rows:,} rows of {self.chains} "
            f"chain(s){expired}; first: {self.breaks[0]}"
        )


@dataclass(frozen=True)
class AnchorHead:
    chain: Chain
    seq: int
    row_hash: str


def _select_list() -> str:
    exprs = []
    for c in LEDGER_COLUMNS:
        if c in _TIME_COLUMNS:
            exprs.append(f"toUnixTimestamp64Milli({c})")
        elif c in _DECIMAL_COLUMNS:
            exprs.append(f"toString({c})")
        elif c == "redactions":
            exprs.append("CAST(redactions, 'Array(Tuple(String, String, UInt32))')")
        else:
            exprs.append(c)
    return ", ".join(exprs)


_SELECT = _select_list()


def _stored_chains(
    store: Store, tenant: str | None, since_month: int | None
) -> dict[Chain, tuple[int, int]]:
    """Every chain the heads table or the ledger knows: chain -> (head seq, stored rows)."""
    where = []
    if tenant is not None:
        where.append(f"tenant_id = {sql_literal(tenant)}")
    heads_where = list(where)
    log_where = list(where)
    if since_month is not None:
        heads_where.append(f"chain_month >= {since_month}")
        log_where.append(f"toYYYYMM(ts) >= {since_month}")
    found: dict[Chain, tuple[int, int]] = {}
    for t, p, m, seq in store.query_rows(
        "SELECT tenant_id, chain_partition, chain_month, max(head_seq) FROM "
        f"vigil.audit_chain_heads {_where(heads_where)} GROUP BY tenant_id, chain_partition, "
        "chain_month"
    ):
        found[Chain(str(t), int(p), int(m))] = (int(seq), 0)
    for t, p, m, seq, n in store.query_rows(
        "SELECT tenant_id, source_partition, toYYYYMM(ts), max(chain_seq), count() FROM "
        f"vigil.audit_log {_where(log_where)} GROUP BY tenant_id, source_partition, toYYYYMM(ts)"
    ):
        chain = Chain(str(t), int(p), int(m))
        found[chain] = (max(int(seq), found.get(chain, (0, 0))[0]), int(n))
    return found


def _where(conditions: Sequence[str]) -> str:
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


class _ChainWalk:
    """Checks one chain's rows, fed in (chain_seq, row_hash) order."""

    def __init__(self, chain: Chain, expirable: bool, anchored: AnchorHead | None) -> None:
        self.chain = chain
        self.expirable = expirable
        self.anchored = anchored
        self.expected = 1
        self.prev = genesis(chain)
        self.breaks: list[Break] = []
        self.expired_rows = 0
        self.bad_hash: list[tuple[Any, ...]] = []
        # who points at whom, by hash prefix: to tell a moved row from a rewritten one
        self.seq_of_prev: dict[str, int] = {}  # prev_hash -> seq of the row holding it
        self.seq_of_hash: dict[str, int] = {}  # row_hash -> seq of the row holding it
        self.mislinked: list[tuple[tuple[Any, ...], str]] = []  # (row, event_id before it)
        self.prev_event = ""
        self.group: list[tuple[Any, ...]] = []

    def _break(self, kind: str, row: Sequence[Any] | None, seq: int, detail: str) -> None:
        event_id = str(row[_I["event_id"]]) if row is not None else ""
        self.breaks.append(Break(kind, self.chain, seq, event_id, detail))

    def feed(self, row: tuple[Any, ...]) -> None:
        if self.group and row[_I["chain_seq"]] != self.group[0][_I["chain_seq"]]:
            self._settle()
        self.group.append(row)

    def _settle(self) -> None:
        group, self.group = self.group, []
        seq = int(group[0][_I["chain_seq"]])
        valid = [r for r in group if row_hash(r[:-1]) == r[-1]]
        linked = [r for r in valid if r[_I["prev_hash"]] == self.prev]
        row = (linked or valid or group)[0]
        row_ok = bool(valid)  # the chosen row hashes right whenever any row of the group does
        for other in group:
            if other is not row:
                self._break("inserted", other, seq, f"a second row claims seq {seq}")
        for r in group:
            self.seq_of_prev.setdefault(str(r[_I["prev_hash"]])[:16], seq)
            self.seq_of_hash.setdefault(str(r[-1])[:16], seq)
        if seq > self.expected:
            missing = seq - self.expected
            if self.expirable:
                self.expired_rows += missing
            else:
                span = f"seq {self.expected}" + (f"-{seq - 1}" if missing > 1 else "")
                self._break("deleted", row, seq, f"{missing} row(s) missing before it ({span})")
        elif row_ok and row[_I["prev_hash"]] != self.prev:
            self.mislinked.append((row, self.prev_event))
        if not row_ok:
            self.bad_hash.append(row)
        anchored = self.anchored
        if anchored is not None and seq == anchored.seq and row[-1] != anchored.row_hash:
            self._break("modified", row, seq, "differs from the anchored head")
        self.expected = seq + 1
        self.prev = str(row[-1])
        self.prev_event = str(row[_I["event_id"]])

    def finish(self, head_seq: int) -> None:
        if self.group:
            self._settle()
        for row in self.bad_hash:
            seq = int(row[_I["chain_seq"]])
            was = self.seq_of_prev.get(str(row[-1])[:16], 0) - 1
            moved = list(row[:-1])
            moved[_I["chain_seq"]] = was
            if was > 0 and was != seq and row_hash(moved) == row[-1]:
                self._break("reordered", row, seq, f"the row written at seq {was} now claims {seq}")
            else:
                self._break("modified", row, seq, "its content no longer matches its row_hash")
        for row, before in self.mislinked:
            seq = int(row[_I["chain_seq"]])
            target = self.seq_of_hash.get(str(row[_I["prev_hash"]])[:16])
            if target is not None and target != seq - 1:
                self._break("reordered", row, seq, f"it follows seq {target}, not seq {seq - 1}")
            else:
                self.breaks.append(
                    Break("modified", self.chain, seq - 1, before,
                          "rewritten with a new row_hash: the next row does not point at it")
                )  # fmt: skip
        end = self.expected - 1
        anchor_seq = self.anchored.seq if self.anchored is not None else 0
        wanted = max(head_seq, anchor_seq)
        if end < wanted:
            if self.expirable:
                self.expired_rows += wanted - end
            else:
                self._break(
                    "deleted", None, end + 1, f"the chain ends at seq {end} but reached {wanted}"
                )


def verify(
    store: Store,
    retention: Retention,
    *,
    tenant: str | None = None,
    since: datetime | None = None,
    anchor: Iterable[AnchorHead] = (),
    now: datetime | None = None,
    progress: Callable[[Verdict, int], None] | None = None,
) -> Verdict:
    """Recompute every chain (of ``tenant``, from the month of ``since``) and report each break.

    Reads the ledger page by page; ``progress(verdict_so_far, chains_total)`` is called after
    each page. Raises StoreError.
    """
    now = now or datetime.now(UTC)
    since_month = since.year * 100 + since.month if since else None
    anchored = {
        a.chain: a
        for a in anchor
        if (tenant is None or a.chain.tenant == tenant)
        and (since_month is None or a.chain.month >= since_month)
    }
    chains = _stored_chains(store, tenant, since_month)
    for chain in anchored:
        chains.setdefault(chain, (0, 0))
    verdict = Verdict()
    walks = {
        chain: _ChainWalk(
            chain, retention.month_expired(chain.tenant, chain.month, now), anchored.get(chain)
        )
        for chain in chains
    }
    for rows in _pages(store, {c: n for c, (_, n) in chains.items()}):
        for row in rows:
            walks[chain_of(row)].feed(row)
        verdict.rows += len(rows)
        if progress is not None:
            progress(verdict, len(chains))
    for chain in sorted(chains):
        head_seq, stored = chains[chain]
        walk = walks[chain]
        walk.finish(head_seq)
        verdict.chains += 1
        verdict.expired_chains += stored == 0 and walk.expirable
        verdict.breaks.extend(sorted(walk.breaks, key=lambda b: b.seq))
        verdict.expired_rows += walk.expired_rows
    return verdict


def _pages(store: Store, stored: Mapping[Chain, int]) -> Iterator[list[tuple[Any, ...]]]:
    """Every stored row of these chains, chain by chain in (chain_seq, row_hash) order, in
    pages of about PAGE_ROWS: small chains share a query (as many as its text allows), a long
    one is read in seq ranges."""
    order = "ORDER BY tenant_id, source_partition, toYYYYMM(ts), chain_seq, row_hash"
    group: list[Chain] = []
    size = text = 0
    for chain in [*sorted(c for c in stored if stored[c]), None]:
        if group and (
            chain is None
            or size + stored[chain] > PAGE_ROWS
            or text + _chain_clause_bytes(chain) > SQL_LIST_BYTES
        ):
            where = _chain_filter(group)
            yield store.query_rows(f"SELECT {_SELECT} FROM vigil.audit_log WHERE {where} {order}")
            group, size, text = [], 0, 0
        if chain is None:
            break
        if stored[chain] <= PAGE_ROWS:
            group.append(chain)
            size += stored[chain]
            text += _chain_clause_bytes(chain)
            continue
        low = 0
        where = _chain_filter([chain])
        while True:
            rows = store.query_rows(
                f"SELECT {_SELECT} FROM vigil.audit_log WHERE {where} AND chain_seq >= {low} "
                f"{order} LIMIT {PAGE_ROWS}"
            )
            if len(rows) < PAGE_ROWS:
                yield rows
                break
            last = int(rows[-1][_I["chain_seq"]])
            if int(rows[0][_I["chain_seq"]]) != last:
                rows = [r for r in rows if r[_I["chain_seq"]] != last]  # all of it next page
                low = last
            else:  # a whole page claiming one seq (forged repeats): take it, move on
                low = last + 1
            yield rows


# --- anchoring -------------------------------------------------------------------------


def _heads_digest(heads: Sequence[Mapping[str, Any]]) -> str:
    return hashlib.sha256(
        json.dumps(list(heads), sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def make_anchor(store: Store, now: datetime | None = None) -> dict[str, Any]:
    """Every chain's current head, with a digest over them: keep a copy outside the database."""
    heads = [
        {"tenant": str(t), "partition": int(p), "month": int(m), "seq": int(s), "row_hash": h}
        for t, p, m, s, h in store.query_rows(
            "SELECT tenant_id, chain_partition, chain_month, max(head_seq), "
            "argMaxMerge(head_hash) FROM vigil.audit_chain_heads "
            "GROUP BY tenant_id, chain_partition, chain_month ORDER BY 1, 2, 3"
        )
    ]
    created = (now or datetime.now(UTC)).isoformat(timespec="seconds")
    return {"version": 1, "created_at": created, "heads": heads, "digest": _heads_digest(heads)}


class AnchorError(ValueError):
    """An anchor file that is not one, or whose digest does not match its heads."""


def read_anchor(data: Any, where: str) -> list[AnchorHead]:
    """Validate an anchor document (the digest must match its heads). Raises AnchorError
    naming what is not as ``vigil audit anchor`` writes it."""
    if not (isinstance(data, Mapping) and isinstance(data.get("heads"), list)
            and isinstance(data.get("digest"), str)):  # fmt: skip
        raise AnchorError(f"{where}: not a Vigil anchor: expected an object with a list of "
                          "'heads' and a 'digest', as `vigil audit anchor` writes")  # fmt: skip
    heads, digest = data["heads"], data["digest"]
    parsed = []
    for i, h in enumerate(heads):
        try:
            parsed.append(
                AnchorHead(
                    Chain(str(h["tenant"]), int(h["partition"]), int(h["month"])),
                    int(h["seq"]),
                    str(h["row_hash"]),
                )
            )
        except (KeyError, TypeError, ValueError):
            raise AnchorError(f"{where}: heads[{i}] is not a chain head (tenant, partition, "
                              "month, seq and row_hash)") from None  # fmt: skip
    if _heads_digest(heads) != digest:
        raise AnchorError(f"{where}: the digest does not match the heads; the anchor was altered")
    return parsed
