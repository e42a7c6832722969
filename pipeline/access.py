"""Roles and row policies on a ClickHouse server, and what else ``vigil migrate`` applies from
vigil.yaml (retention, budgets).

The static part is ``schemas/clickhouse/server/access.sql``; each tenant in vigil.yaml adds a
role ``vigil_reader_<tenant>`` that inherits ``vigil_reader`` and sees only its own rows of
the ledger. With their passwords in its environment, ``vigil migrate`` also makes the service
users (``SERVICE_USERS``): the worker's, granted ``vigil_writer`` only, and Grafana's, granted
``vigil_auditor`` only. The embedded engine has no access control: there ``vigil sql`` is
read-only and only the owning process writes.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable, Mapping

from pipeline.config import Config
from pipeline.ledger import apply_retention
from pipeline.store import MIGRATIONS_DIR, Store, StoreError, sql_literal, statements

ACCESS_FILE = MIGRATIONS_DIR / "server" / "access.sql"
# statements that would let a role change stored rows; none may name the ledger
FORBIDDEN_GRANTS = ("ALTER", "DELETE", "UPDATE", "TRUNCATE", "DROP", "OPTIMIZE", "ALL")
# the role the worker's user is granted: what it reads and writes, and nothing more
WRITER_ROLE = "vigil_writer"
# (the environment variable with its password, user, the one role it is granted)
SERVICE_USERS = (
    ("VIGIL_CLICKHOUSE_WORKER_PASSWORD", "vigil_worker", WRITER_ROLE),
    ("VIGIL_CLICKHOUSE_GRAFANA_PASSWORD", "vigil_grafana", "vigil_auditor"),
)


def tenant_role(tenant: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tenant):
        raise StoreError(f"tenant {tenant!r}: a role name needs letters, digits, _ or - only")
    return f"vigil_reader_{tenant.replace('-', '_')}"


def access_statements(tenants: Iterable[str]) -> list[str]:
    """Every statement that sets up roles and row policies, the tenants' last."""
    out = statements(ACCESS_FILE.read_text())
    roles: dict[str, str] = {}
    for tenant in sorted(set(tenants)):
        role = tenant_role(tenant)
        if (other := roles.setdefault(role, tenant)) != tenant:
            # the second's row policy (IF NOT EXISTS) was skipped: its readers saw the first's
            raise StoreError(
                f"tenants {other!r} and {tenant!r} would share the role {role} (a role name "
                "takes - as _), and so each other's rows: rename one"
            )
        out += [
            f"CREATE ROLE IF NOT EXISTS {role}",
            f"GRANT vigil_reader TO {role}",
            f"CREATE ROW POLICY IF NOT EXISTS {role} ON vigil.audit_log FOR SELECT "
            f"USING tenant_id = {sql_literal(tenant)} TO {role}",
        ]
    return out


def granted_to(role: str) -> list[tuple[str, str]]:
    """What ``access.sql`` grants ``role`` on tables: (privilege, on) pairs, in its order."""
    pairs = []
    for statement in access_statements([]):
        grant = re.fullmatch(r"GRANT (.+?) ON (\S+) TO (\w+)", " ".join(statement.split()))
        if grant is not None and grant[3] == role:
            pairs += [(privilege.strip(), grant[2]) for privilege in grant[1].split(",")]
    return pairs


def lacking_grants(store: Store, grants: Iterable[tuple[str, str]]) -> list[str]:
    """Which of ``grants`` (``granted_to``'s pairs) the store's user holds neither itself nor
    through a role, asked with ``CHECK GRANT``: as ``INSERT ON vigil.dlq``. Raises StoreError,
    also where the server does not know CHECK GRANT."""
    lacking = []
    for privilege, on in grants:
        answer = store.query_rows(f"CHECK GRANT {privilege} ON {on}")
        if not any(row[0] for row in answer):  # (no row: not said to be held)
            lacking.append(f"{privilege} ON {on}")
    return lacking


def user_statements(user: str, role: str, password: str) -> list[str]:
    """Make ``user``, identified by ``password``, with ``role`` its default. The password is
    sent as its SHA-256, so it is in no statement, and a changed one replaces the old."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    identified = f"IDENTIFIED WITH sha256_hash BY {sql_literal(digest)}"
    return [
        f"CREATE USER IF NOT EXISTS {user} {identified}",
        f"ALTER USER {user} {identified}",
        f"GRANT {role} TO {user}",
        f"ALTER USER {user} DEFAULT ROLE {role}",
    ]


def apply_service_users(store: Store, environ: Mapping[str, str]) -> list[str]:
    """On a server, after the roles: each of ``SERVICE_USERS`` whose password ``environ``
    holds; the users made (or updated). An error names the user, never the password."""
    made = []
    for variable, user, role in SERVICE_USERS:
        password = environ.get(variable, "")
        if not password:
            continue
        digest = hashlib.sha256(password.encode()).hexdigest()
        for statement in user_statements(user, role, password):
            try:
                store.command(statement)
            except StoreError as exc:
                said = str(exc).replace(digest, "[hidden]").replace(password, "[hidden]")
                raise StoreError(
                    f"making the ClickHouse user {user} ({variable}): {said}"
                ) from None
        made.append(user)
    return made


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
