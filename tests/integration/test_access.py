"""The server's roles and row policies: what `vigil migrate` applies on a ClickHouse server.

There is no ClickHouse server on this machine (no Docker engine), so these tests check the
statements with the engine's own parser and check what they grant; applying them to a server
is left to the compose stack. The embedded engine refuses CREATE ROLE, which is why migrate
applies them only for http(s) DSNs."""

from __future__ import annotations

import re

import pytest

from pipeline.access import FORBIDDEN_GRANTS, access_statements, tenant_role
from pipeline.store import ClickHouseStore, StoreError, sql_literal

pytestmark = pytest.mark.integration


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


def test_a_tenant_name_that_is_not_an_identifier_is_refused() -> None:
    with pytest.raises(StoreError, match="role name"):
        tenant_role("acme; DROP TABLE x")
