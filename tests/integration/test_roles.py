"""The worker split in two processes (``vigil worker --role store`` and ``--role validate``) on
the real broker and the real engine: every event stored once, every bad one dead-lettered,
also when the validate process is killed mid-stream. Counted by ``event_id``."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from connectors.sdk import Emitter
from pipeline.events import Event, Interaction
from pipeline.ledger import Retention, verify
from pipeline.owner import RemoteStore
from pipeline.services import WorkerProcess
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from pipeline.workload import bad_payloads
from tests.integration.conftest import count, wait_until

pytestmark = pytest.mark.integration


def test_store_and_validate_processes_store_every_event_once(
    vigil_env: dict[str, str], settings: Settings
) -> None:
    ensure_topics(settings)
    store_worker = WorkerProcess(settings, vigil_env, role="store")
    validate_worker = WorkerProcess(settings, vigil_env, role="validate")
    try:
        store = store_worker.start()
        assert isinstance(store, RemoteStore)
        # it runs while the store process owns the embedded store: it never opens ClickHouse
        assert validate_worker.start() is None
        total = 6_000
        now = datetime.now(UTC)
        bad = list(bad_payloads(random.Random(7), now, 30, "roles"))
        emitter = Emitter(settings.bootstrap, settings.topics.raw)

        def produce() -> None:
            for i in range(total):
                emitter.emit(
                    Event(
                        event_id=f"r-{i}",
                        kind="interaction",
                        ts=now - timedelta(seconds=60) + timedelta(milliseconds=i),
                        tenant_id=("acme", "globex")[i % 2],
                        agent_id=f"agent-{i % 5}",
                        body=Interaction("openai", "gpt-4o", input_tokens=i % 300),
                    )
                )
                if i % 200 == 0:
                    if i // 200 < len(bad):
                        emitter.emit_raw(bad[i // 200].key, bad[i // 200].value)
                    time.sleep(0.1)  # about 3 s of production, so the kill lands mid-stream
            emitter.close()

        producer = threading.Thread(target=produce)
        producer.start()
        time.sleep(1.5)
        validate_worker.kill()  # SIGKILL: validated but unacknowledged events are validated again
        validate_worker.start()
        producer.join()
        assert emitter.delivered == total + len(bad)

        def said() -> str:
            return f"{validate_worker.tail()}\n{store_worker.tail()}"

        wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") >= total, 120,
                   "events", said)  # fmt: skip
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") >= len(bad), 60,
                   "dead letters", said)  # fmt: skip
        time.sleep(2)  # anything stored twice would show up by now
        stored, distinct = store.query_rows(
            "SELECT count(), uniqExact(event_id) FROM vigil.audit_log"
        )[0]
        assert (int(stored), int(distinct)) == (total, total)
        assert count(store, "SELECT count() FROM vigil.dlq") == len(bad)
        reasons = sorted(r[0] for r in store.query_rows("SELECT reason_code FROM vigil.dlq"))
        assert reasons == sorted(b.reason_code for b in bad)
        verdict = verify(store, Retention())
        assert verdict.ok and verdict.rows == total, verdict.breaks[:3]
    finally:
        codes = (validate_worker.stop(), store_worker.stop())
    assert codes == (0, 0), f"{codes}:\n{validate_worker.tail()}\n{store_worker.tail()}"
    # each process's last progress line counts only what its role did; the store process has
    # no hand-off (it decodes every event) and stored each event once, whatever it read twice
    assert store_worker.log_path is not None and validate_worker.log_path is not None
    last = store_worker.log_path.read_text().split("stopped after ")[-1].splitlines()[0]
    assert last.startswith(f"{total:,} stored"), last
    assert f"{len(bad)} dead letters stored" in last and "validated" not in last
    assert "handed over" not in last
    last = validate_worker.log_path.read_text().split("stopped after ")[-1].splitlines()[0]
    assert " validated (" in last and "stored" not in last, last
