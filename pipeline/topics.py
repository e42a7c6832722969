"""Creating Vigil's topics on a broker (blocking, through the Kafka admin API)."""

from __future__ import annotations

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from pipeline.settings import Settings


class TopicError(RuntimeError):
    """A topic could not be created; the message names the topic and the broker's reason."""


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create any of Vigil's topics that do not exist yet; return the names created."""
    admin = AdminClient({"bootstrap.servers": settings.bootstrap})
    t = settings.topics
    wanted = {
        t.raw: settings.partitions,
        t.clean: settings.partitions,
        t.dlq: 1,
        t.rollups: settings.partitions,
        t.alerts: 1,
    }
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise TopicError(f"cannot reach Kafka at {settings.bootstrap}: {exc}") from None
    missing = [
        NewTopic(name, num_partitions=n, replication_factor=1)
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
