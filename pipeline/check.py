"""``vigil check``: whether a worker or a gateway could start where the settings point, changing
nothing. Each finding is ok, warn (it would start, but look) or fail (it would not start, or
not work), with what to do about it.

It asks what the worker and the gateway ask at start, through the same functions: the policy
file, an OAUTHBEARER client's token and whom it names, Kafka (reached and signed in to as
``ensure_topics`` does), the topics (present, their partitions and copies), the principal's
ACLs (``acls.lacking``), when the certificates it presents or trusts expire and, for the
worker, ClickHouse and its migrations; and, beyond that, how long the topics the worker drains
keep messages and how large a message each topic takes, where the cluster says, and on a server
whether the worker's ClickHouse user holds each grant of ``vigil_writer``. It creates no topic,
applies no migration and writes nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka.admin import ClusterMetadata  # type: ignore[attr-defined]

from pipeline.access import SERVICE_USERS, WRITER_ROLE, granted_to, lacking_grants
from pipeline.acls import lacking, lacking_message, principal_of, topics_of
from pipeline.alerts import CATEGORICAL_FIELDS, NUMERIC_FIELDS, AlertRules
from pipeline.certs import ServedCertificate, standings
from pipeline.config import Config, load_config
from pipeline.detectors import BACKTRACK_ADVICE, CUSTOM_PATTERN_SECONDS
from pipeline.dlq import LETTER_FRAMING, MAX_KEPT_PAYLOAD, MAX_LETTER_BYTES, kept_payload
from pipeline.kafkaconn import OidcClient
from pipeline.oidc import OidcError, claims, fetch_token
from pipeline.settings import ConfigError, Settings
from pipeline.store import Store, StoreError, open_store, pending_migrations, sql_literal
from pipeline.topics import (
    FRAMING_BYTES,
    TopicError,
    cluster_metadata,
    message_bytes,
    min_in_sync,
    retention_hours,
)

log = logging.getLogger("vigil.check")

OK, WARN, FAIL = "ok", "warn", "FAIL"
# the drained topics' retention below which a store outage of a day loses events
RETENTION_WARN_HOURS = 24


@dataclass(frozen=True)
class Finding:
    """What was checked (``subject``), how it stands (OK, WARN or FAIL) and why."""

    subject: str
    status: str
    detail: str

    def __str__(self) -> str:
        return f"{self.status:<4}  {self.subject:<10}  {self.detail}"


def check(settings: Settings, role: str, timeout: float = 10.0) -> Iterator[Finding]:
    """The findings for ``role`` ("worker" or "gateway"), one subject at a time, as each is
    asked (a slow one shows which it is)."""
    config = None
    try:
        config = load_config(settings.config_path, os.environ)
    except ConfigError as exc:
        yield Finding("policy", FAIL, str(exc))
    if config is not None:
        yield _policy(settings, role, config)
    who = principal_of(settings.kafka.security)
    if settings.kafka.security.oidc is not None:
        token, subject = _token(settings.kafka.security.oidc, timeout)
        yield token
        who = who if subject is None else f"User:{subject}"
    try:
        cluster = cluster_metadata(settings, timeout)
    except TopicError as exc:
        local = (
            " (the local broker: `vigil dev kafka start`)"
            if settings.kafka_bootstrap is None
            else ""
        )
        yield Finding("kafka", FAIL, f"{exc}{local}")
    else:
        yield Finding(
            "kafka",
            OK,
            f"{settings.kafka} over {settings.kafka.security.protocol} "
            f"as {who}, {len(cluster.brokers)} broker(s)",
        )
        yield _topics(settings, role, cluster, timeout)
        if role == "worker" and (retention := _retention(settings, timeout)) is not None:
            yield retention
        said = message_bytes(settings, _sized(settings, role), timeout)
        if (sizes := _sizes(settings, said)) is not None:
            yield sizes
        yield _acls(settings, role)
    if (certificates := _certificates(settings, role, datetime.now(UTC))) is not None:
        yield certificates
    if role == "gateway" and (grpc := _grpc_key(settings)) is not None:
        yield grpc
    if role == "worker":
        yield from _clickhouse(settings, _rule_conditions(config.rules) if config else [])


def _token(client: OidcClient, timeout: float) -> tuple[Finding, str | None]:
    """Whether OAUTHBEARER's client gets a token, and the principal a cluster takes from it by
    default: its ``sub`` claim (None: not said, or refused)."""
    try:
        token, lifetime = fetch_token(client, timeout)
    except OidcError as exc:
        return Finding("token", FAIL, str(exc)), None
    subject = claims(token).get("sub")
    got = (
        f"client {client.client_id} got a token from {client.token_url}, good for {lifetime:.0f} s"
    )
    if not isinstance(subject, str) or not subject:
        return Finding("token", OK, f"{got}; it names no sub: the cluster's rules name it"), None
    return Finding("token", OK, f"{got}, for sub {subject}"), subject


def _policy(settings: Settings, role: str, config: Config) -> Finding:
    path = settings.config_path
    keyed = len(set(config.api_keys.values()))
    if role == "worker" and (slow := config.slow_patterns()):
        return Finding(
            "policy",
            WARN,
            f"{path}: {'; '.join(slow)} may backtrack for a very long time on some texts: an "
            f"event it runs past {CUSTOM_PATTERN_SECONDS:g} s on goes to the DLQ "
            f"(redaction_timeout): {BACKTRACK_ADVICE}",
        )
    if role == "gateway" and not keyed:
        return Finding(
            "policy",
            WARN,
            f"{path or 'no vigil.yaml'}: no tenant has an API key "
            "(tenants.<t>.api_keys_env): every export is refused with 401",
        )
    if role == "gateway" and config.keys_unset:
        unset = ", ".join(f"{variable} (tenants.{tenant}.api_keys_env)"
                          for tenant, variable in sorted(config.keys_unset.items()))  # fmt: skip
        return Finding(
            "policy",
            WARN,
            f"{path}: no key in {unset}: set it where the gateway runs, or those clients are "
            "refused with 401",
        )
    if path is None:
        return Finding(
            "policy",
            WARN,
            "no vigil.yaml (VIGIL_CONFIG): no budget or alert rule, "
            "the default redaction for every tenant",
        )
    tenants = len(config.raw.get("tenants") or {})
    return Finding("policy", OK, f"{path}: {tenants} tenant(s), {keyed} with gateway keys")


def _topics(settings: Settings, role: str, cluster: ClusterMetadata, timeout: float) -> Finding:
    present, missing, single, copies_of = [], [], [], {}
    for name in topics_of(settings, role):
        if name not in cluster.topics:
            missing.append(name)
            continue
        partitions = cluster.topics[name].partitions
        copies = copies_of[name] = min(len(p.replicas) for p in partitions.values())
        present.append(f"{name} ({len(partitions)}x{copies})")
        if copies == 1 and len(cluster.brokers) > 1:
            single.append(name)
    # Vigil's producers write with acks=all. A broker before Kafka 3.7 refuses every write
    # (NOT_ENOUGH_REPLICAS) to a topic wanting more copies in sync than it has, and each
    # writer tries again for ever; from 3.7 on (apache/kafka#14594) a broker wants no more in
    # sync than a partition's copies, and takes the writes (the local broker, 3.9, does)
    in_sync = min_in_sync(settings, list(copies_of), timeout)
    short = [f"{name} ({copies_of[name]} of {wanted})"
             for name, wanted in sorted(in_sync.items()) if wanted > copies_of[name]]  # fmt: skip
    if short:
        return Finding(
            "topics",
            WARN,
            f"{', '.join(short)} keep fewer copies than their min.insync.replicas: a broker "
            "before Kafka 3.7 refuses every write (acks=all) to them, for ever (3.7 and later "
            "want no more copies in sync than there are); lower it (kafka-configs --alter) or "
            "add copies",
        )
    if missing:
        return Finding(
            "topics",
            WARN,
            f"missing {', '.join(missing)}: the {role} creates them at "
            "start (its principal needs CREATE on them)",
        )
    if single:
        return Finding(
            "topics",
            WARN,
            f"{', '.join(single)} keep one copy on a cluster of "
            f"{len(cluster.brokers)} brokers: a lost broker loses their "
            "events",
        )
    return Finding("topics", OK, f"partitions x copies: {', '.join(present)}")


def _retention(settings: Settings, timeout: float) -> Finding | None:
    """How long the topics the worker drains keep messages: the longest outage of the store (or
    of the worker) the backlog survives. WARN under RETENTION_WARN_HOURS; None when the cluster
    does not say (DESCRIBE_CONFIGS is not among the worker's ACLs)."""
    hours = retention_hours(settings, settings.topics.drained, timeout)
    if not hours:
        return None
    said = ", ".join(f"{name} {'for ever' if h is None else f'{h:g} h'}"
                     for name, h in sorted(hours.items()))  # fmt: skip
    short = [h for h in hours.values() if h is not None]
    if short and min(short) < RETENTION_WARN_HOURS:
        lose = (f"{said}: a ClickHouse outage or a worker down longer than {min(short):g} h "
                "loses events (VIGIL_TOPIC_RETENTION_HOURS sets it when Vigil creates the "
                "topics; kafka-configs --alter for existing ones)")  # fmt: skip
        return Finding("retention", WARN, lose)
    return Finding("retention", OK, said)


def _sized(settings: Settings, role: str) -> list[str]:
    """The topics of ``role`` whose message sizes ``_sizes`` judges."""
    used, topics = topics_of(settings, role), settings.topics
    return [name for name in (topics.raw, topics.clean, topics.dlq) if name in used]


def _sizes(settings: Settings, said: Mapping[str, int]) -> Finding | None:
    """The largest message each topic takes (``said``: their ``max.message.bytes``) against
    what Vigil puts there: FAIL where a dead letter may not fit in the DLQ, WARN where dead
    letters keep less of their input for it (``dlq.kept_payload``) or raw takes less than an
    event may be; None when the cluster does not say (as for retention)."""
    if not said:
        return None
    topics = settings.topics
    sizes = ", ".join(f"{name} {size:,}" for name, size in sorted(said.items()))
    dlq, raw = said.get(topics.dlq), said.get(topics.raw)
    if dlq is not None and dlq < LETTER_FRAMING:
        refused = (f"max.message.bytes {sizes}: a dead letter takes up to {LETTER_FRAMING:,} "
                   f"bytes besides what it keeps of its input, and one {topics.dlq} refuses is "
                   "sent again for ever (the worker's validation held meanwhile; the gateway "
                   f"answers 503): set its max.message.bytes to at least {MAX_LETTER_BYTES:,}"
                   )  # fmt: skip
        return Finding("sizes", FAIL, refused)
    if dlq is not None and dlq < MAX_LETTER_BYTES:
        cut = (f"max.message.bytes {sizes}: {topics.dlq} takes less than a dead letter of "
               f"{MAX_LETTER_BYTES:,} bytes, so dead letters keep the first "
               f"{kept_payload(dlq):,} bytes of their input, not {MAX_KEPT_PAYLOAD:,}; set its "
               f"max.message.bytes to at least {MAX_LETTER_BYTES:,} to keep more")  # fmt: skip
        return Finding("sizes", WARN, cut)
    payload = settings.limits.max_payload_bytes
    if raw is not None and raw < payload + FRAMING_BYTES:
        smaller = (f"max.message.bytes {sizes}: {topics.raw} takes less than an event may be "
                   f"(VIGIL_MAX_PAYLOAD_BYTES, {payload:,}, and {FRAMING_BYTES:,} for its "
                   "message): the broker refuses the SDK's larger events (counted not "
                   "delivered), the gateway makes its larger spans dead letters")  # fmt: skip
        return Finding("sizes", WARN, smaller)
    return Finding("sizes", OK, f"max.message.bytes {sizes}")


def sizes_at_start(settings: Settings, role: str) -> dict[str, int]:
    """The ``max.message.bytes`` of the topics of ``role`` (``message_bytes``), read once at
    start for the caller to size what it sends by; what ``vigil check`` finds of them logged
    when it is not ok: ERROR where the DLQ would refuse a dead letter, WARNING else."""
    said = message_bytes(settings, _sized(settings, role))
    if (finding := _sizes(settings, said)) is not None:
        _say(finding)
    return said


def grants_at_start(store: Store, grants: list[tuple[str, str]] | None = None) -> None:
    """A worker on a server: what ``vigil check`` finds of its ClickHouse user's ``grants``
    (by default those of ``WRITER_ROLE``) logged when it is not ok: ERROR where one is missing,
    since the worker's writes of that table will fail, WARNING where the server cannot say."""
    _say(_grants(store, granted_to(WRITER_ROLE) if grants is None else grants))


def _say(finding: Finding) -> None:
    """Log a finding found at start that is not ok: ERROR if it failed, WARNING else."""
    if finding.status != OK:
        log.log(logging.ERROR if finding.status == FAIL else logging.WARNING, "%s", finding.detail)


def _acls(settings: Settings, role: str) -> Finding:
    missing = lacking(settings, role)
    if missing is None:
        return Finding("acls", WARN, "the cluster could not be asked what the principal may do")
    if missing:
        return Finding("acls", FAIL, lacking_message(settings, role, missing))
    return Finding(
        "acls", OK, f"{principal_of(settings.kafka.security)} may do what the {role} does"
    )


def _certificates(settings: Settings, role: str, now: datetime) -> Finding | None:
    """When the certificates presented and trusted expire: FAIL once one has (or does not
    read), WARN within ``certs.WARN_DAYS``; None when there are none."""
    found = standings(settings, role, now)
    if not found:
        return None
    how = {standing for standing, _ in found}
    status = OK if how == {"ok"} else WARN if how <= {"ok", "soon"} else FAIL
    return Finding("certs", status, "; ".join(text for _, text in found))


def _grpc_key(settings: Settings) -> Finding | None:
    """WARN where the gateway's TLS key is one its OTLP/gRPC receiver cannot read (encrypted):
    the gateway starts only with --no-grpc. None otherwise."""
    if settings.gateway.tls is None:
        return None
    from pipeline.otlp_grpc import credentials  # it imports the gateway, which imports this

    try:
        credentials(ServedCertificate(settings.gateway.tls, "VIGIL_GATEWAY_TLS_CERT_LOCATION"))
    except ConfigError as exc:
        return Finding("grpc", WARN, str(exc))
    return None


def _clickhouse(settings: Settings, rules: list[tuple[str, str]]) -> Iterator[Finding]:
    """ClickHouse and its migrations; then, where every migration is applied, ``rules`` (as
    ``_rule_conditions`` gives them) against the events they would judge."""
    data = Path(settings.clickhouse_dsn.removeprefix("chdb://"))
    if settings.embedded and not data.exists():
        yield Finding(
            "clickhouse", WARN, f"no embedded store at {data} yet: the worker makes it at start"
        )
        return
    try:
        store = open_store(settings, migrated=False)
    except StoreError as exc:
        yield Finding("clickhouse", FAIL, str(exc))
        return
    try:
        pending = pending_migrations(store)
        where = "the embedded store" if settings.embedded else "the server"
        if not pending:
            yield Finding("clickhouse", OK, f"{where}, every migration applied")
            if not settings.embedded:  # the embedded engine has no access control
                yield _grants(store, granted_to(WRITER_ROLE))
            if rules:
                yield _rules(store, rules)
        elif settings.embedded:
            yield Finding(
                "clickhouse",
                WARN,
                f"{where}: {len(pending)} migration(s) to apply; the worker applies them at start",
            )
        else:
            yield Finding(
                "clickhouse",
                FAIL,
                f"{where}: {len(pending)} migration(s) not applied "
                f"({', '.join(pending)}); run `vigil migrate` with the administrative user",
            )
    except StoreError as exc:
        yield Finding("clickhouse", FAIL, str(exc))
    finally:
        store.close()


def _grants(store: Store, grants: list[tuple[str, str]]) -> Finding:
    """Whether the store's user holds ``grants`` (those of ``WRITER_ROLE``), itself or by a
    role: a user short of one starts, then fails at its first write of that table."""
    try:
        ((user,),) = store.query_rows("SELECT currentUser()")
    except StoreError as exc:
        return Finding("grants", FAIL, str(exc))
    try:
        missing = lacking_grants(store, grants)
    except StoreError as exc:  # an older server: no CHECK GRANT
        return Finding("grants", WARN, f"{user}'s grants not checked (CHECK GRANT): {exc}")
    if missing:
        variable, worker = next((v, u) for v, u, role in SERVICE_USERS if role == WRITER_ROLE)
        return Finding(
            "grants",
            FAIL,
            f"{user} lacks {', '.join(missing)} (of the {len(grants)} grants {WRITER_ROLE} has): "
            f"run `vigil migrate` as the administrative user, then `GRANT {WRITER_ROLE} TO "
            f"{user}`, or run the worker as {worker} (migrate makes it with {variable} set)",
        )
    return Finding("grants", OK, f"{user} holds the {len(grants)} grants {WRITER_ROLE} has")


# how far back ``_rules`` looks for the events a rule would judge
RULES_LOOKBACK_DAYS = 7


def _rule_conditions(rules: AlertRules) -> list[tuple[str, str]]:
    """Each budget, drift monitor and eval rule as (how to name it, the condition on
    ``vigil.audit_log`` of the events it judges)."""

    def named(column: str, value: str | None) -> list[str]:
        return [] if value in (None, "*") else [f"{column} = {sql_literal(str(value))}"]

    out = []
    for i, budget in enumerate(rules.budgets):
        scope = " ".join(f"{k} {v}" for k, v in budget.scope.items())
        terms = named("tenant_id", budget.tenant) + named("agent_id", budget.agent)
        out.append((f"budgets[{i}] ({scope})", terms + named("team", budget.team)))
    for i, m in enumerate(rules.drift):
        own = m.metric in NUMERIC_FIELDS or m.metric in CATEGORICAL_FIELDS
        terms = ["kind = 'interaction'"] if own else ["kind = 'drift'", *named("metric", m.metric)]
        scope = "".join(f", {k} {v}" for k, v in (("agent", m.agent), ("tenant", m.tenant))
                        if v != "*")  # fmt: skip
        out.append((f"drift[{i}] ({m.metric}{scope})",
                    terms + named("agent_id", m.agent) + named("tenant_id", m.tenant)))  # fmt: skip
    for i, rule in enumerate(rules.evals):
        out.append(
            (f"evals[{i}] ({rule.metric})", ["kind = 'eval'", *named("metric", rule.metric)])
        )
    return [(name, " AND ".join(terms) or "1") for name, terms in out]


def _rules(store: Store, conditions: list[tuple[str, str]]) -> Finding:
    """Whether each alert rule has events to judge: one naming a tenant, agent, team or metric
    as no event of the last RULES_LOOKBACK_DAYS spells it (``suport-bot``) is taken, and never
    fires."""
    counts = ", ".join(f"countIf({condition})" for _, condition in conditions)
    try:
        (row,) = store.query_rows(
            f"SELECT count(), {counts} FROM vigil.audit_log "
            f"WHERE ts >= now64(3) - INTERVAL {RULES_LOOKBACK_DAYS} DAY"
        )
    except StoreError as exc:
        return Finding(
            "rules", WARN, f"the events the alert rules judge could not be counted ({exc})"
        )
    total, *judged = (int(n) for n in row)
    days = f"the last {RULES_LOOKBACK_DAYS} days"
    if not total:
        return Finding("rules", OK, f"{len(conditions)} rule(s); no event in {days} to try them on")
    idle = [name for (name, _), n in zip(conditions, judged, strict=True) if not n]
    if idle:
        return Finding(
            "rules",
            WARN,
            f"{', '.join(idle)}: no event of {days} is one of theirs; a tenant, agent, team or "
            "metric spelt otherwise than the events spell it is never judged (`vigil sql` shows "
            "how they spell it)",
        )
    return Finding("rules", OK, f"each of {len(conditions)} rule(s) had events in {days}")
