"""Which agents each worker role runs, in which consumer group, and whose lag it samples.

The roles exist so validate (CPU-bound Python) and the store (ledger, DLQ) run in two processes
and so use both cores; the integration test ``test_roles.py`` runs them on the real broker."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import faust
import pytest

from pipeline.codec import Registry
from pipeline.config import load_config
from pipeline.kafkaconn import KafkaConnection
from pipeline.producer import KafkaSender
from pipeline.settings import Settings
from pipeline.store import ClickHouseStore, connect
from pipeline.validate import BATCH_BYTES
from pipeline.worker import (
    CLEAN_BUFFER,
    build_app,
    consumer_group,
    lag_groups,
    raw_group,
    read_groups,
)
from tests.conftest import ROOT

SETTINGS = Settings.from_env({"VIGIL_HOME": "/nonexistent", "VIGIL_CONSUMER_GROUP": "g"})


@pytest.fixture
def sender() -> Iterator[KafkaSender]:
    # never sends: the apps are built, not started; quiet about the broker that is not there
    sender = KafkaSender(KafkaConnection("127.0.0.1:1"), {"log_level": 0})
    yield sender
    sender.close(timeout=0.1)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ClickHouseStore]:
    store = connect(f"chdb://{tmp_path / 'ch'}")
    yield store
    store.close()


def _app(role: str, store: ClickHouseStore | None, sender: KafkaSender) -> faust.App:
    config = load_config(ROOT / "vigil.yaml", os.environ)
    app = build_app(SETTINGS, config, store, Registry.load(), None, None, sender, role)
    assert app.conf.id == consumer_group(SETTINGS, role)
    return app


def _agents(app: faust.App) -> dict[str, str]:
    """The Faust agents: topics read through Faust streams."""
    return {name.rsplit(".", 1)[-1]: agent.channel.get_topic_name()
            for name, agent in app.agents.items()}  # fmt: skip


def _tasks(app: faust.App) -> list[str]:
    return sorted(task.__name__ for task in app._app_tasks)


def test_all_runs_every_agent_in_the_base_group(
    store: ClickHouseStore, sender: KafkaSender
) -> None:
    topics = SETTINGS.topics
    app = _app("all", store, sender)
    assert _agents(app) == {"ledger": topics.clean, "dead_letters": topics.dlq}
    # raw is read outside Faust's streams, in the raw group (pipeline.batchconsumer)
    assert _tasks(app) == ["announce", "record_lag", "report_progress", "validate"]
    assert consumer_group(SETTINGS, "all") == "g"
    assert raw_group(SETTINGS) == "g-validate"


def test_the_store_role_writes_and_the_validate_role_validates(
    store: ClickHouseStore, sender: KafkaSender
) -> None:
    topics = SETTINGS.topics
    app = _app("store", store, sender)
    assert _agents(app) == {"ledger": topics.clean, "dead_letters": topics.dlq}
    assert _tasks(app) == ["announce", "record_lag", "report_progress"]
    # validate needs no store: it never opens ClickHouse, so it can run beside the owner
    app = _app("validate", None, sender)
    assert _agents(app) == {}
    assert _tasks(app) == ["announce", "report_progress", "validate"]
    assert consumer_group(SETTINGS, "store") == "g"
    assert consumer_group(SETTINGS, "validate") == "g-validate"


def test_a_role_that_writes_needs_a_store_and_unknown_roles_are_refused(
    sender: KafkaSender,
) -> None:
    with pytest.raises(ValueError, match="store role writes to ClickHouse"):
        _app("store", None, sender)
    with pytest.raises(ValueError, match="'ledger' is not one of all, store, validate"):
        _app("ledger", None, sender)


def test_the_store_samples_the_lag_of_both_groups() -> None:
    topics = SETTINGS.topics
    assert lag_groups(SETTINGS) == [
        ("g-validate", (topics.raw,)),
        ("g", (topics.clean, topics.dlq)),
    ]


def test_each_role_checks_the_retention_of_what_it_reads() -> None:
    topics = SETTINGS.topics
    assert read_groups(SETTINGS, "validate") == [("g-validate", (topics.raw,))]
    assert read_groups(SETTINGS, "store") == [("g", (topics.clean, topics.dlq))]
    assert read_groups(SETTINGS, "all") == lag_groups(SETTINGS)[::-1]


def test_the_ledger_holds_a_bounded_number_of_bytes_ahead(
    store: ClickHouseStore, sender: KafkaSender
) -> None:
    """A clean message is an EventBatch of up to BATCH_BYTES: while the ledger waits on
    ClickHouse, the messages fetched ahead of it must stay tens of MB, not Faust's default
    4,096 of them (about 800 MB)."""
    config = load_config(ROOT / "vigil.yaml", os.environ)
    app = build_app(SETTINGS, config, store, Registry.load(), None, None, sender, "store")
    buffers = {
        name.rsplit(".", 1)[-1]: agent.channel.queue.maxsize for name, agent in app.agents.items()
    }
    assert buffers["ledger"] == CLEAN_BUFFER
    assert CLEAN_BUFFER * BATCH_BYTES <= 64 * 1024 * 1024
    assert buffers["dead_letters"] == app.conf.stream_buffer_maxsize  # single messages: default


def test_a_store_app_let_go_is_collected_with_what_it_holds(
    store: ClickHouseStore, sender: KafkaSender
) -> None:
    """The store agents' receivers of the partitions' signals hear them while the app lives, and
    do not keep it alive after: connected strongly, Faust's class-wide registry of receivers held
    every app a process made, with its sender's producer and its store (15 apps' clients were
    alive after test_fence)."""
    app = _app("store", store, sender)
    finish_writes, rebuild_alert_state = app.receivers
    assert finish_writes in set(app.on_partitions_revoked.iter_receivers(app))
    assert rebuild_alert_state in set(app.on_partitions_assigned.iter_receivers(app))
    collected = weakref.ref(app)
    del app, finish_writes, rebuild_alert_state
    gc.collect()
    assert collected() is None
