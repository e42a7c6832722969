"""The real ClickHouse engine (chDB through clickhouse-connect): migrations, read-only SQL and
serving the store to other processes."""

from __future__ import annotations

import gc
import hashlib
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import main
from pipeline.codec import Registry
from pipeline.lag import LAG_COLUMNS
from pipeline.ledger import LEDGER_COLUMNS, Chain, Retention, apply_retention, chain_heads, verify
from pipeline.owner import OwnerServer, RemoteStore, find_owner
from pipeline.sink import LedgerSink, key_in, origin_condition, stored_in_scopes
from pipeline.store import (
    MIGRATIONS_DIR,
    RAW_PIECE_BYTES,
    SET_ASIDE_TABLES,
    ClickHouseStore,
    StoreError,
    connect,
    migrate,
    sql_literal,
)
from tests.demo_store import fill
from tests.integration.conftest import RecordingStore, count, migrate_before, tenant_messages

pytestmark = pytest.mark.integration
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ClickHouseStore]:
    """Not migrated: these tests run the migrations themselves."""
    s = connect(f"chdb://{tmp_path / 'ch'}")
    yield s
    s.close()


def test_migrate_applies_each_file_once_and_records_it(store: ClickHouseStore) -> None:
    begun: list[str] = []
    first = migrate(store, starting=begun.append)
    assert first == [p.stem for p in sorted(MIGRATIONS_DIR.glob("*.sql"))] == begun
    assert migrate(store, starting=begun.append) == [] and len(begun) == len(first)
    tables = {
        r[0] for r in store.query_rows("SELECT name FROM system.tables WHERE database = 'vigil'")
    }
    assert {"audit_log", "dlq", "schema_migrations"} <= tables
    assert store.query_rows("SELECT count() FROM vigil.schema_migrations")[0][0] == len(first)


