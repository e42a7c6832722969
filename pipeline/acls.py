"""The Kafka ACLs Vigil's principals need on a cluster that authorizes each request.

Three kinds of principal: the worker's (it reads raw, writes clean, the DLQ, rollups and
alerts, reads clean and the DLQ back, and creates its topics on first start); the gateway's
(it writes raw, and the DLQ with the spans it rejects); and a producer's (an agent's SDK or
exporter, ``vigil dlq replay``), which may write the raw topic and nothing else. With these
alone, a producer cannot put an event on clean that skipped validation and redaction, nor a
letter in the DLQ. ``vigil kafka acls`` prints them, or creates them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from pipeline.settings import ConfigError, Settings

_READ, _WRITE, _CREATE = AclOperation.READ, AclOperation.WRITE, AclOperation.CREATE


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
        kind = self.resource.name.lower()
        name = f"{self.name}*" if self.prefixed else self.name
        return f"{self.principal} may {self.operation.name} {kind} {name}"

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
