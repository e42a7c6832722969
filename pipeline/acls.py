"""The Kafka ACLs Vigil's principals need on a cluster that authorizes each request.

Three kinds of principal: the worker's (it reads raw, writes clean, the DLQ, rollups and
alerts, reads clean and the DLQ back, and creates its topics on first start); the gateway's
(it writes raw, and the DLQ with the spans it rejects); and a producer's (an agent's SDK or
exporter, ``vigil dlq replay``), which may write the raw topic and nothing else. With these
alone, a producer cannot put an event on clean that skipped validation and redaction, nor a
letter in the DLQ. ``vigil kafka acls`` prints them, or creates them; the worker and the
gateway ask the cluster at start whether they have them (``prepare``), so one short of an ACL
is told which, rather than failing in a different way for each topic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from pipeline.kafkaconn import KafkaSecurity
from pipeline.settings import ConfigError, Settings
from pipeline.topics import TopicError, admin_client, ensure_topics

log = logging.getLogger(__name__)

_READ, _WRITE, _CREATE = AclOperation.READ, AclOperation.WRITE, AclOperation.CREATE
# What a describe answers for a topic or group on which the client has no grant at all
_REFUSED = (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED)


class AclError(RuntimeError):
    """The cluster did not create an ACL; the message names it and the broker's reason."""


@dataclass(frozen=True)
class Grant:
    """``principal`` may do ``operation`` on a topic or a group: ``name``, or every name that
    starts with it when ``prefixed``."""

    principal: str
    operation: AclOperation
    resource: ResourceType
    name: str
    prefixed: bool = False

    def __str__(self) -> str:
        return f"{self.principal} may {self.permits()}"

    def permits(self) -> str:
        """What it lets its principal do, e.g. ``READ topic vigil.events.raw``."""
        name = f"{self.name}*" if self.prefixed else self.name
        return f"{self.operation.name} {self.resource.name.lower()} {name}"

    def binding(self) -> AclBinding:
        pattern = ResourcePatternType.PREFIXED if self.prefixed else ResourcePatternType.LITERAL
        return AclBinding(self.resource, self.name, pattern, self.principal, "*",
                          self.operation, AclPermissionType.ALLOW)  # fmt: skip


def principal(value: str, option: str) -> str:
    """``User:name``, as Kafka names a principal; ConfigError naming ``option`` otherwise."""
    kind, _, name = value.partition(":")
    if kind != "User" or not name:
        raise ConfigError(f"{option}: expected a principal as User:name, got {value!r}")
    return value


def worker_grants(settings: Settings, who: str) -> list[Grant]:
    """What the worker (every role) does: read raw, clean and the DLQ, write clean, the DLQ,
    rollups and alerts, create any of them missing at start, and commit, describe and take over
    its groups (all named after ``settings.consumer_group``). Kafka lets whoever may read or
    write a topic or group describe it too."""
    topics = settings.topics
    uses = {
        topics.raw: (_READ,),
        topics.clean: (_READ, _WRITE),
        topics.dlq: (_READ, _WRITE),
        topics.rollups: (_WRITE,),
        topics.alerts: (_WRITE,),
    }
    grants = [
        Grant(who, operation, ResourceType.TOPIC, topic)
        for topic, operations in uses.items()
        for operation in (*operations, _CREATE)
    ]
    return [*grants, Grant(who, _READ, ResourceType.GROUP, settings.consumer_group, prefixed=True)]


def producer_grants(settings: Settings, who: str) -> list[Grant]:
    """What a producer of events does: write the raw topic."""
    return [Grant(who, _WRITE, ResourceType.TOPIC, settings.topics.raw)]


def gateway_grants(settings: Settings, who: str) -> list[Grant]:
    """What the gateway does: write the raw topic, and the DLQ with the spans it rejects."""
    return [
        *producer_grants(settings, who),
        Grant(who, _WRITE, ResourceType.TOPIC, settings.topics.dlq),
    ]


def create(settings: Settings, grants: Iterable[Grant], timeout: float = 30.0) -> int:
    """Create ``grants`` on the cluster as ``settings`` sign in (a principal that may alter
    ACLs). One that exists already is left as it is. Returns how many were asked for; raises
    AclError naming the first the broker refused, and why."""
    admin = AdminClient(settings.kafka.config())
    by_binding = {grant.binding(): grant for grant in grants}
    futures = admin.create_acls(list(by_binding), request_timeout=timeout)
    for binding, future in futures.items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.SECURITY_DISABLED:  # "No Authorizer is configured"
                raise AclError(f"Kafka at {settings.kafka} has no authorizer: it lets every "
                               "principal do everything and takes no ACL, so none was created"
                               ) from None  # fmt: skip
            raise AclError(f"{by_binding[binding]}: {exc.args[0].str()}") from None
    return len(by_binding)


def principal_of(security: KafkaSecurity) -> str:
    """The principal a cluster sees for a client that signs in as ``security`` says, as far as
    Vigil can tell: the SASL user, or the one a client certificate or an OAUTHBEARER token
    maps to (named by the cluster's rules, which Vigil does not know; for a token, by default
    its ``sub`` claim)."""
    if security.oidc is not None:
        return f"User:<the sub of client {security.oidc.client_id}'s tokens>"
    if security.sasl:
        return f"User:{security.username}"
    if security.cert_location is not None:
        return "User:<the principal of VIGIL_KAFKA_SSL_CERT_LOCATION>"
    return "User:ANONYMOUS"