def test_vigil_migrate_says_which_migration_it_is_applying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each migration is named as it begins, before it is done: one (015) copies the whole
    ledger, and an operator should see what is taking the time."""
    monkeypatch.setenv("VIGIL_HOME", str(tmp_path / "home"))  # its embedded store
    monkeypatch.delenv("VIGIL_CLICKHOUSE_DSN", raising=False)
    assert main(["migrate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [p.stem for p in sorted(MIGRATIONS_DIR.glob("*.sql"))]
    assert lines == [f"applying {n} ..." for n in names] + [
        f"applied {len(names)} migration(s): {', '.join(names)}"
    ]


def test_an_applied_migration_that_was_edited_is_refused(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    migrate(store, migrations)
    edited = migrations / "002_dlq.sql"
    edited.write_text(edited.read_text() + "\n-- sneaky edit\n")
    with pytest.raises(StoreError, match="002_dlq was changed"):
        migrate(store, migrations)
    following = f"{len(list(MIGRATIONS_DIR.glob('*.sql'))) + 1:03d}_extra"
    (migrations / f"{following}.sql").write_text(
        "CREATE TABLE IF NOT EXISTS vigil.extra (a UInt8) ENGINE = Memory"
    )
    edited.write_text((MIGRATIONS_DIR / "002_dlq.sql").read_text())
    assert migrate(store, migrations) == [following]


def test_the_dlq_origin_index_is_built_for_letters_stored_before_it(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    """An upgrade: a DLQ written before migration 012 gets the index over its existing letters,
    and repeats of those letters are found through it."""
    migrate_before(store, "012_dlq_origin_index", tmp_path)
    # letters in the order they came: offsets grow with received_at, two partitions abreast
    dlq_rows = [
        (f"id-{p}-{o}", "raw", p, o, datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=o))
        for o in range(0, 150_000, 3)
        for p in range(2)
    ]
    columns = ("dlq_id", "origin_topic", "origin_partition", "origin_offset", "received_at")
    store.insert("vigil.dlq", dlq_rows, columns, "before-012")
    assert "012_dlq_origin_index" in migrate(store)

    where = origin_condition([("raw", 1, 2100), ("raw", 1, 2400)])
    keys = {("", f"id-1-{o}") for o in (2100, 2400)} | {("", "id-1-2101"), ("", "id-0-2100")}
    assert stored_in_scopes(store, "vigil.dlq", "dlq_id", None, keys, where) == {
        ("", "id-1-2100"),
        ("", "id-1-2400"),
    }
    chosen, total = _granules(
        store, f"SELECT dlq_id FROM vigil.dlq WHERE {where}", "idx_origin_offset"
    )
    assert total >= 12 and chosen <= 2


def _granules(store: ClickHouseStore, select: str, index: str) -> tuple[int, int]:
    """(granules chosen, granules considered) by skip index ``index`` for ``select``."""
    plan = [str(r[0]).strip() for r in store.query_rows(f"EXPLAIN indexes = 1 {select}")]
    after_index = plan[plan.index(f"Name: {index}") :]
    granules = next(line for line in after_index if line.startswith("Granules:"))
    chosen, total = map(int, granules.removeprefix("Granules: ").split("/"))
    return chosen, total


def test_the_event_id_filter_of_migration_013_lets_few_granules_through_for_a_batch(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    """An upgrade: a ledger written before migration 013 gets the finer bloom filter over its
    existing events. A batch's 1,000 ids that are not stored then pass a few of its granules,
    not most of them, and those that are stored are still all found."""
    migrate_before(store, "013_event_id_bloom", tmp_path)
    store.command(
        "INSERT INTO vigil.audit_log (tenant_id, event_id, ts) SELECT 'acme', "
        "concat('e-', toString(number)), toDateTime64('2026-11-01 00:00:00', 3, 'UTC') + "
        "toIntervalMillisecond(number) FROM numbers(400000)"
    )
    absent = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(1000)]
    stored = ["e-7", "e-123456", "e-399999"]
    select = f"SELECT event_id FROM vigil.audit_log WHERE {key_in('event_id', absent)}"
    chosen, total = _granules(store, select, "idx_event_id")
    assert total >= 48 and chosen > total // 2  # at 0.001: most granules pass

    assert "013_event_id_bloom" in migrate(store)
    chosen, total = _granules(store, select, "idx_event_id")
    assert total >= 48 and chosen <= total // 5, (chosen, total)
    keys = {("acme", key) for key in [*absent, *stored]}
    found = stored_in_scopes(store, "vigil.audit_log", "event_id", "tenant_id", keys)
    assert found == {("acme", key) for key in stored}


def _active_parts(store: ClickHouseStore) -> int:
    return int(store.query_rows(
        "SELECT count() FROM system.parts WHERE database = 'vigil' AND table = 'audit_log' "
        "AND active"
    )[0][0])  # fmt: skip


def test_chain_heads_read_the_chain_ends_projection_after_migration_014(
    store: ClickHouseStore, tmp_path: Path
) -> None:
    """An upgrade: a ledger written before migration 014 gets the projection of where its chains
    end, and the writer's question is then answered from it, with the same heads as before."""
    migrate_before(store, "014_chain_ends_projection", tmp_path)
    # four chains of acme's November, in eight parts; chain p's seq n has hash "p-n"
    for part in range(8):
        store.command(
            "INSERT INTO vigil.audit_log (tenant_id, event_id, ts, source_partition, chain_seq, "
            "row_hash) SELECT 'acme', toString(number), toDateTime64('2026-11-01 00:00:00', 3, "
            "'UTC') + toIntervalMillisecond(number), number % 4, intDiv(number, 4) + 1, "
            "concat(toString(number % 4), '-', toString(intDiv(number, 4) + 1)) "
            f"FROM numbers({part * 20_000}, 20000)"
        )
    chains = [Chain("acme", p, 202611) for p in range(4)] + [Chain("acme", 0, 202610)]
    expected = {Chain("acme", p, 202611): (40_000, f"{p}-40000") for p in range(4)}
    heads_query = RecordingStore(store)
    assert chain_heads(heads_query, chains) == expected
    assert "chain_ends" not in _read_from(store, heads_query.queries[-1])

    assert "014_chain_ends_projection" in migrate(store)
    assert int(store.query_rows(
        "SELECT count() FROM system.projection_parts WHERE table = 'audit_log' AND active"
    )[0][0]) == _active_parts(store) > 0  # fmt: skip
    assert chain_heads(heads_query, chains) == expected
    assert "chain_ends" in _read_from(store, heads_query.queries[-1])


