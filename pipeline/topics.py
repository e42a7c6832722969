"""Creating Vigil's topics on a broker (blocking, through the Kafka admin API)."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ClusterMetadata,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from pipeline.kafkaconn import KafkaConnection
from pipeline.logs import RDKAFKA_LOGGER
from pipeline.settings import Settings

log = logging.getLogger("vigil.topics")

# Kafka's default max.message.bytes (a topic's, from the broker's message.max.bytes)
KAFKA_MESSAGE_BYTES = 1_048_588
# What a message holds besides its event: its record batch's framing, its record's, its key (a
# tenant and an agent) and, on the clean topic, its EventBatch's
FRAMING_BYTES = 1024
# librdkafka's default batch.size: the most bytes of messages it puts in one record batch
LIBRDKAFKA_BATCH_BYTES = 1_000_000

# What no retry mends: the cluster refused the sign-in, or its certificate was not trusted
_REFUSED = frozenset((KafkaError._AUTHENTICATION, KafkaError._SSL))


def _refused(error: KafkaError) -> bool:
    """Whether ``error`` says the cluster will not take this client as it is configured: a
    refused sign-in, a broker certificate not trusted, or a TLS alert from the broker (a client
    certificate missing or not trusted, which librdkafka reports as a failed receive)."""
    return error.code() in _REFUSED or (
        error.code() == KafkaError._TRANSPORT and "ssl/tls alert" in error.str()
    )


class TopicError(RuntimeError):
    """A topic could not be created; the message names the topic and the broker's reason."""