def prepare(settings: Settings, role: str) -> None:
    """Create the topics ``role`` ("worker" or "gateway") uses that are missing, then ask the
    cluster whether its principal has every ACL the role needs (``vigil kafka acls``), at start:
    without the question, a worker short of READ on the DLQ stops at its first read of it, one
    short of READ on raw waits with a librdkafka line every 30 s, and a gateway short of WRITE
    on the DLQ answers 503 to a rejected span. Raises AclError naming each operation the
    principal lacks on a topic or group, and the command that grants them; TopicError as
    ``ensure_topics`` does otherwise."""
    try:
        created = ensure_topics(settings, only=topics_of(settings, role))
    except TopicError as exc:
        # a topic the principal may not even describe looks missing, and creating it is refused
        if "TOPIC_AUTHORIZATION_FAILED" in str(exc):
            _require(settings, role)
        raise
    _require(settings, role, created)


def topics_of(settings: Settings, role: str) -> list[str]:
    """The topics ``role`` ("worker" or "gateway") uses."""
    grants = _grants(settings, role)
    return list(dict.fromkeys(g.name for g in grants if g.resource == ResourceType.TOPIC))


def lacking(settings: Settings, role: str, created: Collection[str] = ()) -> list[Grant] | None:
    """The grants ``role`` ("worker" or "gateway") needs, but CREATE, that the cluster says its
    principal lacks on topics that exist and its group: each topic's and group's authorized
    operations (KIP-430). A cluster that does not authorize requests allows everything; what
    the cluster does not say (a broker older than 2.3, a topic that does not exist) is not
    counted, but for topics ``created`` a moment ago, which are waited for. None when the
    cluster cannot be asked."""
    grants = _grants(settings, role)
    try:
        said = _authorized(settings, grants, 30.0, created)
    except KafkaException as exc:
        log.warning("could not ask Kafka which operations the %s may do: %s", role, exc)
        return None
    return [
        grant
        for grant in grants
        if grant.operation != _CREATE
        and (ops := said.get((grant.resource, grant.name))) is not None
        and grant.operation not in ops
    ]


def _require(settings: Settings, role: str, created: Collection[str] = ()) -> None:
    """Raise AclError if ``lacking`` names a grant: the question is a courtesy, the broker
    enforces the ACLs either way, so one that cannot be asked raises nothing."""
    missing = lacking(settings, role, created)
    if missing:
        raise AclError(lacking_message(settings, role, missing))


def lacking_message(settings: Settings, role: str, missing: list[Grant]) -> str:
    """What ``role``'s principal may not do, and the command that grants it."""
    who = principal_of(settings.kafka.security)
    return (
        f"Kafka at {settings.kafka} does not let the {role} ({who}) "
        + ", ".join(grant.permits() for grant in missing)
        + f". An ACL administrator can grant what the {role} needs with: "
        f"vigil kafka acls --{role} {who} --apply"
    )


def _grants(settings: Settings, role: str) -> list[Grant]:
    who = principal_of(settings.kafka.security)
    return worker_grants(settings, who) if role == "worker" else gateway_grants(settings, who)


def _authorized(
    settings: Settings, grants: list[Grant], timeout: float, created: Collection[str] = ()
) -> dict[tuple[ResourceType, str], frozenset[AclOperation] | None]:
    """The operations the cluster lets this client do on each topic and group of ``grants``;
    None where it did not say. A topic of ``created`` (made a moment ago: a broker may not
    know it yet, and answers that it does not exist) is asked again until it is known, for up
    to ``timeout``."""
    admin = admin_client(settings)
    topics = sorted({g.name for g in grants if g.resource == ResourceType.TOPIC})
    groups = sorted({g.name for g in grants if g.resource == ResourceType.GROUP})
    operations = {}
    if groups:
        described = admin.describe_consumer_groups(
            groups, request_timeout=timeout, include_authorized_operations=True
        )
        operations.update(_operations(ResourceType.GROUP, described))
    deadline = time.monotonic() + timeout
    while topics:
        described = admin.describe_topics(
            TopicCollection(topics), request_timeout=timeout, include_authorized_operations=True
        )
        operations.update(_operations(ResourceType.TOPIC, described))
        topics = [t for t in topics if t in created and (ResourceType.TOPIC, t) not in operations]
        if topics and time.monotonic() < deadline:
            time.sleep(0.2)
        else:
            break
    return operations


def _operations(
    resource: ResourceType, described: dict[str, Future[Any]]
) -> dict[tuple[ResourceType, str], frozenset[AclOperation] | None]:
    """What the descriptions of topics or groups say their client may do. One the cluster did
    not describe for another reason than a refusal (a topic that does not exist or has no
    leader yet, a group whose coordinator is loading) is left out: not said."""
    operations: dict[tuple[ResourceType, str], frozenset[AclOperation] | None] = {}
    for name, future in described.items():
        try:
            ops = future.result().authorized_operations
        except KafkaException as exc:
            if exc.args[0].code() not in _REFUSED:
                log.debug("%s %s not described: %s", resource.name.lower(), name, exc)
                continue
            ops = []  # not even DESCRIBE: no grant on it at all
        operations[resource, name] = None if ops is None else frozenset(ops)
    return operations