def test_migration_015_moves_the_ledger_to_monthly_partitions_keeping_every_row(
    store: ClickHouseStore, registry: Registry, tmp_path: Path
) -> None:
    """An upgrade: the ledger partitioned by tenant and month (007-014), where a batch of many
    tenants was a part per tenant, is copied whole into one partitioned by month. Its chains go
    on where they ended, the views its inserts feed are fed, and the retention TTL is
    installed again on the new table."""
    migrate_before(store, "015_ledger_by_month", tmp_path)
    retention = Retention({"acme": 4000})
    apply_retention(store, retention)
    tenants = ["acme", *(f"t{i}" for i in range(11))]
    months = (NOW, NOW - timedelta(days=31))
    first = [(t, f"a-{t}-{i}", months[i % 2]) for i in range(4) for t in tenants]
    LedgerSink(store, registry, clock=lambda: NOW).write(tenant_messages(registry, first))
    select = f"SELECT {', '.join(LEDGER_COLUMNS)} FROM vigil.audit_log ORDER BY event_id"
    stored = store.query_rows(select)
    assert len(stored) == 48 and _active_parts(store) == 24  # a part per tenant and month

    assert "015_ledger_by_month" in migrate(store)
    assert store.query_rows(
        "SELECT partition_key FROM system.tables WHERE database = 'vigil' AND name = 'audit_log'"
    ) == [("toYYYYMM(ts)",)]
    assert store.query_rows(select) == stored
    # the old table is kept for the operator, whole; 007's, empty here, is dropped
    assert _tables(store, "audit_log%") == ["audit_log", "audit_log_by_tenant_month"]
    assert count(store, "SELECT count() FROM vigil.audit_log_by_tenant_month") == 48
    assert apply_retention(store, retention)  # the new table had no TTL
    assert not apply_retention(store, retention)

    store.command("SYSTEM STOP MERGES vigil.audit_log")
    parts = _active_parts(store)
    then = [(t, f"b-{t}-{i}", months[i % 2]) for i in range(4) for t in tenants]
    LedgerSink(store, registry, clock=lambda: NOW).write(tenant_messages(registry, then, 48))
    assert _active_parts(store) == parts + 2  # a part per month, whatever the tenants
    verdict = verify(store, retention, now=NOW)
    assert verdict.ok and (verdict.rows, verdict.chains) == (96, 24), verdict.line()
    # both views the inserts feed, before the migration and after it
    assert store.query_rows(
        "SELECT min(head), max(head), count() FROM (SELECT max(head_seq) AS head FROM "
        "vigil.audit_chain_heads GROUP BY tenant_id, chain_partition, chain_month)"
    ) == [(4, 4, 24)]
    assert store.query_rows("SELECT sum(events) FROM vigil.rollups_1m") == [(96,)]


def _tables(store: ClickHouseStore, like: str) -> list[str]:
    rows = store.query_rows(
        f"SELECT name FROM system.tables WHERE database = 'vigil' AND name LIKE {sql_literal(like)} "
        "ORDER BY name"
    )
    return [str(r[0]) for r in rows]


def test_a_fresh_install_keeps_no_empty_table_a_migration_set_aside(
    store: ClickHouseStore,
) -> None:
    """007 and 015 set the ledger before them aside instead of dropping it; on a fresh install
    those tables hold nothing, and migrate drops them."""
    assert "015_ledger_by_month" in migrate(store)
    assert SET_ASIDE_TABLES == ("vigil.audit_log_unchained", "vigil.audit_log_by_tenant_month")
    assert _tables(store, "audit_log%") == ["audit_log"]
    assert migrate(store) == []  # and again: nothing to apply, nothing to drop


def _read_from(store: ClickHouseStore, select: str) -> list[str]:
    """What the plan of ``select`` reads: the table or projection of each ReadFromMergeTree."""
    plan = [str(r[0]).strip() for r in store.query_rows(f"EXPLAIN {select}")]
    return [line.split("(", 1)[1].rstrip(")") for line in plan if "ReadFromMergeTree" in line]


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE vigil.audit_log",
        "INSERT INTO vigil.dlq (dlq_id) VALUES ('x')",
        "ALTER TABLE vigil.audit_log DELETE WHERE 1",
        "TRUNCATE TABLE vigil.audit_log",
        "SELECT 1; DROP TABLE vigil.audit_log",
        "SET readonly = 0",
        "select 1 into  outfile 'written-by-vigil-sql.txt'",  # the embedded engine wrote it
    ],
)
def test_sql_is_read_only(store: ClickHouseStore, sql: str) -> None:
    migrate(store)
    with pytest.raises(StoreError):
        store.query_raw(sql, "CSV")
    assert store.query_raw("EXISTS TABLE vigil.audit_log", "CSV") == b"1\n"
    assert not Path("written-by-vigil-sql.txt").exists()
    # a literal or a name that reads so is no clause
    assert store.query_raw("SELECT 'INTO OUTFILE' AS `into outfile`", "CSV") == b'"INTO OUTFILE"\n'
    # a SELECT's own SETTINGS, twice (the owner's client adds a clause), is still a SELECT
    assert store.query_raw("SELECT 1 SETTINGS max_threads = 1 SETTINGS max_threads = 2") == (
        store.query_raw("SELECT 1")
    )
    # and the read-only check leaves the writer able to write
    store.insert(
        "vigil.schema_migrations", [(99, "probe", "x")], ("version", "name", "checksum"), "probe"
    )


def test_a_statement_that_does_not_parse_is_said_of_itself(store: ClickHouseStore) -> None:
    """The engine named the read-only check's own query, the statement quoted in it: "Empty
    query: In scope SELECT formatQuerySingleLine('')"."""
    with pytest.raises(StoreError) as empty:
        store.query_raw("  ", "CSV")
    assert str(empty.value) == (
        "no statement given: vigil sql runs SELECT, SHOW, DESCRIBE, EXISTS and EXPLAIN"
    )
    for sql in ("SELECT 1; SELECT 2", "SELEC 1"):
        with pytest.raises(StoreError) as refused:
            store.query_raw(sql, "CSV")
        said = str(refused.value)
        assert "Syntax error" in said and said.endswith(" (SYNTAX_ERROR)"), said
        assert "formatQuerySingleLine" not in said and "In scope" not in said


