"""The server's roles and row policies: what `vigil migrate` applies on a ClickHouse server.

There is no ClickHouse server on this machine (no Docker engine), so these tests check the
statements with the engine's own parser and check what they grant; applying them to a server
is left to the compose stack. The embedded engine refuses CREATE ROLE, which is why migrate
applies them only for http(s) DSNs. What the worker does on a server (no DDL, and only what
``vigil_writer`` is granted) is checked by running the store role's code against the embedded
engine taken for a server."""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.access import (
    FORBIDDEN_GRANTS,
    SERVICE_USERS,
    access_statements,
    apply_service_users,
    granted_to,
    tenant_role,
    user_statements,
)
from pipeline.alerting import ALERT_TABLE, CAUGHT_UP_TABLE, replay_ledger, unraised
from pipeline.codec import Registry
from pipeline.config import load_config
from pipeline.events import Cost, Enrichment, Event
from pipeline.lag import LAG_TABLE
from pipeline.rows import Origin
from pipeline.settings import Settings
from pipeline.sink import DlqSink, LedgerSink, Message
from pipeline.store import (
    ClickHouseStore,
    StoreError,
    connect,
    migrate,
    migration_files,
    sql_literal,
)
from pipeline.worker import prepare_store
from tests.integration.conftest import RecordingStore, clean_messages, migrate_before

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def test_every_statement_parses_and_no_role_may_change_the_ledger(store: ClickHouseStore) -> None:
    statements = access_statements(["acme", "globex", "north-wind"])
    for statement in statements:
        normalised = store.query_rows(f"SELECT formatQuerySingleLine({sql_literal(statement)})")
        assert normalised[0][0]  # ClickHouse's parser accepts it
    grants = [s for s in statements if s.startswith("GRANT ") and " ON " in s]
    assert grants
    for grant in grants:
        privileges = {p.strip() for p in re.match(r"GRANT (.*) ON ", grant)[1].split(",")}  # type: ignore[index]
        assert privileges <= {"SELECT", "INSERT"}, grant
        assert not privileges & set(FORBIDDEN_GRANTS)
    writer = {s for s in grants if s.endswith("TO vigil_writer")}
    assert any("vigil.audit_log" in s and "INSERT" in s for s in writer)
    policies = [s for s in statements if s.startswith("CREATE ROW POLICY")]
    assert "USING tenant_id = 'north-wind' TO vigil_reader_north_wind" in " ".join(policies)
    assert len([p for p in policies if "USING tenant_id" in p]) == 3


def test_the_embedded_engine_has_no_roles_so_migrate_skips_them(store: ClickHouseStore) -> None:
    with pytest.raises(StoreError):
        store.command("CREATE ROLE IF NOT EXISTS vigil_writer")


def test_the_service_users_get_one_role_each_and_no_statement_holds_a_password(
    store: ClickHouseStore,
) -> None:
    """What `vigil migrate` sends to make the worker's and Grafana's users: parsed by the
    engine, the password only as its SHA-256, each user granted its one role, the default."""
    password = "correct horse battery staple"
    digest = hashlib.sha256(password.encode()).hexdigest()
    for _variable, user, role in SERVICE_USERS:
        statements = user_statements(user, role, password)
        for statement in statements:
            assert store.query_rows(f"SELECT formatQuerySingleLine({sql_literal(statement)})")[0][0]
            assert password not in statement
        assert sum(digest in s for s in statements) == 2  # made, or its password changed
        assert statements[2:] == [
            f"GRANT {role} TO {user}",
            f"ALTER USER {user} DEFAULT ROLE {role}",
        ]
    assert dict((u, r) for _v, u, r in SERVICE_USERS) == {"vigil_worker": "vigil_writer",
                                                          "vigil_grafana": "vigil_auditor"}  # fmt: skip


def test_migrate_makes_the_users_whose_password_it_has_and_names_one_it_cannot(
    store: ClickHouseStore,
) -> None:
    """Only the users whose password is in the environment are made. The embedded engine
    refuses to make users, as a server refuses an administrator without the grant: the error
    names the user and its variable, not the password."""
    recorder = RecordingStore(store)
    recorder.command = recorder.commands.append  # type: ignore[method-assign]  # sent, not run
    made = apply_service_users(recorder, {"VIGIL_CLICKHOUSE_GRAFANA_PASSWORD": "pw-1"})  # type: ignore[arg-type]
    assert made == ["vigil_grafana"]
    assert recorder.commands == user_statements("vigil_grafana", "vigil_auditor", "pw-1")
    assert apply_service_users(recorder, {}) == []  # type: ignore[arg-type]

    with pytest.raises(StoreError) as refused:
        apply_service_users(store, {"VIGIL_CLICKHOUSE_WORKER_PASSWORD": "pw-2"})
    said = str(refused.value)
    assert "vigil_worker" in said and "VIGIL_CLICKHOUSE_WORKER_PASSWORD" in said
    assert "pw-2" not in said and hashlib.sha256(b"pw-2").hexdigest() not in said


def test_a_tenant_name_that_is_not_an_identifier_is_refused() -> None:
    with pytest.raises(StoreError, match="role name"):
        tenant_role("acme; DROP TABLE x")
    # one role for two tenants had the row policy of the first, and its readers the first's rows
    with pytest.raises(StoreError) as shared:
        access_statements(["globex", "north_wind", "north-wind"])
    assert str(shared.value) == (
        "tenants 'north-wind' and 'north_wind' would share the role vigil_reader_north_wind (a "
        "role name takes - as _), and so each other's rows: rename one"
    )


