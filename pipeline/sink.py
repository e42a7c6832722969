"""Sinks: batches of Kafka messages -> one idempotent ClickHouse insert.

A batch is written exactly once however often it is retried or re-read after a crash:
- a retried insert carries the same ``insert_deduplication_token`` (built from the
  topic/partition/offset ranges), so ClickHouse drops the repeat;
- a batch re-read after a crash may be cut differently, and the clean topic itself may hold
  a repeat written before a crash, so rows whose key is already stored are dropped before the
  insert. The ledger's key is (``tenant_id``, ``event_id``): ids are the producers', so one
  tenant's id never hides another tenant's event. The DLQ's key is ``dlq_id``, looked up among
  letters from the same origin (``DlqSink``).

The ledger looks an event's key up only among stored events whose ``ts`` is within the dedup
window (``DEDUP_WINDOW``) of its own. Asked of the whole history, the question grew with it (about
10 ms a batch per million rows stored; docs/benchmarks.md); within the window it costs what the
window holds. Every repeat carries the event's ``ts`` (a producer's retry, a re-read, a replay of
the clean topic, ``vigil dlq replay``), so it is found. Only the same id sent again with a ``ts``
further away than the window, which no part of Vigil does, is stored a second time.

The caller advances offsets only after ``write`` returns. Blocking; raises StoreError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.codec import DEAD_LETTER_SCHEMA, Registry
from pipeline.dlq import dead_letter, scrubbed
from pipeline.events import Event, InvalidEvent
from pipeline.handoff import HandOff
from pipeline.ledger import LEDGER_COLUMNS, Chain, chain_heads, chain_of, epoch_ms, link
from pipeline.redact import DEFAULT_POLICY, Policy
from pipeline.rows import DLQ_COLUMNS, Origin, audit_row, dlq_row, stored_ms
from pipeline.store import Store, sql_literal

log = logging.getLogger(__name__)

# how far apart in ``ts`` two events with one (tenant, event_id) may be for the second to be
# found a duplicate (VIGIL_LEDGER_DEDUP_WINDOW_SECONDS)
DEDUP_WINDOW = timedelta(minutes=10)
# a batch's times become at most this many ranges of ``ts`` to look in (ClickHouse's key
# analysis slows with many ORs; joining the closest ranges only widens what is read)
MAX_TS_RANGES = 32
# chains whose ends the ledger remembers between batches (``ChainEnds``); past this many it
# forgets them all and reads them again: a few hundred bytes each
MAX_REMEMBERED_CHAINS = 100_000
# how long after its last insert the ledger still trusts the chain ends it remembers: a worker
# that wrote nothing for longer than its Kafka session timeout may have been frozen while its
# group gave its partitions to another (``ChainEnds``)
REMEMBER_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Message:
    origin: Origin
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class WriteResult:
    inserted: int
    duplicates: int
    rejected: list[tuple[Message, InvalidEvent]]
    stored: list[Event] = field(default_factory=list)  # the ledger's newly stored events
    ingested_at: datetime | None = None  # the ledger's: when they were, as stored (to the ms)


def _offset_spans(places: Iterable[tuple[str, int, int]]) -> list[tuple[str, int, int, int]]:
    """(topic, partition, lowest offset, highest offset) of (topic, partition, offset) places,
    one for each topic and partition, sorted."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for topic, partition, offset in places:
        low, high = spans.get((topic, partition), (offset, offset))
        spans[(topic, partition)] = (min(low, offset), max(high, offset))
    return sorted(
        (topic, partition, low, high) for (topic, partition), (low, high) in spans.items()
    )


def dedup_token(messages: Sequence[Message]) -> str:
    """``topic:partition:first-last`` for every partition in the batch, sorted."""
    places = ((m.origin.topic, m.origin.partition, m.origin.offset) for m in messages)
    return ",".join(f"{t}:{p}:{lo}-{hi}" for t, p, lo, hi in _offset_spans(places))


def stored_keys(
    store: Store, table: str, column: str, keys: Sequence[str], where: str = ""
) -> set[str]:
    """Which of ``keys`` are already stored (among rows matching ``where``, a SQL condition, if
    given), as ``stored_in_scopes`` asks."""
    return {
        key
        for _, key in stored_in_scopes(store, table, column, None, {("", k) for k in keys}, where)
    }