def test_a_large_result_is_given_in_pieces_and_a_failure_midway_leaves_the_store_clean(
    store: ClickHouseStore,
) -> None:
    """``stream_raw`` (``vigil sql``): held whole, an export of a million rows of 525 bytes
    took 2 GB; given as it comes, 680 MB, most of it the engine's own (docs/benchmarks.md)."""
    sql = "SELECT number, repeat('x', 500) AS s FROM numbers(20000)"
    pieces = list(store.stream_raw(sql, "JSONEachRow"))
    assert len(pieces) > 1 and all(len(p) <= RAW_PIECE_BYTES for p in pieces)
    assert b"".join(pieces) == store.query_raw(sql, "JSONEachRow")
    # an error after rows were given: raised, and the next call answers only itself (after a
    # failed query_raw chDB handed what it wrote to the next call, ClickHouseStore._failed)
    given = []
    failing = ("SELECT number, throwIf(number = 15000), repeat('x', 500) FROM numbers(20000) "
               "SETTINGS max_block_size = 1000")  # fmt: skip
    with pytest.raises(StoreError, match="FUNCTION_THROW_IF_VALUE_IS_NON_ZERO"):
        for piece in store.stream_raw(failing, "JSONEachRow"):
            given.append(piece)
    assert given  # some rows came before the error
    assert store.query_raw("SELECT 42", "TSV") == b"42\n"
    # given up after one piece: the store is free again
    stream = store.stream_raw(sql, "CSV")
    assert next(stream)
    stream.close()
    assert store.query_raw("SELECT 43", "TSV") == b"43\n"
    with pytest.raises(StoreError, match="read-only"):
        next(store.stream_raw("DROP TABLE vigil.audit_log", "CSV"))
    with pytest.raises(StoreError, match="is not a ClickHouse output format"):
        next(store.stream_raw("SELECT 1", "CSV; DROP TABLE vigil.dlq"))


@pytest.fixture
def owned(store: ClickHouseStore, tmp_path: Path) -> Iterator[tuple[Path, RemoteStore]]:
    """``store`` served by its owner's endpoint from ``tmp_path / "home"``, and a client of it."""
    home = tmp_path / "home"
    owner = OwnerServer(store, home).start()
    try:
        remote = find_owner(home)
        assert remote is not None
        yield home, remote
    finally:
        owner.close()


@pytest.mark.parametrize(
    ("sql", "tsv"),
    [
        ("SHOW TABLES FROM vigil LIKE 'audit_log'", b"audit_log\n"),
        ("EXISTS TABLE vigil.audit_log", b"1\n"),
        ("DESCRIBE TABLE vigil.audit_log", b"event_id\tString\t\t\t\t\t\n"),
        ("EXPLAIN SYNTAX SELECT 1", b"SELECT 1"),
        ("(SELECT 42)", b"42\n"),
    ],
)
def test_every_read_only_statement_is_answered_in_a_streamed_format(
    sql: str, tsv: bytes, store: ClickHouseStore, owned: tuple[Path, RemoteStore]
) -> None:
    """chDB streams only a query that selects: `vigil sql --format TSV "SHOW TABLES"` (the
    formats it streams) failed with "Streaming query is not supported for query"."""
    _home, remote = owned
    migrate(store)
    for where in (store, remote):
        assert b"".join(where.stream_raw(sql, "TSV")).startswith(tsv)
        lines = b"".join(where.stream_raw(sql, "JSONEachRow")).splitlines()
        assert lines and all(line.startswith(b"{") for line in lines), lines
    assert store.query_rows("SELECT 1") == [(1,)]  # the engine takes calls after them


