"""Creating Vigil's topics on the real broker: partitions and copies as the settings say."""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from pipeline.settings import Settings
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
