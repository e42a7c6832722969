"""ClickHouse access: embedded (chDB through clickhouse-connect) or a server over HTTP.

Only one process may open an embedded data path. That process (the worker, or whoever opens
it first) is the *owner*: it serves read-only queries for the others through a small
loopback HTTP endpoint (``pipeline.owner``). ``open_store`` hides which case applies.

Every call here blocks; async callers run them in an executor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from pipeline.settings import Settings, parse_date, redact_dsn

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`|\"(?:[^\"\\]|\\.)*\"")
_INTO_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)
_FORMAT = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")  # a ClickHouse format's name
RAW_PIECE_BYTES = 1 << 20  # what ``stream_raw`` reads at a time
_OWN_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z][A-Za-z0-9]*)\b", re.IGNORECASE)
_SELECTING = ("SELECT ", "WITH ")
_READ_ONLY_STATEMENTS = (*_SELECTING, "SHOW ", "DESCRIBE ", "EXPLAIN ", "EXISTS ")
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "clickhouse"


class StoreError(RuntimeError):
    """A query or insert failed; the message is ClickHouse's (never the DSN's password)."""


def why(exc: BaseException) -> str:
    """What ``exc`` says went wrong. A connection to a ClickHouse server that failed comes
    wrapped: clickhouse-connect's error around urllib3's retries around the connection's, each
    quoting the one inside and the request's URL ("Error HTTPConnectionPool(host=...): Max
    retries exceeded with url: /?query_id=... (Caused by NewConnectionError(...))"). Where
    the message quotes the system's reason of an OSError under it ("Connection refused", "Name
    or service not known"), that reason alone is kept, and the caller names the server; any
    other message is kept whole, a timeout's too ("Read timed out. (read timeout=1)" says more
    than its socket's "timed out")."""
    text, inner = str(exc), exc.__cause__ or exc.__context__
    for _ in range(16):  # a chain is short; a cycle in it is not followed for ever
        if inner is None:
            break
        if isinstance(inner, OSError):  # with the system's reason (a timeout's says less)
            reason = inner.strerror
            return reason if reason and reason in text else text
        inner = inner.__cause__ or inner.__context__
    return text


def utf8_query(sql: str) -> str:
    """``sql``, if it encodes as UTF-8; raises StoreError naming where it does not. A value from
    the command line or a file that is not UTF-8 (``--tenant`` given bytes a terminal in another
    encoding typed) reaches a query as lone surrogates: chDB refused the call as "incompatible
    function arguments", quoting the whole query, and an HTTP client raised
    UnicodeEncodeError."""
    if sql.isascii():  # nearly every query, and far faster to tell than to encode
        return sql
    try:
        sql.encode()
    except UnicodeEncodeError as exc:
        near = "".join(map(_escaped, sql[max(0, exc.start - 40) : exc.end]))
        raise StoreError(
            f"the query is not UTF-8 text (a value given in another encoding?): character "
            f"{exc.start + 1}, the end of: {near}"
        ) from None
    return sql


def _escaped(char: str) -> str:
    """A lone surrogate as the byte it stands for (``\\xff``, from surrogateescape) or as its
    code (``\\ud800``); any other character as it is."""
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if 0xD800 <= code <= 0xDFFF else char


