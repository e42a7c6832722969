"""Roles and row policies on a ClickHouse server, and what else ``vigil migrate`` applies from
vigil.yaml (retention, budgets).

The static part is ``schemas/clickhouse/server/access.sql``; each tenant in vigil.yaml adds a
role ``vigil_reader_<tenant>`` that inherits ``vigil_reader`` and sees only its own rows of
the ledger. The embedded engine has no access control: there ``vigil sql`` is read-only and
only the owning process writes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

from pipeline.config import Config
from pipeline.ledger import apply_retention
from pipeline.store import MIGRATIONS_DIR, Store, StoreError, sql_literal, statements

ACCESS_FILE = MIGRATIONS_DIR / "server" / "access.sql"
# statements that would let a role change stored rows; none may name the ledger
FORBIDDEN_GRANTS = ("ALTER", "DELETE", "UPDATE", "TRUNCATE", "DROP", "OPTIMIZE", "ALL")


def tenant_role(tenant: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tenant):
        raise StoreError(f"tenant {tenant!r}: a role name needs letters, digits, _ or - only")
    return f"vigil_reader_{tenant.replace('-', '_')}"


def access_statements(tenants: Iterable[str]) -> list[str]:
    """Every statement that sets up roles and row policies, the tenants' last."""
    out = statements(ACCESS_FILE.read_text())
    for tenant in sorted(set(tenants)):
        role = tenant_role(tenant)
        out += [
            f"CREATE ROLE IF NOT EXISTS {role}",
            f"GRANT vigil_reader TO {role}",
            f"CREATE ROW POLICY IF NOT EXISTS {role} ON vigil.audit_log FOR SELECT "
            f"USING tenant_id = {sql_literal(tenant)} TO {role}",
        ]
    return out


def apply_policies(store: Store, config: Config, *, server: bool) -> None:
    """After the migrations: the retention TTL, the budgets table, and on a server the roles
    and row policies."""
    apply_retention(store, config.retention)
    store.command("TRUNCATE TABLE vigil.budgets")
    rows = [(b.tenant, b.team or "", b.agent or "", b.period, b.limit_usd)
            for b in config.rules.budgets]  # fmt: skip
    if rows:
        columns = ("tenant_id", "team", "agent_id", "period", "limit_usd")
        store.insert("vigil.budgets", rows, columns, f"budgets-{uuid.uuid4()}")
    if server:
        for statement in access_statements(config.tenant_policy):
            store.command(statement)
