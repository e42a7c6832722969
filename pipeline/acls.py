"""The Kafka ACLs Vigil's principals need on a cluster that authorizes each request.

Three kinds of principal: the worker's (it reads raw, writes clean, the DLQ, rollups and
alerts, reads clean and the DLQ back, and creates its topics on first start); the gateway's
(it writes raw, and the DLQ with the spans it rejects); and a producer's (an agent's SDK or
exporter, ``vigil dlq replay``), which may write the raw topic and nothing else. With these
alone, a producer cannot put an event on clean that skipped validation and redaction, nor a
letter in the DLQ. ``vigil kafka acls`` prints them, or creates them; the worker and the
gateway ask the cluster at start whether they have them (``require``), so one short of an ACL
is told which, rather than failing in a different way for each topic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
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
from pipeline.logs import RDKAFKA_LOGGER
from pipeline.settings import ConfigError, Settings
from pipeline.topics import TopicError, ensure_topics

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
            raise AclError(f"{by_binding[binding]}: {exc.args[0].str()}") from None
    return len(by_binding)


def principal_of(security: KafkaSecurity) -> str:
    """The principal a cluster sees for a client that signs in as ``security`` says, as far as
    Vigil can tell: the SASL user, or the one a client certificate maps to (named by the
    cluster's rules, which Vigil does not know)."""
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
    who = principal_of(settings.kafka.security)
    grants = worker_grants(settings, who) if role == "worker" else gateway_grants(settings, who)
    topics = {grant.name for grant in grants if grant.resource == ResourceType.TOPIC}
    try:
        ensure_topics(settings, only=topics)
    except TopicError as exc:
        # a topic the principal may not even describe looks missing, and creating it is refused
        if "TOPIC_AUTHORIZATION_FAILED" in str(exc):
            _require(settings, role, who, grants)
        raise
    _require(settings, role, who, grants)


def _require(settings: Settings, role: str, who: str, grants: list[Grant]) -> None:
    """Raise AclError if the cluster says ``who`` lacks one of ``grants`` (but CREATE): each
    topic's and group's authorized operations (KIP-430). A cluster that does not authorize
    requests allows everything. Nothing is raised for what the cluster does not say (a broker
    older than 2.3, a topic that does not exist) or when it cannot be asked: the question is a
    courtesy, the broker enforces the ACLs either way."""
    try:
        said = _authorized(settings, grants, timeout=30.0)
    except KafkaException as exc:
        log.warning("could not ask Kafka which operations the %s may do: %s", role, exc)
        return
    missing = [
        grant
        for grant in grants
        if grant.operation != _CREATE
        and (ops := said.get((grant.resource, grant.name))) is not None
        and grant.operation not in ops
    ]
    if missing:
        raise AclError(
            f"Kafka at {settings.kafka} does not let the {role} ({who}) "
            + ", ".join(grant.permits() for grant in missing)
            + f". An ACL administrator can grant what the {role} needs with: "
            f"vigil kafka acls --{role} {who} --apply"
        )


def _authorized(
    settings: Settings, grants: list[Grant], timeout: float
) -> dict[tuple[ResourceType, str], frozenset[AclOperation] | None]:
    """The operations the cluster lets this client do on each topic and group of ``grants``;
    None where it did not say."""
    config: dict[str, Any] = {**settings.kafka.config(), "logger": RDKAFKA_LOGGER}
    admin = AdminClient(config)
    topics = sorted({g.name for g in grants if g.resource == ResourceType.TOPIC})
    groups = sorted({g.name for g in grants if g.resource == ResourceType.GROUP})
    asked: dict[tuple[ResourceType, str], Future[Any]] = {}
    if topics:
        described = admin.describe_topics(
            TopicCollection(topics), request_timeout=timeout, include_authorized_operations=True
        )
        asked.update(((ResourceType.TOPIC, name), f) for name, f in described.items())
    if groups:
        described = admin.describe_consumer_groups(
            groups, request_timeout=timeout, include_authorized_operations=True
        )
        asked.update(((ResourceType.GROUP, name), f) for name, f in described.items())
    operations: dict[tuple[ResourceType, str], frozenset[AclOperation] | None] = {}
    for key, future in asked.items():
        try:
            ops = future.result().authorized_operations
        except KafkaException as exc:
            code = exc.args[0].code()
            if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
                continue  # it may describe it, so has some grant; the rest is not said
            if code not in _REFUSED:
                raise
            ops = []  # not even DESCRIBE: no grant on it at all
        operations[key] = None if ops is None else frozenset(ops)
    return operations