class Store(Protocol):
    """What the pipeline needs from ClickHouse."""

    def query_raw(self, sql: str, fmt: str = "PrettyCompact", *, readonly: bool = True) -> bytes:
        """Run ``sql`` and return its output in ClickHouse format ``fmt``. Raises StoreError."""
        ...

    def stream_raw(self, sql: str, fmt: str = "PrettyCompact") -> Generator[bytes, None, None]:
        """``query_raw`` of a read-only ``sql``, its output in pieces as they come, for a result
        too large to hold at once (an export of the ledger). Until they are read or the iterator
        is closed, nothing else may use the store from this thread. Raises StoreError, also
        after some pieces were given."""
        ...

    def query_rows(
        self, sql: str, settings: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Run a read-only query, with ClickHouse ``settings`` if given, and return its rows.
        Raises StoreError."""
        ...

    def stream_rows(self, sql: str) -> Generator[tuple[Any, ...], None, None]:
        """The rows of a read-only query as they come, for a result too large to hold at once
        as Python objects. Until they are read or the iterator is closed, nothing else may use
        the store from this thread. Raises StoreError."""
        ...

    def long_query(self) -> tuple[int, Mapping[str, Any]]:
        """How many bytes of query text the writer's own queries may send, and the settings
        ``query_rows`` needs for that (see MAX_QUERY_BYTES). Raises StoreError."""
        ...

    def command(self, sql: str) -> None:
        """Run DDL or another statement without a result. Raises StoreError."""
        ...

    def insert(
        self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str], dedup_token: str
    ) -> None:
        """Insert one block; a retry with the same ``dedup_token`` inserts nothing."""
        ...

    def close(self) -> None: ...


class ClickHouseStore:
    """A clickhouse-connect client (chDB or HTTP). Calls are serialised: chDB is one engine per
    process and the owner endpoint calls in from its own threads."""

    def __init__(self, client: Any, description: str, *, embedded: bool) -> None:
        self._client = client
        self.embedded = embedded
        self._lock = threading.RLock()
        self.description = description
        # fault injection for the reliability tests: while this file exists, inserts fail as
        # they would with the server down, and the pipeline's retry path is what runs; a file
        # naming tables (``vigil.caught_up``, one a line) fails only theirs
        outage = os.environ.get("VIGIL_FAULT_STORE_OUTAGE_FILE")
        self._outage = Path(outage) if outage else None
        self._long_query: tuple[int, Mapping[str, Any]] | None = None
        self._insert_types: dict[tuple[str, tuple[str, ...]], list[str]] = {}

    def __repr__(self) -> str:
        return f"ClickHouseStore({self.description})"

    def _failed(self, exc: ClickHouseError) -> StoreError:
        """The StoreError for ``exc``; called with the lock held, before anything else runs.

        chDB keeps what a query wrote before it failed and hands it to the next call as the
        start of that call's result: after `SELECT ... WHERE throwIf(...)` failed 300,000 rows
        in, the next `SELECT 42` answered the failed query's rows, then 42; in Native, rows of
        the failed query's columns with no error at all. The owner serves other processes'
        queries on the worker's own store, so one reader's timed-out or failing query would
        have been read as the writer's chain heads or duplicates. The next call after a failure
        here is a throwaway, run until it answers only itself."""
        if self.embedded:
            for _ in range(3):
                try:
                    if bytes(self._client.raw_query("SELECT 1", fmt="TSV")) == b"1\n":
                        break
                except ClickHouseError:
                    continue
            else:
                log.warning("%s: output left by a failed query was not cleared", self.description)
        reason = why(exc)
        if reason != str(exc):  # a connection that failed: to which server
            reason = f"{self.description}: {reason}"
        return StoreError(reason)

    def _read_only_statement(self, sql: str) -> str:
        # chDB keeps per-call settings for the rest of the session, so `readonly=1` would make
        # the writer read-only too. The engine's own parser normalises the text (one statement
        # only) without running it; what runs is exactly the statement that was checked.
        if not sql.strip():
            raise StoreError(f"no statement given: {_RUNS}")
        try:
            raw = self._client.raw_query(
                f"SELECT formatQuerySingleLine({sql_literal(sql)})", fmt="TSVRaw"
            )
        except ClickHouseError as exc:  # said of the statement, not of the check's own query
            said, _, rest = str(self._failed(exc)).partition(_CHECKED_IN)
            code = rest.rfind(". (")  # the error's name, "(SYNTAX_ERROR)", ends the message
            raise StoreError(said.rstrip(": ") + (rest[code + 1 :] if code >= 0 else "")) from None
        statement = bytes(raw).decode().strip()
        # a SELECT with two SETTINGS clauses (RemoteStore.query_rows adds one) is written back
        # as `(SELECT ... SETTINGS a) SETTINGS b`; only a SELECT begins with a parenthesis
        if not _leads(statement, _READ_ONLY_STATEMENTS):
            raise StoreError(
                f"read-only: {statement.split(' ', 1)[0]} is not allowed here; {_RUNS}"
            )
        if _INTO_OUTFILE.search(_QUOTED.sub("''", statement)):  # the embedded engine wrote it
            raise StoreError("read-only: INTO OUTFILE is not allowed here; redirect the output")
        return statement

    def query_raw(self, sql: str, fmt: str = "PrettyCompact", *, readonly: bool = True) -> bytes:
        sql = utf8_query(sql)
        _check_format(fmt)
        with self._lock:
            if readonly:
                sql = self._read_only_statement(sql)
            settings = {"readonly": 1} if readonly and not self.embedded else {}
            try:
                return bytes(self._client.raw_query(sql, fmt=fmt, settings=settings))
            except ClickHouseError as exc:
                error = self._failed(exc)
        raise (_format_named(error, sql) if readonly else error) from None

    def stream_raw(
        self, sql: str, fmt: str = "PrettyCompact", *, limits: Mapping[str, int] | None = None
    ) -> Generator[bytes, None, None]:
        """``limits``: ClickHouse settings (``max_execution_time``...) for this query alone.
        chDB answers a query given settings of its own in one piece, held in memory, so on the
        embedded store they are the session's while the stream runs."""
        # chDB answers in pieces in the formats that have no header or footer (CSV, TSV,
        # JSONEachRow, Native, RowBinary), in one piece in the others. A server is asked to
        # finish the query before it answers (wait_end_of_query, the server buffering), so that
        # an error is an error status, not text written into the rows already given
        sql = utf8_query(sql)
        _check_format(fmt)
        with self._lock:
            sql = self._read_only_statement(sql)
            settings: dict[str, Any] = {}
            session: Mapping[str, int] = {}  # set on chDB's session while the stream runs
            if self.embedded:
                session = limits or {}
            else:
                settings = {"readonly": 1, "wait_end_of_query": 1, **(limits or {})}
            try:
                self._set(session)
                if self.embedded and not _leads(sql, _SELECTING):
                    # chDB streams only a query that selects ("Streaming query is not supported
                    # for query: DESCRIBE ..." in TSV or JSONEachRow); what SHOW, DESCRIBE,
                    # EXISTS and EXPLAIN answer is small: in one piece
                    yield bytes(self._client.raw_query(sql, fmt=fmt))
                    return
                with self._client.raw_stream(sql, fmt=fmt, settings=settings) as stream:
                    while piece := stream.read(RAW_PIECE_BYTES):
                        yield bytes(piece)
                return
            except ClickHouseError as exc:  # the stream is closed: the engine takes calls again
                error = self._failed(exc)
            finally:  # also when the reader gives up
                self._set(dict.fromkeys(session, "DEFAULT"))
        raise _format_named(error, sql) from None

    def _set(self, settings: Mapping[str, object]) -> None:
        """Set the session's ``settings`` (the store's own names, never a caller's text).
        Raises StoreError."""
        for name, value in settings.items():
            try:
                self._client.command(f"SET {name} = {value}")
            except ClickHouseError as exc:
                raise self._failed(exc) from None

    def query_rows(
        self, sql: str, settings: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        sql = utf8_query(sql)
        with self._lock:
            try:
                return [tuple(r) for r in self._client.query(sql, settings=settings).result_rows]
            except ClickHouseError as exc:
                raise self._failed(exc) from None

    def stream_rows(self, sql: str) -> Generator[tuple[Any, ...], None, None]:
        # the store is held until the rows are read or the iterator is closed: chDB takes one
        # call at a time, and refuses the streaming thread's own (a StoreError, not a wait: the
        # lock is reentrant). An RLock is released only by its holder, so the iterator must be
        # read and closed on the thread that began it.
        sql = utf8_query(sql)
        with self._lock:
            try:
                with self._client.query_rows_stream(sql) as stream:
                    for row in stream:
                        yield tuple(row)
            except ClickHouseError as exc:
                raise self._failed(exc) from None

    def long_query(self) -> tuple[int, Mapping[str, Any]]:
        # asked once: a profile that caps or fixes max_query_size for this user would otherwise
        # make every duplicate check fail, and the ledger retry it forever
        if self._long_query is None:
            rows = self.query_rows(
                "SELECT value, max, readonly FROM system.settings WHERE name = 'max_query_size'"
            )
            ((value, maximum, readonly),) = rows or [(DEFAULT_QUERY_BYTES, None, 1)]
            current = int(value)
            allowed = long_query_size(current, maximum, readonly)
            if allowed < MAX_QUERY_BYTES:
                log.warning(
                    "%s lets this user's queries take %d bytes (max_query_size), not %d: the "
                    "duplicate check asks for a batch's keys in more, slower queries",
                    self.description, allowed, MAX_QUERY_BYTES,
                )  # fmt: skip
            self._long_query = (
                allowed,
                {"max_query_size": allowed} if allowed > current else {},
            )
        return self._long_query

    def command(self, sql: str) -> None:
        sql = utf8_query(sql)
        with self._lock:
            self._insert_types.clear()  # DDL (a migration) may change what a table's columns are
            try:
                self._client.command(sql)
            except ClickHouseError as exc:
                raise self._failed(exc) from None

    def _outage_covers(self, table: str) -> bool:
        """Whether the fault-injection file fails an insert into ``table``: it exists, and
        names no table or names this one."""
        if self._outage is None:
            return False
        try:
            named = self._outage.read_text().split()
        except FileNotFoundError:
            return False
        return not named or table in named

    def insert(
        self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str], dedup_token: str
    ) -> None:
        with self._lock:
            if self._outage_covers(table):
                raise StoreError(f"ClickHouse unavailable (fault injected: {self._outage} exists)")
            try:
                context = self._client.create_insert_context(
                    table,
                    list(columns),
                    column_type_names=self._types_sent(table, columns) if self.embedded else None,
                    settings={
                        "insert_deduplication_token": dedup_token,
                        # views fed by this insert (chain heads, rollups) skip a retried block too
                        "deduplicate_blocks_in_dependent_materialized_views": 1,
                        # a backfill over many months touches a partition each (the ledger's
                        # are months); at ClickHouse's default limit of 100 such an insert was
                        # refused, and retried forever. A batch's rows bound it anyway.
                        "max_partitions_per_insert_block": 0,
                    },
                )
                context.data = rows
                try:
                    self._client.data_insert(context)
                finally:
                    _release(context)
            except ClickHouseError as exc:
                raise self._failed(exc) from None

    def _types_sent(self, table: str, columns: Sequence[str]) -> list[str]:
        """The types an embedded insert into ``table`` encodes ``columns`` as: the table's own,
        but a LowCardinality column as its plain type, so the engine builds the dictionaries.
        clickhouse-connect builds them in Python, holding the GIL that the worker's validation
        needs: an insert into audit_log (22 such columns) held it 5.5 µs an event, and 2.4 µs
        with plain types (measured by a thread counting meanwhile, docs/benchmarks.md). A
        server gets what clickhouse-connect describes, since converting types in Native input
        depends on its version. Asked once per table and columns; called with the lock held."""
        key = (table, tuple(columns))
        types = self._insert_types.get(key)
        if types is None:
            database, _, name = table.rpartition(".")
            in_database = sql_literal(database) if database else "currentDatabase()"
            sql = (
                "SELECT name, type FROM system.columns "
                f"WHERE database = {in_database} AND table = {sql_literal(name)}"
            )
            declared = dict(self._client.query(sql).result_rows)
            missing = [c for c in columns if c not in declared]
            if missing:
                raise StoreError(f"{table} has no column {', '.join(missing)}")
            types = [_plain_type(declared[c]) for c in columns]
            self._insert_types[key] = types
        return types

    def close(self) -> None:
        with self._lock:
            self._client.close()


def _plain_type(type_name: str) -> str:
    """``LowCardinality(T)`` -> ``T``; any other type as it is."""
    if type_name.startswith("LowCardinality(") and type_name.endswith(")"):
        return type_name[len("LowCardinality(") : -1]
    return type_name


def _release(context: Any) -> None:
    """Drop an insert context's references to the rows it inserted.

    clickhouse-connect's InsertContext keeps a bound method of itself (``_next_block_data``), a
    reference cycle, so a finished context and every row it holds live until the garbage
    collector reaches them. The worker collects rarely (``GC_THRESHOLDS``), so with events of
    50 KB the store process grew by about 73 KB an event stored, to 1.8 GB over 20,000 events
    (docs/benchmarks.md, "Large events")."""
    context.data = None  # the rows as given, and the block data derived from them
    context._block_rows = context._block_columns = None
    context._next_block_data = None  # the bound method: no cycle left


def connect(dsn: str) -> ClickHouseStore:
    """Open the store a DSN names: ``chdb:///path`` embedded, ``http(s)://`` a server.

    Raises StoreError when it cannot be opened (for chDB: usually another process owns it).
    """
    try:
        if dsn.startswith("chdb://"):
            Path(dsn.removeprefix("chdb://")).parent.mkdir(parents=True, exist_ok=True)
        client = clickhouse_connect.get_client(dsn=dsn)
    except Exception as exc:
        # The chDB backend raises plain RuntimeErrors when the path is locked.
        raise StoreError(f"cannot open ClickHouse at {redact_dsn(dsn)}: {why(exc)}") from None
    return ClickHouseStore(client, redact_dsn(dsn), embedded=dsn.startswith("chdb://"))


def open_store(settings: Settings, *, migrated: bool = True) -> Store:
    """The store for a client process: the owner's endpoint if an owner is alive, otherwise
    the store itself (which makes this process the owner until it closes it). Raises
    StoreError saying what makes the store when there is none yet, rather than creating an
    empty one (embedded), and with ``migrated`` when it has no vigil database, rather than
    letting the first query fail on it."""
    if settings.embedded:
        from pipeline.owner import find_owner

        remote = find_owner(settings.home)
        if remote is not None:
            return remote
        data = Path(settings.clickhouse_dsn.removeprefix("chdb://"))
        if not data.exists():
            raise StoreError(
                f"no Vigil store at {data} yet: `vigil worker` (or `vigil demo`) makes it; "
                "VIGIL_HOME or VIGIL_CLICKHOUSE_DSN says where to look"
            )
    store = connect(settings.clickhouse_dsn)
    if migrated and not _has_vigil_database(store):
        store.close()
        raise StoreError(
            f"{store.description} has no vigil database: "
            + ("`vigil worker` makes it" if settings.embedded else "run `vigil migrate`")
        )
    return store


def _has_vigil_database(store: ClickHouseStore) -> bool:
    try:
        return bool(store.query_rows("EXISTS DATABASE vigil")[0][0])
    except StoreError:  # a user who may not ask: the command's own query will say what it lacks
        return True


def ensure_not_owned(settings: Settings, why: str) -> None:
    """Raise StoreError if another process (a running worker) owns the embedded store, for
    commands that must write to it themselves."""
    if settings.embedded:
        from pipeline.owner import find_owner

        owner = find_owner(settings.home)
        if owner is not None:
            raise StoreError(
                f"the store is owned by process {owner.pid} (a running worker); {why}, "
                "so stop it first"
            )


# --- migrations ------------------------------------------------------------------------


def date_literal(text: str, option: str) -> str:
    """A command line's date (``settings.parse_date``) as a ClickHouse DateTime64 in UTC."""
    at = parse_date(text, option)
    return f"toDateTime64('{at:%Y-%m-%d %H:%M:%S}', 3, 'UTC')"


# the ClickHouse formats of a listing command's --format
LIST_FORMATS = {"table": "PrettyCompactMonoBlock", "json": "JSONEachRow", "csv": "CSVWithNames"}


_RUNS = "vigil sql runs SELECT, SHOW, DESCRIBE, EXISTS and EXPLAIN"
_CHECKED_IN = " In scope SELECT formatQuerySingleLine("  # how the engine names the check's query


def _leads(statement: str, words: tuple[str, ...]) -> bool:
    """Whether a normalised statement (``formatQuerySingleLine``'s) begins with one of
    ``words``; a SELECT may begin with a parenthesis."""
    return statement.lstrip("(").upper().startswith(words)


def options_filter(since: tuple[str, str | None], **equal: str | None) -> str:
    """A listing command's options as a SQL condition: column ``since[0]`` from the date
    ``since[1]`` (``--since``), and each column of ``equal`` equal to its value; those not given
    left out."""
    where = ["1"]
    column, date = since
    if date:
        where.append(f"{column} >= {date_literal(date, '--since')}")
    where += [f"{name} = {sql_literal(value)}" for name, value in equal.items() if value]
    return " AND ".join(where)


# how many of the values a column holds ``unheld`` names, most rows first
HELD_SHOWN = 10


def unheld(store: Store, table: str, noun: str, **given: str | None) -> list[str]:
    """For each column ``given`` a value (an option's: --tenant, --reason) that is in no row of
    ``table``: a sentence saying so, with the values the column holds, most rows first. A
    mistyped tenant or reason selected nothing, and a command said only that it found nothing.
    Nothing for a column given no value, or a value some row has (the other options left
    nothing)."""
    said = []
    name = table.split()[0]  # "vigil.alerts FINAL" is vigil.alerts
    for column, value in given.items():
        if not value:
            continue
        has, values = store.query_rows(
            f"SELECT countIf({column} = {sql_literal(value)}), uniqExact({column}) FROM {table}"
        )[0]
        if int(has):
            continue
        if not int(values):
            said.append(f"no {noun} has {column} {value!r}: {name} is empty")
            continue
        held = store.query_rows(
            f"SELECT {column}, count() FROM {table} GROUP BY 1 ORDER BY 2 DESC, 1 "
            f"LIMIT {HELD_SHOWN}"
        )  # a DLQ's tenant hints come from any message's key: there may be many
        shown = ", ".join(f"{v or '(none)'} {int(n):,}" for v, n in held)
        more = f" and {int(values) - len(held):,} more" if int(values) > len(held) else ""
        said.append(f"no {noun} has {column} {value!r}; by {column}, {name} holds {shown}{more}")
    return said


def sql_literal(value: str) -> str:
    """``value`` as a ClickHouse string literal (quotes and backslashes escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ClickHouse applies max_query_size (DEFAULT_QUERY_BYTES unless set) to a query's text. The
# duplicate check raises it to MAX_QUERY_BYTES for its own queries, where the server's profile
# lets the writer's user, so that it asks for a whole batch's keys in one: each query has a
# fixed cost, and 5,000 keys in four queries took 53 ms, in one 31 ms (sink.stored_keys). Only
# the writer sets it: a user whose profile is read-only may not, and never needs to.
DEFAULT_QUERY_BYTES = 256 * 1024
MAX_QUERY_BYTES = 4 * 1024 * 1024
# The bytes a generated list of values may take in one query, far below max_query_size: keys,
# which go IN a set, take half of what ``Store.long_query`` allows; chains, which become clauses
# ORed together, go in short lists, as the engine's key analysis slows with every clause.
SQL_LIST_BYTES = 100_000


def _check_format(fmt: str) -> None:
    # the format is written after the statement that was checked: `--format "CSV; DROP TABLE
    # vigil.dlq"` ran the DROP on the embedded store, through `vigil sql`
    if not _FORMAT.fullmatch(fmt):
        raise StoreError(f"{fmt!r} is not a ClickHouse output format (such as CSV, JSON)")


def _format_named(error: StoreError, sql: str) -> StoreError:
    """``error`` with a hint when ``sql`` failed to parse for a FORMAT clause of its own: the
    engine's message quotes the clause the client wrote after it (`... FORMAT PrettyCompact`),
    not the query's."""
    own = _OWN_FORMAT.search(_QUOTED.sub("''", sql))
    if own is None or "syntax error" not in str(error).lower():
        return error
    return StoreError(
        f"{error}\n(the query has a FORMAT clause of its own, FORMAT {own[1]}: the output format "
        f"is given apart from the query, as in `vigil sql --format {own[1]} QUERY`)"
    )


def long_query_size(current: int, maximum: str | None, readonly: int) -> int:
    """The max_query_size the writer's queries may use, from ``system.settings``: its
    ``value``, its constraint's ``max`` (a string, or None) and ``readonly`` (1 where this user
    may not change it). MAX_QUERY_BYTES where allowed, never less than the current value."""
    if readonly:
        return current
    ceiling = MAX_QUERY_BYTES if maximum in (None, "") else min(MAX_QUERY_BYTES, int(maximum))
    return max(current, ceiling)


def sized_chunks(
    items: Iterable[_T], size: Callable[[_T], int], budget: int = SQL_LIST_BYTES
) -> Iterator[list[_T]]:
    """``items`` in order, in chunks whose ``size`` adds up to at most ``budget`` (an item
    larger than that alone in its chunk)."""
    chunk: list[_T] = []
    used = 0
    for item in items:
        n = size(item)
        if chunk and used + n > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(item)
        used += n
    if chunk:
        yield chunk


def statements(sql: str) -> list[str]:
    """The statements of a DDL file: ``--`` comment lines dropped, split on ``;``."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, str, str]]:
    """(version, name, sql) for every ``NNN_name.sql``, in version order."""
    found = []
    for path in sorted(directory.glob("[0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:3]), path.stem, path.read_text()))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise StoreError(f"{directory}: two migration files share a version number")
    return found


def _applied(store: Store, files: list[tuple[int, str, str]]) -> dict[int, str]:
    """version -> checksum of every migration applied to ``store``. Raises StoreError if one of
    ``files`` (``migration_files``) was edited after it was applied (its checksum changed):
    applied migrations are history, a change needs a new file."""
    applied = {
        int(v): str(c)
        for v, c in store.query_rows("SELECT version, checksum FROM vigil.schema_migrations")
    }
    for version, name, sql in files:
        if version in applied and applied[version] != _checksum(sql):
            raise StoreError(
                f"migration {name} was changed after it was applied; add a new numbered file"
            )
    return applied


def _checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


# Tables a migration set aside rather than drop (the ledger before 007 chained it, and before
# 015 partitioned it by month), for an operator to drop once `vigil audit verify` is OK on the
# new one. Where they hold nothing (every fresh install) they only puzzle whoever lists the
# tables: migrate drops them then.
SET_ASIDE_TABLES = ("vigil.audit_log_unchained", "vigil.audit_log_by_tenant_month")


def _drop_empty_set_aside(store: Store) -> None:
    """Drop each of SET_ASIDE_TABLES that exists and holds no row. One that cannot be dropped
    is left, with a warning: it holds nothing, and migrate goes on."""
    for table in SET_ASIDE_TABLES:
        database, name = table.split(".")
        exists = store.query_rows(
            "SELECT count() FROM system.tables WHERE "
            f"database = {sql_literal(database)} AND name = {sql_literal(name)}"
        )[0][0]
        if not exists or store.query_rows(f"SELECT count() FROM {table}")[0][0]:
            continue
        try:
            store.command(f"DROP TABLE {table}")
        except StoreError as exc:
            log.warning("the empty %s was left: %s", table, exc)
            continue
        log.info("dropped the empty %s, set aside by a migration", table)


def migrate(
    store: Store,
    directory: Path = MIGRATIONS_DIR,
    starting: Callable[[str], None] | None = None,
) -> list[str]:
    """Apply every numbered DDL file not applied yet; return the names applied now. Then drop
    the tables migrations set aside that hold nothing (``SET_ASIDE_TABLES``).
    ``starting(name)`` is called as each begins: one may take long (015 copies the ledger).

    Idempotent. Raises StoreError if an applied file was edited afterwards.
    """
    store.command("CREATE DATABASE IF NOT EXISTS vigil")
    store.command(
        "CREATE TABLE IF NOT EXISTS vigil.schema_migrations (version UInt32, name String, "
        "checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = MergeTree ORDER BY version"
    )
    files = migration_files(directory)
    applied = _applied(store, files)
    done = []
    for version, name, sql in files:
        if version in applied:
            continue
        if starting is not None:
            starting(name)
        for statement in statements(sql):
            store.command(statement)
        checksum = _checksum(sql)
        store.insert(
            "vigil.schema_migrations",
            [(version, name, checksum)],
            ("version", "name", "checksum"),
            dedup_token=f"migration-{version}-{checksum}",
        )
        log.info("applied migration %s", name)
        done.append(name)
    _drop_empty_set_aside(store)
    return done


def pending_migrations(store: Store, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """The migrations not applied to ``store`` yet, by name, in order; read-only. Raises
    StoreError as ``migrate`` does for an applied file edited since."""
    found = store.query_rows(
        "SELECT count() FROM system.tables WHERE database = 'vigil' AND name = 'schema_migrations'"
    )
    files = migration_files(directory)
    applied = _applied(store, files) if found[0][0] else {}
    return [name for version, name, _ in files if version not in applied]


def require_migrated(store: ClickHouseStore, directory: Path = MIGRATIONS_DIR) -> None:
    """Check, changing nothing, that every migration is applied: what a worker does on a
    ClickHouse server, where it runs as ``vigil_writer`` and may not change the schema
    (ClickHouse asks for the CREATE grant even of ``CREATE ... IF NOT EXISTS``). Raises
    StoreError naming what is missing and the command that applies it."""
    pending = pending_migrations(store, directory)
    if pending:
        raise StoreError(
            f"{store.description}: {len(pending)} migration(s) not applied ({', '.join(pending)});"
            " run `vigil migrate` with the administrative user first"
        )
