from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.settings import ConfigError, Settings


def test_defaults_point_at_the_embedded_store_and_the_local_broker(tmp_path: Path) -> None:
    s = Settings.from_env({"VIGIL_HOME": str(tmp_path)})
    assert s.clickhouse_dsn == f"chdb://{tmp_path / 'clickhouse'}"
    assert s.embedded and s.bootstrap == "127.0.0.1:9092"
    assert s.topics.raw == "vigil.events.raw" and s.topics.dlq == "vigil.events.dlq"
    assert s.ledger_dedup_window == timedelta(minutes=10)
    assert s.progress_seconds == 30.0


def test_env_overrides(tmp_path: Path) -> None:
    s = Settings.from_env(
        {
            "VIGIL_HOME": str(tmp_path),
            "VIGIL_KAFKA_BOOTSTRAP": "k:9092",
            "VIGIL_CLICKHOUSE_DSN": "http://ch:8123",
            "VIGIL_TOPIC_PREFIX": "x",
            "VIGIL_LEDGER_DEDUP_WINDOW_SECONDS": "3600",
            "VIGIL_PROGRESS_SECONDS": "2.5",
        }
    )
    assert s.bootstrap == "k:9092" and not s.embedded and s.topics.clean == "x.events.clean"
    assert s.ledger_dedup_window == timedelta(hours=1)
    assert s.progress_seconds == 2.5


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"VIGIL_SINK_BATCH_SIZE": "lots"}, "VIGIL_SINK_BATCH_SIZE"),
        ({"VIGIL_PARTITIONS": "0"}, "VIGIL_PARTITIONS"),
        ({"VIGIL_LEDGER_DEDUP_WINDOW_SECONDS": "-1"}, "VIGIL_LEDGER_DEDUP_WINDOW_SECONDS"),
        ({"VIGIL_CLICKHOUSE_DSN": "mysql://x"}, "VIGIL_CLICKHOUSE_DSN"),
        ({"VIGIL_PROGRESS_SECONDS": "0"}, "VIGIL_PROGRESS_SECONDS"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        Settings.from_env(env)


def test_password_never_appears_in_repr_or_errors() -> None:
    s = Settings.from_env(
        {"VIGIL_CLICKHOUSE_DSN": "https://writer:s3cr3t-pw@ch.example:8443/vigil"}
    )
    assert "s3cr3t-pw" not in repr(s) and "writer" in repr(s)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"VIGIL_CLICKHOUSE_DSN": "mysql://u:s3cr3t-pw@h"})
    assert "s3cr3t-pw" not in str(info.value)