Key = tuple[str, str]  # (scope, key): the ledger's (tenant_id, event_id); the DLQ's ("", dlq_id)


def stored_in_scopes(
    store: Store,
    table: str,
    key_column: str,
    scope_column: str | None,
    keys: set[Key],
    where: str = "",
    scope_where: Mapping[str, str] | None = None,
) -> set[Key]:
    """Which of ``keys`` are already stored, each looked up within its scope (and among rows
    matching ``where`` and the scope's own condition in ``scope_where``, if given).

    One query asks for every scope's keys: the scopes' conditions are ORed, the keys of all go
    in one set, and a (scope, key) found is kept only if it was asked. A query has a fixed cost
    (about 10 ms embedded), which a query per scope paid once per tenant of a batch
    (docs/benchmarks.md). Only keys and conditions too long for one query are asked in more.

    The keys travel as one hex string that the query splits and decodes: ClickHouse parses a
    literal IN list at about 5 µs a key, which cost as much as the lookup itself (1,000 keys
    against 600,000 rows: 11.6 ms as a list, 8.0 ms this way). Hex needs no escaping and no
    separator that a key could contain."""
    found: set[Key] = set()
    # hex doubles a key's bytes; a count alone did not bound a query: 1,000 ids of 256 non-ASCII
    # characters made 770 KB, which ClickHouse refused (at its default max_query_size), and the
    # ledger retried it forever. Half of what a query may take leaves room for ``where``.
    query_bytes, settings = store.long_query()
    clauses = {
        scope: " AND ".join(
            f"({c})"
            for c in (
                scope_column and f"{scope_column} = {sql_literal(scope)}",
                (scope_where or {}).get(scope, ""),
            )
            if c
        )
        for scope in {scope for scope, _ in keys}
    }
    scope_sql = scope_column or "''"  # without a scope column, every key's scope is ''
    for chunk in _scoped_chunks(sorted(keys), clauses, query_bytes // 2):
        scoped = {clauses[scope] for scope, _ in chunk}
        conditions = [f"({where})"] if where else []
        if "" not in scoped:  # a scope without a condition of its own looks everywhere
            conditions.append("(" + " OR ".join(sorted(scoped)) + ")")
        conditions.append(key_in(key_column, [key for _, key in chunk]))
        rows = store.query_rows(
            f"SELECT DISTINCT {scope_sql}, {key_column} FROM {table} "
            f"WHERE {' AND '.join(conditions)}",
            settings,
        )
        found.update(k for k in ((str(s), str(key)) for s, key in rows) if k in keys)
    return found


def key_in(column: str, keys: Iterable[str]) -> str:
    """A SQL condition: ``column`` is one of ``keys``, sent as one hex string (see
    ``stored_in_scopes``)."""
    hexed = ",".join(key.encode().hex() for key in keys)
    return f"{column} IN (SELECT unhex(arrayJoin(splitByChar(',', '{hexed}'))))"


def _scoped_chunks(
    keys: Sequence[Key], clauses: Mapping[str, str], budget: int
) -> Iterator[list[Key]]:
    """``keys`` in order, in chunks whose hexed keys and scope conditions (``clauses``, each
    counted once a chunk) take at most ``budget`` bytes (a key larger than that alone)."""
    chunk: list[Key] = []
    scopes: set[str] = set()
    used = 0
    for scope, key in keys:
        size = 2 * len(key.encode()) + 1
        clause = len(clauses[scope].encode()) + len(" OR ")
        if chunk and used + size + (0 if scope in scopes else clause) > budget:
            yield chunk
            chunk, scopes, used = [], set(), 0
        if scope not in scopes:
            scopes.add(scope)
            size += clause
        chunk.append((scope, key))
        used += size
    if chunk:
        yield chunk


def ts_ranges(times_ms: Iterable[int], window_ms: int) -> list[tuple[int, int]]:
    """Ranges ``(low, high)`` of epoch milliseconds, inclusive, that cover every time give or
    take ``window_ms``: sorted, overlapping ones merged, and the ones closest together joined
    until at most MAX_TS_RANGES are left."""
    ranges: list[list[int]] = []
    for t in sorted(set(times_ms)):
        if ranges and t - window_ms <= ranges[-1][1]:
            ranges[-1][1] = t + window_ms
        else:
            ranges.append([max(t - window_ms, 0), t + window_ms])
    by_gap = sorted(range(1, len(ranges)), key=lambda i: ranges[i][0] - ranges[i - 1][1])
    kept_gaps = set(by_gap[max(0, len(by_gap) - (MAX_TS_RANGES - 1)) :])  # the widest
    joined: list[tuple[int, int]] = []
    for i, (low, high) in enumerate(ranges):
        if joined and i not in kept_gaps:
            joined[-1] = (joined[-1][0], high)
        else:
            joined.append((low, high))
    return joined


def ts_condition(ranges: Sequence[tuple[int, int]]) -> str:
    """A SQL condition on ``ts`` for ``ts_ranges``' ranges."""
    return " OR ".join(
        f"ts BETWEEN fromUnixTimestamp64Milli({low}, 'UTC') "
        f"AND fromUnixTimestamp64Milli({high}, 'UTC')"
        for low, high in ranges
    )


def origin_condition(places: Iterable[tuple[str, int, int]]) -> str:
    """A SQL condition on the DLQ's origin columns for (topic, partition, offset) places: each
    topic and partition's offsets from the lowest to the highest given."""
    return " OR ".join(
        f"(origin_topic = {sql_literal(topic)} AND origin_partition = {partition} "
        f"AND origin_offset BETWEEN {low} AND {high})"
        for topic, partition, low, high in _offset_spans(places)
    )


def _write(
    store: Store,
    table: str,
    key_columns: tuple[str | None, str],
    columns: Sequence[str],
    messages: Sequence[Message],
    keyed_rows: list[tuple[Key, tuple[Any, ...]]],
    prepare: Callable[[list[tuple[Any, ...]]], list[tuple[Any, ...]]] = list,
    scope_where: Mapping[str, str] | None = None,
) -> tuple[set[Key], int]:
    """Insert the rows whose key is not stored yet, after ``prepare`` (which sees exactly the
    rows about to be inserted, in order). ``key_columns``: (scope column or None, key column);
    ``scope_where``: where to look for each scope's keys, as in ``stored_in_scopes``."""
    scope_column, key_column = key_columns
    keys = {k for k, _ in keyed_rows}
    stored = stored_in_scopes(store, table, key_column, scope_column, keys, scope_where=scope_where)
    fresh = unstored(keyed_rows, stored)
    if fresh:
        store.insert(table, prepare([row for _, row in fresh]), columns, dedup_token(messages))
    return {key for key, _ in fresh}, len(keyed_rows) - len(fresh)


def unstored(
    keyed_rows: Iterable[tuple[Key, tuple[Any, ...]]], stored: set[Key]
) -> list[tuple[Key, tuple[Any, ...]]]:
    """The keyed rows whose key is not in ``stored``, in order; a key repeated within
    ``keyed_rows`` keeps only its first row."""
    seen = set(stored)
    fresh = []
    for key, row in keyed_rows:
        if key not in seen:
            seen.add(key)
            fresh.append((key, row))
    return fresh


class _Sink:
    def __init__(
        self, store: Store, registry: Registry, clock: Callable[[], datetime] | None = None
    ) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock or (lambda: datetime.now(UTC))


class ChainEnds:
    """Where the chains end: read from what is stored, or remembered from the last insert.

    A worker holds a clean partition for a consumer generation; meanwhile nothing but its
    own inserts extends that partition's chains (``pipeline.fence``). So within one ``held``
    (the generation) a chain's end is read from storage the first time the worker writes it and
    taken from its own last insert afterwards: one query a batch fewer (19-37 ms for a batch of
    2,000 events, docs/benchmarks.md). The memory is dropped when ``held`` changes, after any
    failed write (an insert may have stored some of its months), when nothing was stored for
    ``remember_seconds`` (a worker frozen past its session timeout does not know yet that its
    generation is over: it reads the new owner's heads rather than fork the chains), and past
    MAX_REMEMBERED_CHAINS. ``held`` None remembers nothing: every batch reads its heads. The
    worker's writes begin only while the broker has lately confirmed its membership
    (``pipeline.fence``): a worker cut off from the broker would otherwise go on writing the
    batches it had fetched after another owned their chains. Used from one thread at a time."""

    def __init__(
        self,
        store: Store,
        remember_seconds: float = REMEMBER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._remember_seconds = remember_seconds
        self._clock = clock
        self._held: Hashable | None = None
        self._ends: dict[Chain, tuple[int, str]] = {}
        self._stored_at = 0.0

    def __len__(self) -> int:
        return len(self._ends)

    def heads(self, chains: Iterable[Chain], held: Hashable | None) -> dict[Chain, tuple[int, str]]:
        """The heads of ``chains`` (absent: not started) for a write while holding ``held``."""
        idle = self._clock() - self._stored_at > self._remember_seconds
        if held is None or held != self._held or idle:
            self.forget()
            self._held = held
        if held is None:
            return chain_heads(self._store, chains)
        wanted = set(chains)
        known = {c: self._ends[c] for c in wanted if c in self._ends}
        unknown = wanted - known.keys()
        return known | chain_heads(self._store, unknown) if unknown else known

    def stored(self, ends: Mapping[Chain, tuple[int, str]]) -> None:
        """Remember where an insert, now stored, left its chains."""
        if self._held is None:
            return
        if len(self._ends) + len(ends) > MAX_REMEMBERED_CHAINS:
            self._ends.clear()
        self._ends.update(ends)
        self._stored_at = self._clock()

    def forget(self) -> None:
        self._ends.clear()


class LedgerSink(_Sink):
    """Writes clean events to ``vigil.audit_log``, each row linked into its hash chain.

    Chains continue from what is stored (``ledger.chain_heads``), so a restart or a partition
    that moved from another worker never forks one; a worker that says it still holds the same
    partitions (``write``'s ``held``) continues from its own last insert (``ChainEnds``). A
    retried batch is linked the same way again: either the first attempt landed (its events are
    then found stored and skipped) or it did not (the heads are unchanged and the rows
    identical), or it landed for some partitions (their events are found stored, the rest linked
    after heads read again).

    ``handoff``: where a validator in the same process left the events it published, so that
    they need not be decoded again (``pipeline.handoff``)."""

    table = "vigil.audit_log"

    def __init__(
        self,
        store: Store,
        registry: Registry,
        clock: Callable[[], datetime] | None = None,
        dedup_window: timedelta = DEDUP_WINDOW,
        handoff: HandOff | None = None,
        remember_seconds: float = REMEMBER_SECONDS,
    ) -> None:
        super().__init__(store, registry, clock)
        self._window_ms = dedup_window // timedelta(milliseconds=1)
        self._handoff = handoff
        self.ends = ChainEnds(store, remember_seconds)

    def _event(self, value: bytes) -> Event:
        """The event that ``value`` holds. Raises InvalidEvent if it does not decode."""
        if self._handoff is not None and (event := self._handoff.take(value)) is not None:
            return event
        return self._registry.read_event(value)

    def write(self, messages: Sequence[Message], held: Hashable | None = None) -> WriteResult:
        """Insert the events of the batch: each message is an EventBatch (or, as the clean topic
        held before batches, one event), and each of its events keeps the message's origin.
        ``held``: the consumer generation in which the caller has held the batch's partitions
        without a break, if it knows; chains are then continued from its earlier writes in it.
        What does not decode, or holds an amount the ledger's columns cannot (only possible if
        something other than the validator wrote to the clean topic), is returned as rejected,
        for the DLQ: a batch's bad event alone, or the whole message if it does not decode.
        Raises StoreError, after which an insert of rows of several months may have stored some
        of them (ClickHouse writes each partition, a month, on its own): the retry stores the
        rest, under the same dedup token, which ClickHouse binds to a partition, so no month the
        first attempt did not write is dropped as a repeat."""
        now = stored_ms(self._clock())  # what the rows' ingested_at will read back as
        keyed: list[tuple[Key, tuple[Any, ...]]] = []
        rejected: list[tuple[Message, InvalidEvent]] = []
        events: dict[Key, Event] = {}
        times: dict[str, list[int]] = {}  # tenant -> the batch's times, where to look for repeats
        for message in messages:
            try:
                values = self._registry.events_in(message.value)
            except InvalidEvent as exc:
                rejected.append((message, exc))
                continue
            for i, value in enumerate(values):
                try:
                    event = self._event(value)
                    row = audit_row(event, message.origin, now)
                except InvalidEvent as exc:
                    rejected.append(_rejection(message, values, i, exc))
                    continue
                key = (event.tenant_id, event.event_id)
                keyed.append((key, row))
                events.setdefault(key, event)
                times.setdefault(event.tenant_id, []).append(epoch_ms(event.ts))

        ends: dict[Chain, tuple[int, str]] = {}

        def linked(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
            chained, batch_ends = link(rows, self.ends.heads({chain_of(r) for r in rows}, held))
            ends.update(batch_ends)
            return chained

        windows = {
            tenant: ts_condition(ts_ranges(tenant_times, self._window_ms))
            for tenant, tenant_times in times.items()
        }
        try:
            fresh, duplicates = _write(
                self._store, self.table, ("tenant_id", "event_id"), LEDGER_COLUMNS, messages,
                keyed, prepare=linked, scope_where=windows,
            )  # fmt: skip
        except BaseException:
            self.ends.forget()  # the insert may have stored some chains' rows: read them again
            raise
        self.ends.stored(ends)
        stored = [events.pop(k) for k, _ in keyed if k in fresh and k in events]
        return WriteResult(len(fresh), duplicates, rejected, stored, now)


def _rejection(
    message: Message, values: list[bytes], i: int, error: InvalidEvent
) -> tuple[Message, InvalidEvent]:
    """What the DLQ gets for ``values[i]`` of ``message``, which did not decode: the message
    itself if it is that one event, else the event alone, with its own bytes and place in the
    batch and a reason saying which it was."""
    if values[i] is message.value:
        return message, error
    where = f"event {i + 1} of {len(values)} in an EventBatch: "
    return (
        Message(replace(message.origin, index=i), message.key, values[i]),
        InvalidEvent(error.code, where + error.reason),
    )


def _storable(letter: dict[str, Any], scrub_with: Policy) -> dict[str, Any]:
    """``letter`` as ``vigil.dlq`` may keep it, or InvalidEvent naming the field its columns
    cannot hold (only a letter that Vigil did not write can have one): its insert would fail
    the whole batch on every retry. Its payload and reason are scrubbed again, with
    ``scrub_with`` (``dlq.dead_letter``): Vigil's own letters were scrubbed when made (which a
    second scrub leaves as they are), and whatever else wrote to the DLQ topic brings no PII or
    secret into storage."""
    for column in ("origin_partition", "origin_offset"):
        if letter[column] < 0:
            raise InvalidEvent("out_of_range", f"{column}: {letter[column]} must not be negative")
    payload, reason = scrubbed(letter["payload"], letter["reason"], letter["reason_code"],
                               scrub_with)  # fmt: skip
    return {**letter, "payload": payload, "reason": reason}


class DlqSink(_Sink):
    """Writes dead letters to ``vigil.dlq``.

    A letter's ``dlq_id`` is derived from its origin (``dlq.dlq_id``), so a repeat of it is
    looked for only among letters of the same origin topic, partition and range of offsets,
    which the minmax index on ``origin_offset`` makes cheap however large the DLQ grows."""

    table = "vigil.dlq"

    def __init__(
        self,
        store: Store,
        registry: Registry,
        clock: Callable[[], datetime] | None = None,
        scrub_with: Policy = DEFAULT_POLICY,
    ) -> None:
        super().__init__(store, registry, clock)
        self._scrub_with = scrub_with  # every letter is scrubbed again with it (``_storable``)

    def write(self, messages: Sequence[Message]) -> WriteResult:
        """Insert the batch. A message that is not a dead letter is stored as one about itself,
        so nothing on the DLQ topic is ever lost. Raises StoreError."""
        now = self._clock()
        keyed: list[tuple[Key, tuple[Any, ...]]] = []
        places: list[tuple[str, int, int]] = []  # the letters' origins, where to look for repeats
        for message in messages:
            try:
                letter = _storable(
                    self._registry.decode(message.value, DEAD_LETTER_SCHEMA), self._scrub_with
                )
            except InvalidEvent as exc:
                letter = dead_letter(
                    message.value, message.key, message.origin, exc, stage="dlq", received_at=now,
                    scrub_with=self._scrub_with,
                )  # fmt: skip
            keyed.append((("", letter["dlq_id"]), dlq_row(letter, now)))
            places.append(
                (letter["origin_topic"], letter["origin_partition"], letter["origin_offset"])
            )
        fresh, duplicates = _write(
            self._store, self.table, (None, "dlq_id"), DLQ_COLUMNS, messages, keyed,
            scope_where={"": origin_condition(places)},  # the DLQ's keys have one scope
        )  # fmt: skip
        return WriteResult(len(fresh), duplicates, [])