def _as_server(store: ClickHouseStore) -> RecordingStore:
    """The real engine, taken by the worker for a ClickHouse server (``embedded`` false), with
    what is asked of it recorded."""
    recorder = RecordingStore(store)
    recorder.embedded = False
    return recorder


def test_a_worker_on_a_server_changes_no_schema_and_refuses_to_start_unmigrated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a server the worker runs as vigil_writer, which may not run DDL (ClickHouse asks for
    the CREATE grant even of CREATE ... IF NOT EXISTS): it only checks the migrations."""
    config = load_config(ROOT / "vigil.yaml", {})
    store = connect(f"chdb://{tmp_path / 'ch'}")
    try:
        server = _as_server(store)
        with pytest.raises(StoreError, match=r"migration\(s\) not applied .*vigil migrate"):
            prepare_store(server, config)  # type: ignore[arg-type]
        last = migration_files()[-1][1]
        migrate_before(store, last, tmp_path)  # an older release's schema
        with pytest.raises(StoreError, match=rf"1 migration\(s\) not applied \({last}\)"):
            prepare_store(server, config)  # type: ignore[arg-type]
        migrate(store)
        prepare_store(server, config)  # type: ignore[arg-type]
        assert server.commands == [] and server.inserted == []
        assert any("vigil.schema_migrations" in q for q in server.queries)
        # and asks whether its user holds each grant of vigil_writer (all, here: nothing said)
        asked = [q for q in server.queries if q.startswith("CHECK GRANT ")]
        assert asked == [f"CHECK GRANT {p} ON {on}" for p, on in granted_to("vigil_writer")]
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []

        embedded = RecordingStore(store)  # the embedded store is the worker's own to migrate
        prepare_store(embedded, config)  # type: ignore[arg-type]
        assert any(c.startswith("CREATE TABLE IF NOT EXISTS") for c in embedded.commands)
    finally:
        store.close()


def _filled_by_views(store: ClickHouseStore, tables: set[str]) -> set[str]:
    """The tables that materialized views insert into when ``tables`` get rows."""
    filled = set()
    for table in tables:
        database, name = table.split(".")
        for databases, views in store.query_rows(
            "SELECT dependencies_database, dependencies_table FROM system.tables "
            f"WHERE database = {sql_literal(database)} AND name = {sql_literal(name)}"
        ):
            for view_database, view in zip(databases, views, strict=True):
                ddl = store.query_rows(
                    "SELECT create_table_query FROM system.tables WHERE "
                    f"database = {sql_literal(view_database)} AND name = {sql_literal(view)}"
                )[0][0]
                filled.add(re.search(r" TO (\S+) ", ddl)[1])  # type: ignore[index]
    return filled


def test_the_writer_role_is_granted_what_the_worker_reads_and_writes(
    store: ClickHouseStore,
) -> None:
    """The store role's work on a server, run against the real engine: every table it reads
    needs SELECT for vigil_writer, every table it (or a view it feeds) writes needs INSERT."""
    config = load_config(ROOT / "vigil.yaml", {})
    registry = Registry.load()
    server = _as_server(store)
    prepare_store(server, config)  # type: ignore[arg-type]
    ledger = LedgerSink(server, registry)  # type: ignore[arg-type]
    assert ledger.write(clean_messages(registry, range(3), ts=NOW)).inserted == 3
    assert ledger.write(clean_messages(registry, range(3), ts=NOW)).duplicates == 3
    letter = Message(Origin("vigil.events.dlq", 0, 7), None, b"not a dead letter")
    assert DlqSink(server, registry).write([letter]).inserted == 1  # type: ignore[arg-type]
    # as the worker rebuilds it: ended told of the latest caught-up time stored
    group = Settings.from_env({}).consumer_group
    replay = replay_ledger(server, config.rules, NOW, caught_up=group)  # type: ignore[arg-type]
    budget = config.rules.budgets[0]  # its limit spent: are its levels' alerts stored?
    replay.evaluator.observe(Event(event_id="x", kind="cost", ts=NOW, tenant_id=budget.tenant,
                            agent_id=budget.agent or "bot", body=Cost(budget.limit_usd),
                            enrichment=Enrichment("non_token", f"{budget.limit_usd:.2f}",
                                                  team=budget.team)))  # fmt: skip
    assert unraised(server, replay, NOW)  # type: ignore[arg-type]

    # beside its sinks' inserts, the worker writes alerts, consumer lag and caught-up times
    written = {*server.inserted, ALERT_TABLE, LAG_TABLE, CAUGHT_UP_TABLE}
    written |= _filled_by_views(store, written)
    read = {t for q in server.queries for t in re.findall(r"\bFROM (vigil\.\w+)", q)}
    assert {"vigil.audit_log", "vigil.dlq", "vigil.rollups_1m"} <= written
    assert {"vigil.audit_log", "vigil.dlq", "vigil.schema_migrations", ALERT_TABLE} <= read
    assert CAUGHT_UP_TABLE in read  # the latest time the pipeline was found caught up
    granted: dict[str, set[str]] = {}
    for privilege, on in granted_to("vigil_writer"):
        granted.setdefault(on, set()).add(privilege)
    assert [t for t in sorted(written) if "INSERT" not in granted.get(t, set())] == []
    assert [t for t in sorted(read) if "SELECT" not in granted.get(t, set())] == []
    assert server.commands == []