def ensure_topics(
    settings: Settings, timeout: float = 30.0, only: Collection[str] | None = None
) -> list[str]:
    """Create any of Vigil's topics (``only`` those named, when given) that do not exist yet,
    with ``settings.replication_factor`` copies (the cluster's default unless set), and those
    whose backlog the worker drains (raw, clean, the DLQ) keeping messages for
    ``settings.topic_retention_hours`` (the cluster's retention unless set); return the names
    created. Raises TopicError at once when the cluster refuses Vigil's sign-in, else after
    ``timeout``."""
    said: list[KafkaError] = []
    admin = admin_client(settings, said)
    t = settings.topics
    wanted = {
        t.raw: settings.partitions,
        t.clean: settings.partitions,
        t.dlq: 1,
        t.rollups: settings.partitions,
        t.alerts: 1,
    }
    if only is not None:
        wanted = {name: n for name, n in wanted.items() if name in only}
    existing = _cluster(admin, settings.kafka, said, timeout).topics
    hours = settings.topic_retention_hours
    kept = {} if hours is None else {"retention.ms": str(round(hours * 3_600_000))}
    missing = [
        NewTopic(
            name,
            num_partitions=n,
            replication_factor=settings.replication_factor,
            config=kept if name in t.drained else {},
        )
        for name, n in wanted.items()
        if name not in existing
    ]
    if not missing:
        return []
    created = []
    for name, future in admin.create_topics(missing, request_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise TopicError(f"creating topic {name}: {exc}") from None
    return created


def cluster_metadata(settings: Settings, timeout: float = 30.0) -> ClusterMetadata:
    """The cluster's brokers and topics, reached as ``ensure_topics`` reaches them (and failing
    as it fails). Raises TopicError."""
    said: list[KafkaError] = []
    admin = admin_client(settings, said)
    return _cluster(admin, settings.kafka, said, timeout)


def _topic_config(
    settings: Settings, names: Collection[str], key: str, timeout: float
) -> dict[str, str]:
    """The value of config ``key`` of each of topics ``names``. Those the cluster does not say
    (the principal may not DESCRIBE_CONFIGS them, or they are missing) are left out."""
    if not names:
        return {}
    admin = admin_client(settings)
    asked = admin.describe_configs(
        [ConfigResource(ResourceType.TOPIC, name) for name in names], request_timeout=timeout
    )
    out: dict[str, str] = {}
    for resource, future in asked.items():
        try:
            entries = future.result(timeout=timeout)
        except (KafkaException, TimeoutError):
            continue
        entry = entries.get(key)
        if entry is not None and entry.value is not None:
            out[resource.name] = entry.value
    return out


def retention_hours(
    settings: Settings, names: Collection[str], timeout: float = 10.0
) -> dict[str, float | None]:
    """How long each of topics ``names`` keeps messages (``retention.ms``), in hours; None for
    ever. Those the cluster does not say are left out."""
    return {
        name: None if int(ms) < 0 else int(ms) / 3_600_000
        for name, ms in _topic_config(settings, names, "retention.ms", timeout).items()
    }


def min_in_sync(
    settings: Settings, names: Collection[str], timeout: float = 10.0
) -> dict[str, int]:
    """The ``min.insync.replicas`` of each of topics ``names``; those the cluster does not say
    are left out."""
    said = _topic_config(settings, names, "min.insync.replicas", timeout)
    return {name: int(value) for name, value in said.items()}


def batch_bytes(sizes: Iterable[int]) -> int:
    """A producer's ``batch.size`` for writing topics whose ``max.message.bytes`` are ``sizes``
    (``message_bytes``; where none is said, Kafka's default): librdkafka's default, or less
    where one of them takes smaller messages. A topic's limit holds a whole record batch
    (compressed), and librdkafka packs several messages into one up to ``batch.size``: to a
    topic taking 300,000 bytes, ten messages of 150,000 random bytes, each within it, were all
    refused (MSG_SIZE_TOO_LARGE), and the producer would have to make its batches smaller
    first (``producer.RenewingProducer``). A message larger than ``batch.size`` still goes,
    alone in its batch."""
    smallest = min(sizes, default=KAFKA_MESSAGE_BYTES)
    return max(1, min(LIBRDKAFKA_BATCH_BYTES, smallest - FRAMING_BYTES))


def message_bytes(
    settings: Settings, names: Collection[str], timeout: float = 10.0
) -> dict[str, int]:
    """The ``max.message.bytes`` of each of topics ``names``; those the cluster does not say
    (the principal may not DESCRIBE_CONFIGS them, or they are missing) are left out."""
    said = _topic_config(settings, names, "max.message.bytes", timeout)
    return {name: int(value) for name, value in said.items()}


def message_bytes_again(settings: Settings, names: Collection[str]) -> dict[str, int]:
    """``message_bytes`` of topics ``names`` read again in a running process, one of which
    refused a message as larger than it takes (its limit lowered since it was read); said at
    WARNING."""
    said = message_bytes(settings, names)
    log.warning("a message was refused as larger than its topic takes; max.message.bytes read "
                "again (%s): %s", ", ".join(names), said or "not said")  # fmt: skip
    return said


def event_bytes(topic: str, said: Mapping[str, int]) -> int:
    """The most bytes of one event a message of ``topic`` holds: its ``max.message.bytes``
    as ``said`` (``message_bytes``; Kafka's default where the cluster does not say) less
    FRAMING_BYTES. The broker refuses a larger message, and whoever sent it would send it again
    for ever."""
    value = said.get(topic)
    if value is None:  # as where Vigil's ACLs are granted (no DESCRIBE_CONFIGS): not a fault
        log.info("the cluster does not say what size of message %s takes (max.message.bytes: "
                 "this principal may not DESCRIBE_CONFIGS it); Kafka's default of %d bytes is "
                 "assumed", topic, KAFKA_MESSAGE_BYTES)  # fmt: skip
    return (KAFKA_MESSAGE_BYTES if value is None else value) - FRAMING_BYTES


def admin_client(settings: Settings, said: list[KafkaError] | None = None) -> AdminClient:
    """An admin client of the cluster, signed in as ``settings`` say, its librdkafka lines held
    back (``pipeline.logs``) and its errors appended to ``said`` when given."""
    config: dict[str, Any] = {**settings.kafka.config(), "logger": RDKAFKA_LOGGER}
    if said is not None:
        config["error_cb"] = said.append
    return AdminClient(config)


def _cluster(
    admin: AdminClient, kafka: KafkaConnection, said: list[KafkaError], timeout: float
) -> ClusterMetadata:
    """The cluster's metadata, asked for again every second until ``timeout``: a broker still
    starting answers in time, a refused sign-in (in ``said``, the client's errors) ends the
    wait at once. The error names what librdkafka said, not only "transport failure"."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return admin.list_topics(timeout=min(1.0, max(left, 0.1)))
        except KafkaException as exc:
            admin.poll(0)  # serves the error callback
            refused = [error for error in said if _refused(error)]
            oidc = kafka.security.oidc
            if refused and oidc is not None and "OAUTHBEARER token" in refused[-1].str():
                raise TopicError(  # the broker was never asked: the identity provider refused
                    f"Vigil could not sign in to Kafka at {kafka}: no token for client "
                    f"{oidc.client_id} from {oidc.token_url}: {refused[-1].str()}"
                ) from None
            if refused:
                raise TopicError(
                    f"Kafka at {kafka} refused Vigil's {kafka.security.protocol} connection: "
                    f"{refused[-1].str()}"
                ) from None
            if left <= 0:
                last = said[-1].str() if said else exc.args[0].str()
                raise TopicError(
                    f"cannot reach Kafka at {kafka} over {kafka.security.protocol} within "
                    f"{timeout:.0f}s: {last}. A broker whose listener needs TLS or SASL closes "
                    "any other connection at once: see VIGIL_KAFKA_SECURITY_PROTOCOL"
                ) from None