def test_the_output_format_cannot_carry_a_statement(
    store: ClickHouseStore,
    owned: tuple[Path, RemoteStore],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the format is written after the statement the read-only check saw: `vigil sql "SELECT 1"
    # --format "CSV; DROP TABLE vigil.dlq"` printed 1 and dropped the table
    migrate(store)
    home, remote = owned
    for where in (store, remote):
        with pytest.raises(StoreError, match="is not a ClickHouse output format"):
            where.query_raw("SELECT 1", "CSV; DROP TABLE vigil.dlq")
    monkeypatch.setenv("VIGIL_HOME", str(home))
    assert main(["sql", "SELECT 1", "--format", "CSV; DROP TABLE vigil.dlq"]) == 2
    assert "'CSV; DROP TABLE vigil.dlq' is not a ClickHouse output format" in (
        capsys.readouterr().err
    )
    assert store.query_raw("EXISTS TABLE vigil.dlq", "CSV") == b"1\n"
    assert store.query_raw("SELECT 1", "JSONEachRow") == b'{"1":1}\n'
    # the owner's endpoint: a length that is no number raised ValueError in its thread
    for length in ("ten", "-1"):
        request = urllib.request.Request(
            f"{remote.url}/query", data=b"SELECT 1", method="POST",
            headers={"Authorization": f"Bearer {remote._token}", "Content-Length": length},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 413


def test_a_format_clause_in_the_query_is_named(
    store: ClickHouseStore,
    owned: tuple[Path, RemoteStore],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the engine's syntax error quoted the clause the client wrote after the query's own
    # ("FORMAT PrettyCompact"), so the one that was wrong went unnamed
    home, remote = owned
    for where in (store, remote):
        with pytest.raises(StoreError, match=r"own, FORMAT TSV: .* `vigil sql --format TSV"):
            where.query_raw("SELECT 1 FORMAT TSV")
    monkeypatch.setenv("VIGIL_HOME", str(home))
    assert main(["sql", "select number from numbers(2) format JSONEachRow"]) == 2
    assert "`vigil sql --format JSONEachRow QUERY`" in capsys.readouterr().err
    # a literal that reads so is no clause, and an error that is not the parser's is left be
    for sql in ("SELECT 'format TSV' +", "SELECT format FROM vigil.no_such_table"):
        with pytest.raises(StoreError) as failed:
            store.query_raw(sql)
        assert "own, FORMAT" not in str(failed.value)


def test_a_query_holding_text_that_is_not_utf8_is_refused_naming_where(
    store: ClickHouseStore,
    owned: tuple[Path, RemoteStore],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # bytes that are not UTF-8 on the command line reach a query as lone surrogates: chDB
    # refused the call as "incompatible function arguments", quoting the whole query, and the
    # owner's client raised UnicodeEncodeError out of `vigil dlq list`
    home, remote = owned
    for where in (store, remote):
        with pytest.raises(StoreError) as caught:
            where.query_rows("SELECT 1 FROM vigil.dlq WHERE tenant_hint = 'a\udcff'")
        assert str(caught.value) == (
            "the query is not UTF-8 text (a value given in another encoding?): character "
            "47, the end of:  1 FROM vigil.dlq WHERE tenant_hint = 'a\\xff"
        )
    with pytest.raises(StoreError, match=r"character 1, the end of: \\ud800$"):
        store.command("\ud800")
    assert store.query_rows("SELECT 1") == [(1,)]  # the store goes on
    monkeypatch.setenv("VIGIL_HOME", str(home))  # the command asks the owner
    assert main(["dlq", "list", "--tenant", "a\udcff"]) == 2
    assert capsys.readouterr().err == (
        "vigil: error: the query is not UTF-8 text (a value given in another encoding?): "
        "character 166, the end of: M vigil.dlq WHERE 1 AND tenant_hint = 'a\\xff\n"
    )


# a query that has written 300,000 rows when it fails
FAILS_PART_WAY = "SELECT number FROM system.numbers WHERE throwIf(number = 300000) = 0"


def test_a_query_that_fails_part_way_leaves_nothing_in_the_next_answer(
    store: ClickHouseStore, owned: tuple[Path, RemoteStore]
) -> None:
    # chDB handed what a failed query had written to the next call, as the start of its result:
    # in Native, with no error, rows of the failed query's columns
    with pytest.raises(StoreError, match="throwIf"):
        store.query_rows(FAILS_PART_WAY)
    assert store.query_rows("SELECT number FROM numbers(3)") == [(0,), (1,), (2,)]
    with pytest.raises(StoreError, match="throwIf"):
        store.query_raw(FAILS_PART_WAY, "CSV")
    assert store.query_raw("SELECT 42", "TSV") == b"42\n"
    # through the owner, a reader's failed query is neither the next reader's answer nor the
    # writer's (the owner runs both on one store)
    _, remote = owned
    with pytest.raises(StoreError, match="throwIf"):
        remote.query_raw(FAILS_PART_WAY, "Native")
    assert remote.query_rows("SELECT 43") == [(43,)]
    with pytest.raises(StoreError, match="throwIf"):
        remote.query_raw(FAILS_PART_WAY, "Native")
    assert store.query_rows("SELECT number FROM numbers(2)") == [(0,), (1,)]


def test_a_stream_with_limits_gives_rows_as_found_and_leaves_the_session_as_it_was(
    store: ClickHouseStore,
) -> None:
    """The owner's limits are the embedded session's while its stream runs: given to chDB with
    the query, they made it answer in one piece, held in memory. They are set back whether the
    stream ends, fails or is given up."""
    limits = {"max_execution_time": 2, "max_result_bytes": 1 << 26}
    now = "SELECT getSetting('max_execution_time'), getSetting('max_result_bytes')"
    pieces = list(store.stream_raw("SELECT number FROM numbers(3000000)", "TSV", limits=limits))
    assert len(pieces) > 10 and b"".join(pieces).count(b"\n") == 3_000_000
    assert store.query_rows(now) == [(0, 0)]
    # rows come as the engine finds them: the first before the query fails (held whole, the
    # failure came first)
    late = "WHERE throwIf(number = 2000000) = 0 SETTINGS max_threads = 1"  # the rows in order
    failing = store.stream_raw(f"SELECT number FROM numbers(3000000) {late}", "TSV", limits=limits)
    assert next(failing).startswith(b"0\n1\n2\n")
    with pytest.raises(StoreError, match="throwIf"):
        list(failing)
    assert store.query_rows(now) == [(0, 0)]
    within = store.stream_raw(f"{now} FROM numbers(1)", "TSV", limits=limits)
    assert list(within) == [b"2\t67108864\n"]
    with pytest.raises(StoreError, match="TIMEOUT_EXCEEDED"):
        list(store.stream_raw("SELECT count() FROM system.numbers", "TSV", limits=limits))
    assert store.query_rows(now) == [(0, 0)]
    with pytest.raises(StoreError, match="TOO_MANY_ROWS_OR_BYTES"):
        list(store.stream_raw("SELECT number FROM system.numbers", "TSV", limits=limits))
    left = store.stream_raw("SELECT number FROM numbers(3000000)", "TSV", limits=limits)
    next(left)
    left.close()
    assert store.query_rows(now) == [(0, 0)]


def test_a_served_query_is_stopped_at_the_owners_limits_and_the_writer_is_not(
    store: ClickHouseStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a reader's query holds the store, and the worker's inserts behind it: one with no end
    # held them until the worker was killed
    home = tmp_path / "home"
    monkeypatch.setattr("pipeline.owner.SERVED_RESULT_BYTES", 1 << 20)
    owner = OwnerServer(store, home, query_seconds=1.5).start()
    try:
        remote = find_owner(home)
        assert remote is not None
        began = time.monotonic()
        with pytest.raises(StoreError, match=r"serves a query for 2 s \(VIGIL_SERVED_QUERY_SEC"):
            remote.query_raw("SELECT count() FROM system.numbers", "TSV")
        assert time.monotonic() - began < 60
        with pytest.raises(StoreError, match="answers at most 1,048,576 bytes a query"):
            remote.query_raw("SELECT number FROM system.numbers", "TSV")
        monkeypatch.setenv("VIGIL_HOME", str(home))
        assert main(["sql", "SELECT count() FROM system.numbers"]) == 2
        assert "raise the setting, or stop the worker" in capsys.readouterr().err
        # within the limits, as before; the writer's own queries are not limited
        assert remote.query_rows("SELECT count() FROM numbers(1000) SETTINGS max_threads = 1") == [
            (1000,)
        ]
        limited = "SELECT getSetting('max_execution_time'), getSetting('max_result_bytes')"
        assert remote.query_rows(limited) == [(2, 1 << 20)]
        assert store.query_rows(limited) == [(0, 0)]
    finally:
        owner.close()


def test_other_processes_query_through_the_owner(store: ClickHouseStore, tmp_path: Path) -> None:
    migrate(store)
    home = tmp_path / "home"
    owner = OwnerServer(store, home).start()
    try:
        assert (home / "clickhouse.owner.json").stat().st_mode & 0o077 == 0, (
            "the token file is private"
        )
        script = (
            "from pipeline.owner import find_owner; from pathlib import Path; import sys;"
            f"r = find_owner(Path({str(home)!r}));"
            "sys.stdout.write(r.query_raw('SELECT count() FROM vigil.schema_migrations', 'CSV').decode());"
            "print(r.query_rows('SELECT 1 + 1'))"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        )
        applied = str(len(list(MIGRATIONS_DIR.glob("*.sql"))))
        assert out.stdout.splitlines() == [applied, "[(2,)]"]
        remote = find_owner(home)
        assert remote is not None
        assert list(remote.stream_rows("SELECT number FROM numbers(3)")) == [(0,), (1,), (2,)]
        with pytest.raises(StoreError, match="read-only"):
            remote.query_raw("DROP TABLE vigil.dlq", "CSV")
        with pytest.raises(StoreError, match="only read-only"):
            remote.command("DROP TABLE vigil.dlq")
        with pytest.raises(StoreError, match="the owner's settings"):
            remote.query_rows("SELECT 1", {"max_query_size": 1 << 22})
        # a token past ASCII made compare_digest raise: the connection dropped, no answer
        url = f"{remote.url}/query"
        for token in ("wrong", "t\u00f6ken"):
            request = urllib.request.Request(url, data=b"SELECT 1", method="POST",
                                             headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            with pytest.raises(urllib.error.HTTPError, match="401"):
                urllib.request.urlopen(request, timeout=10)
    finally:
        owner.close()
    assert find_owner(home) is None


def test_rows_through_the_owner_are_read_a_row_at_a_time_across_its_pieces(
    owned: tuple[Path, RemoteStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's answer is read in pieces, and its rows parsed as each ends: a row split
    between pieces, inside a character of several bytes or an escaped newline, reads whole."""
    _, remote = owned
    sql = (
        "SELECT number AS n, concat('ré\n', repeat('é', number % 7)) AS s, "
        "toDecimal64(number / 8, 3) AS d FROM numbers(200)"
    )
    whole = remote.query_rows(sql)
    assert whole[9] == (9, "ré\néé", 1.125)
    monkeypatch.setattr("pipeline.owner.RAW_PIECE_BYTES", 7)
    read: list[bytes] = []
    stream_raw = RemoteStore.stream_raw

    def pieces(self: RemoteStore, sql: str, fmt: str = "PrettyCompact") -> Iterator[bytes]:
        for piece in stream_raw(self, sql, fmt):
            read.append(piece)
            yield piece

    monkeypatch.setattr(RemoteStore, "stream_raw", pieces)
    streamed = remote.stream_rows(sql)
    assert next(streamed) == (0, "ré\n", 0.0)
    # the first row's pieces, one ending inside the é
    assert read == [b'{"n":0,', b'"s":"r\xc3', b'\xa9\\n","d', b'":0}\n{"']
    assert [next(streamed), *streamed] == whole[1:]
    assert b"".join(read).count(b"\n") == 200 and all(len(piece) == 7 for piece in read[:-1])
    assert remote.query_rows(sql) == whole
    # a column's name given twice, each value in its place; a map within, a dict
    assert remote.query_rows("SELECT 1, 1, map('a', [2])") == [(1, 1, {"a": [2]})]


def test_rows_stream_as_the_query_gives_them_and_a_stream_left_lets_the_store_go(
    store: ClickHouseStore,
) -> None:
    """``stream_rows`` gives what ``query_rows`` gives, as tuples, one at a time; while it runs
    the store is held (the streaming thread's own query is refused, another thread's waits); a
    stream closed half-way frees it; a bad query is a StoreError naming what is wrong."""
    sql = "SELECT number, toString(number) FROM numbers(250000)"
    streamed = store.stream_rows(sql)
    first = next(streamed)
    assert first == (0, "0")
    assert [first, *streamed] == store.query_rows(sql)

    left = store.stream_rows(sql)
    assert next(left) == (0, "0")
    with pytest.raises(StoreError, match="streaming a query result on this thread"):
        store.query_rows("SELECT 7")  # the engine refuses; the store's lock does not hang
    answered: list[Any] = []
    other = threading.Thread(target=lambda: answered.append(store.query_rows("SELECT 7")))
    other.start()
    other.join(0.5)
    assert answered == []  # the stream holds the store
    left.close()
    other.join(10)
    assert answered == [[(7,)]]

    with pytest.raises(StoreError, match=r"no_such_table.*UNKNOWN_TABLE"):
        list(store.stream_rows("SELECT * FROM system.no_such_table"))


def test_an_insert_keeps_no_reference_to_its_rows(store: ClickHouseStore) -> None:
    """clickhouse-connect's insert context is a reference cycle; the store breaks it, so the
    rows of an insert are freed when the caller drops them, not at some later collection."""
    migrate(store)
    now = datetime.now(UTC)
    rows = [(now, "g", "t", p, 10, 20, 10) for p in range(100)]
    before = sys.getrefcount(rows)
    gc.disable()  # what is left must be left by references, not by a collection yet to come
    try:
        store.insert("vigil.consumer_lag", rows, LAG_COLUMNS, "refs-1")
        after = sys.getrefcount(rows)
    finally:
        gc.enable()
    assert after == before
    assert store.query_rows("SELECT count(), sum(lag) FROM vigil.consumer_lag") == [(100, 1000)]


def test_low_cardinality_columns_are_sent_plain_and_stored_as_given(
    store: ClickHouseStore,
) -> None:
    """The embedded engine builds LowCardinality dictionaries itself (clickhouse-connect would
    build them in Python): what is stored, read back, is exactly what was inserted, nulls,
    repeats, empty and non-ASCII values included; a column the table lacks is a clear error;
    DDL makes the store ask again."""
    store.command("CREATE DATABASE IF NOT EXISTS t")
    store.command(
        "CREATE TABLE t.lc (i UInt32, s LowCardinality(String), n LowCardinality(Nullable(String)),"
        " a Array(LowCardinality(String)), m Map(LowCardinality(String), String), p String)"
        " ENGINE = MergeTree ORDER BY i"
    )  # fmt: skip
    values = ["acme", "", "ünïcødé", "acme", "globex"]
    rows = [(i, values[i % 5], None if i % 3 else values[i % 5], [values[i % 5], "x"],
             {values[i % 5]: str(i)}, f"p{i}") for i in range(1000)]  # fmt: skip
    columns = ("i", "s", "n", "a", "m", "p")
    store.insert("t.lc", rows, columns, "lc-1")
    assert store._types_sent("t.lc", columns) == [
        "UInt32", "String", "Nullable(String)", "Array(LowCardinality(String))",
        "Map(LowCardinality(String), String)", "String",
    ]  # fmt: skip
    stored = store.query_rows("SELECT i, s, n, a, m, p, toTypeName(s), toTypeName(n) FROM t.lc "
                              "ORDER BY i")  # fmt: skip
    assert [r[:6] for r in stored] == [(*r[:3], list(r[3]), r[4], r[5]) for r in rows]
    assert stored[0][6:] == ("LowCardinality(String)", "LowCardinality(Nullable(String))")
    with pytest.raises(StoreError, match=r"t\.lc has no column q"):
        store.insert("t.lc", [(1, "q")], ("i", "q"), "lc-2")
    # the types sent are asked again after DDL: sent as the String it was, None would not be
    store.insert("t.lc", [(2000, "y")], ("i", "s"), "lc-3")
    store.command("DROP TABLE t.lc")
    store.command("CREATE TABLE t.lc (i UInt32, s LowCardinality(Nullable(String))) "
                  "ENGINE = MergeTree ORDER BY i")  # fmt: skip
    store.insert("t.lc", [(1, None), (2, "z")], ("i", "s"), "lc-4")
    assert store.query_rows("SELECT i, s FROM t.lc ORDER BY i") == [(1, None), (2, "z")]


def test_a_tenant_no_row_has_is_named_with_the_tenants_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped --tenant (or cost project's --agent) selected nothing, and cost report, audit
    trail, alerts list, backtest and redeliver said only that they found nothing, audit verify
    that 0 rows verified, cost project that 0 units were observed (``store.unheld``); a tenant
    with rows, none of which the other options select, is not named."""
    home = tmp_path / "home"
    store = connect(f"chdb://{home / 'clickhouse'}")
    migrate(store)
    # two hours up to noon: acme passes half its daily budget in them, whatever the hour now
    fill(store, events=600, now=datetime.now(UTC).replace(hour=12, minute=0))
    by_tenant = store.query_rows(
        "SELECT tenant_id, count() FROM vigil.audit_log GROUP BY 1 ORDER BY 2 DESC, 1"
    )
    alerted = store.query_rows("SELECT tenant_id, count() FROM vigil.alerts FINAL GROUP BY 1")
    store.close()
    assert len(by_tenant) == 3 and len(alerted) == 1, (by_tenant, alerted)
    events = ", ".join(f"{tenant} {int(n):,}" for tenant, n in by_tenant)
    ledger = f"no event has tenant_id 'acne'; by tenant_id, vigil.audit_log holds {events}"
    monkeypatch.setenv("VIGIL_HOME", str(home))
    assert main(["cost", "report", "--tenant", "acne"]) == 0
    assert f"vigil cost report: {ledger}\n" in capsys.readouterr().err
    assert main(["audit", "trail", "--unit", "ticket:T-1", "--tenant", "acne"]) == 1
    assert f"vigil audit trail: {ledger}\n" in capsys.readouterr().err
    assert main(["audit", "verify", "--tenant", "acne"]) == 0  # nothing to verify: "OK"
    verified = capsys.readouterr()
    assert verified.out == "OK: 0 rows in 0 chain(s) verified, no breaks\n"
    assert verified.err.endswith(f"vigil audit verify: {ledger}\n")  # after any progress line
    assert (
        main(["cost", "project", "--agent", "support-bot", "--tenant", "acne", "--units", "5"]) == 2
    )
    assert f"vigil cost project: {ledger}\n" in capsys.readouterr().err
    assert main(["cost", "project", "--agent", "supprt-bot", "--units", "5"]) == 2
    assert ("vigil cost project: no event has agent_id 'supprt-bot'; by agent_id, vigil.audit_log "
            "holds ") in capsys.readouterr().err  # fmt: skip
    assert main(["alerts", "backtest", "--since", "2000-01-01", "--tenant", "acne"]) == 0
    assert f"vigil alerts backtest: {ledger}\n" in capsys.readouterr().err
    assert main(["alerts", "list", "--tenant", "acne"]) == 0
    tenant, n = alerted[0]
    said = f"no alert has tenant_id 'acne'; by tenant_id, vigil.alerts holds {tenant} {int(n)}"
    assert f"vigil alerts list: {said}\n" in capsys.readouterr().err
    assert main(["alerts", "redeliver", "--tenant", "acne", "--dry-run"]) == 0
    assert f"vigil alerts redeliver: {said}\n" in capsys.readouterr().err
    # a tenant held, with nothing of it selected
    assert main(["audit", "trail", "--unit", "ticket:T-none", "--tenant", "acme"]) == 1
    assert main(["alerts", "list", "--tenant", "acme", "--since", "2999-01-01"]) == 0
    assert main(["cost", "report", "--tenant", "acme", "--since", "2999-01-01"]) == 0
    assert main(["audit", "verify", "--tenant", "acme", "--since", "2999-01-01"]) == 0
    err = capsys.readouterr().err
    assert "nothing stored matches" in err and "has tenant_id" not in err, err
