"""Faults the pipeline must ride out with nothing lost or duplicated, by event_id accounting."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.sdk import Emitter
from pipeline.events import Event, Interaction
from pipeline.ledger import Retention, verify
from pipeline.services import WorkerProcess
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.integration.conftest import count, wait_until

pytestmark = pytest.mark.integration


def test_clickhouse_outage_holds_the_backlog_in_kafka_and_catches_up(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    outage = tmp_path / "clickhouse-down"
    env = {**vigil_env, "VIGIL_FAULT_STORE_OUTAGE_FILE": str(outage)}
    settings = Settings.from_env(env)
    ensure_topics(settings)
    worker = WorkerProcess(settings, env)
    store = worker.start()
    assert store is not None
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    total = 3000
    try:
        outage.touch()  # ClickHouse goes away
        for i in range(total):
            emitter.emit(Event(event_id=f"o-{i}", kind="interaction", ts=datetime.now(UTC),
                               tenant_id="acme", agent_id=f"a{i % 5}",
                               body=Interaction("openai", "gpt-4o", input_tokens=i)))  # fmt: skip
        emitter.flush()
        time.sleep(8)
        assert count(store, "SELECT count() FROM vigil.audit_log") == 0  # nothing half-written
        assert worker.alive()  # backing off, not crashing
        log = worker.tail(400)
        assert "retrying in" in log and "fault injected" in log
        outage.unlink()  # it comes back: the backlog waiting in Kafka is written, once
        sql = "SELECT count() FROM vigil.audit_log"
        wait_until(lambda: count(store, sql) >= total, 90, f"{total} events after the outage")
        time.sleep(2)
        stored, distinct, tokens = store.query_rows(
            "SELECT count(), uniqExact(event_id), sum(input_tokens) FROM vigil.audit_log"
        )[0]
        assert (int(stored), int(distinct), int(tokens)) == (total, total, sum(range(total)))
        verdict = verify(store, Retention())
        assert verdict.ok and verdict.rows == total
    finally:
        outage.unlink(missing_ok=True)
        emitter.close()
        assert worker.stop() == 0, worker.tail()
