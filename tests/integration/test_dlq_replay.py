"""`vigil dlq list` shows what was rejected and why; `vigil dlq replay` re-ingests what a
configuration change made acceptable, once, and leaves the rest rejected."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from confluent_kafka import Producer

from connectors.sdk import Emitter
from pipeline.codec import DEAD_LETTER_SCHEMA, EVENT_SCHEMA, Registry
from pipeline.dlq import dead_letter
from pipeline.events import Event, Interaction, InvalidEvent, event_to_avro
from pipeline.rows import Origin
from pipeline.services import WorkerProcess
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.integration.conftest import count, wait_until

pytestmark = pytest.mark.integration


def _event(i: int, ts: datetime, tokens: int = 10) -> Event:
    return Event(event_id=f"r-{i}", kind="interaction", ts=ts, tenant_id="acme", agent_id="bot",
                 body=Interaction("openai", "gpt-4o", input_tokens=tokens, output_tokens=1))  # fmt: skip


def test_replay_takes_back_what_a_config_change_now_accepts(vigil_env: dict[str, str]) -> None:
    strict = {**vigil_env, "VIGIL_MAX_EVENT_AGE_DAYS": "1"}
    settings = Settings.from_env(strict)
    ensure_topics(settings)
    now = datetime.now(UTC)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    for i in range(5):
        emitter.emit(_event(i, now - timedelta(days=3)))  # too old for a 1-day window
    for i in range(5, 8):
        emitter.emit(_event(i, now, tokens=-5))  # wrong whatever the configuration
    for i in range(8, 12):
        emitter.emit(_event(i, now))
    emitter.flush()
    # what an older ledger makes of an EventBatch it cannot read: one dead letter for all of it
    registry = Registry.load()
    batch = registry.encode_batch(
        [registry.encode(EVENT_SCHEMA, event_to_avro(e))
         for e in (_event(20, now), _event(21, now), _event(22, now, tokens=-1))]
    )  # fmt: skip
    letter = dead_letter(
        batch, b"acme/bot", Origin(settings.topics.clean, 0, 7),
        InvalidEvent("wrong_schema", "payload: schema id 5 is vigil.EventBatch"),
        stage="ledger", received_at=now,
    )  # fmt: skip
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    producer.produce(settings.topics.dlq, registry.encode(DEAD_LETTER_SCHEMA, letter), b"acme/bot")
    producer.flush(30)

    def vigil(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    worker = WorkerProcess(settings, strict)
    store = worker.start()
    assert store is not None
    try:
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") == 9, 60, "9 dead letters")
        listed = vigil(strict, "dlq", "list", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        reasons = sorted(json.loads(line)["reason_code"] for line in listed.stdout.splitlines())
        assert reasons == ["negative_value"] * 3 + ["timestamp_past"] * 5 + ["wrong_schema"]
        assert (
            "9 dead letter(s): timestamp_past 5, negative_value 3, wrong_schema 1" in listed.stderr
        )
        only = vigil(strict, "dlq", "list", "--reason", "negative_value", "--format", "json")
        assert len(only.stdout.splitlines()) == 3
        dry = vigil(strict, "dlq", "replay", "--dry-run")
        # before the config changes, only the batch's good events would pass
        assert json.loads(dry.stdout.splitlines()[0])["would_replay"] == 2
    finally:
        stopped = worker.stop()  # also when an assertion fails: a worker left running outlives
    assert stopped == 0, worker.tail()  # the test (and the relaxed one takes over the store)

    relaxed = {**vigil_env, "VIGIL_MAX_EVENT_AGE_DAYS": "30"}
    worker = WorkerProcess(Settings.from_env(relaxed), relaxed)
    store = worker.start()
    assert store is not None
    try:
        for _ in range(2):  # a second replay stores nothing twice
            run = vigil(relaxed, "dlq", "replay")
            assert run.returncode == 0, run.stderr
            result = json.loads(run.stdout.splitlines()[0])
            assert result == {"selected": 9, "replayed": 7,  # 5 + the batch's 2 good events
                              "still_rejected": {"negative_value": 4}, "not_replayable": 0}  # fmt: skip
        sentinel = Emitter(settings.bootstrap, settings.topics.raw)  # same key: after the replays
        sentinel.emit(_event(99, now))
        sentinel.close()
        sql = "SELECT count() FROM vigil.audit_log WHERE event_id = 'r-99'"
        wait_until(lambda: count(store, sql) == 1, 60, "the sentinel")
        stored = store.query_rows("SELECT count(), uniqExact(event_id) FROM vigil.audit_log")[0]
        assert tuple(int(v) for v in stored) == (12, 12)  # 4 + 7 replayed + the sentinel
        assert count(store, "SELECT count() FROM vigil.audit_log WHERE input_tokens < 0") == 0
    finally:
        emitter.close()
        assert worker.stop() == 0, worker.tail()
