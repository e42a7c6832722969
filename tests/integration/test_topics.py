"""Creating Vigil's topics on the real broker: partitions, copies and retention as the
settings say."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    ResourceType,
)

from pipeline.settings import ConfigError, Settings
from pipeline.topics import TopicError, ensure_topics

pytestmark = pytest.mark.integration


def test_topics_take_the_clusters_replication_unless_told(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env({**vigil_env, "VIGIL_PARTITIONS": "3"})
    assert settings.replication_factor == -1  # the cluster's default.replication.factor
    created = ensure_topics(settings)
    t = settings.topics
    assert sorted(created) == sorted([t.raw, t.clean, t.dlq, t.rollups, t.alerts])
    metadata = AdminClient(settings.kafka.config()).list_topics(timeout=10).topics
    shape = {name: (len(metadata[name].partitions),
                    {len(p.replicas) for p in metadata[name].partitions.values()})
             for name in created}  # fmt: skip
    assert shape == {t.raw: (3, {1}), t.clean: (3, {1}), t.dlq: (1, {1}), t.rollups: (3, {1}),
                     t.alerts: (1, {1})}  # fmt: skip
    assert ensure_topics(settings) == []  # there already

    # two copies on a one-broker cluster: the broker's refusal shows the setting reached it
    wanted = Settings.from_env({**vigil_env, "VIGIL_TOPIC_PREFIX": "rf2",
                                "VIGIL_TOPIC_REPLICATION_FACTOR": "2"})  # fmt: skip
    with pytest.raises(TopicError) as refused:
        ensure_topics(wanted)
    assert "creating topic rf2." in str(refused.value)
    assert "INVALID_REPLICATION_FACTOR" in str(refused.value)


def test_the_topics_the_worker_drains_keep_messages_as_long_as_told(
    vigil_env: dict[str, str],
) -> None:
    settings = Settings.from_env({**vigil_env, "VIGIL_TOPIC_RETENTION_HOURS": "48"})
    ensure_topics(settings)
    t = settings.topics
    admin = AdminClient(settings.kafka.config())
    resources = [
        ConfigResource(ResourceType.TOPIC, name)
        for name in (t.raw, t.clean, t.dlq, t.rollups, t.alerts)
    ]
    kept = {
        resource.name: (entries["retention.ms"].value, entries["retention.ms"].is_default)
        for resource, future in admin.describe_configs(resources).items()
        for entries in [future.result()]
    }
    two_days = ("172800000", False)
    assert kept[t.raw] == kept[t.clean] == kept[t.dlq] == two_days
    assert kept[t.rollups][1] and kept[t.alerts][1]  # the cluster's: their readers' concern
    with pytest.raises(ConfigError, match="VIGIL_TOPIC_RETENTION_HOURS: must be positive"):
        Settings.from_env({"VIGIL_TOPIC_RETENTION_HOURS": "0"})
