"""The store role's ledger agent across a rebalance (``pipeline/fence.py``): the worker's own
agent, built by ``build_app``, writing to the real engine, fed through Faust's in-memory test
channel. A rebalance is played as Faust plays it: the flow suspended, the revocation signal
sent, a new consumer generation, the flow resumed.

Another worker now owns what was fetched before the rebalance and reads it again from the last
commit; if this one wrote it too, the ledger would hold it twice, chained after heads each
writer had not seen."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import pytest

from pipeline.codec import Registry
from pipeline.config import load_config
from pipeline.ledger import Retention, verify
from pipeline.producer import KafkaSender
from pipeline.settings import Settings
from pipeline.store import ClickHouseStore, StoreError
from pipeline.worker import build_app
from tests.conftest import ROOT
from tests.integration.conftest import RecordingStore, clean_messages, count, wait_until

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
FLUSH_SECONDS = 0.5  # a batch short of full is handed to the sink after this


class GatedStore(RecordingStore):
    """The real store, whose inserts into the ledger can be held (``hold``) until released,
    or made to fail once (``fail_next``)."""

    def __init__(self, store: ClickHouseStore) -> None:
        super().__init__(store)
        self.held = threading.Event()  # set while an insert waits to be released
        self.release = threading.Event()
        self.release.set()
        self.fail_next = False

    def insert(self, table: str, rows: Any, columns: Any, dedup_token: str) -> None:
        if table == "vigil.audit_log":
            if self.fail_next:
                self.fail_next = False
                self.inserted.append(table)
                raise StoreError("ClickHouse is away (injected)")
            self.held.set()
            self.release.wait(30)
        super().insert(table, rows, columns, dedup_token)


@pytest.fixture
def sender(kafka_bootstrap: str) -> Iterator[KafkaSender]:
    sender = KafkaSender(kafka_bootstrap)
    yield sender
    sender.close(timeout=5)


def _ledger_app(tmp_path: Path, store: Any, sender: KafkaSender) -> tuple[faust.App, Any]:
    settings = Settings.from_env(
        {"VIGIL_HOME": str(tmp_path / "home"), "VIGIL_SINK_FLUSH_SECONDS": str(FLUSH_SECONDS)}
    )
    config = load_config(ROOT / "vigil.yaml", os.environ)
    app = build_app(settings, config, store, Registry.load(), None, None, sender, "store")
    ledger = next(agent for name, agent in app.agents.items() if name.endswith(".ledger"))
    return app, ledger


async def _put(agent: Any, values: list[bytes], first: int) -> list[Any]:
    """Deliver ``values`` as the messages at offsets ``first``... of partition 0, in the
    consumer's current generation; the Faust events delivered."""
    events = []
    for offset, value in enumerate(values, start=first):
        agent.sent_offset = offset
        events.append(await agent.put(value, key=b"acme/bot", partition=0, wait=False))
    return events


async def _rebalance(app: faust.App) -> None:
    """Faust's order: the flow suspended, the revocation signal awaited, a new generation
    assigned, the flow resumed."""
    app.flow_control.suspend()
    await app.on_partitions_revoked.send(set())
    app.consumer_generation_id += 1
    app.flow_control.resume()


def _stored_ids(store: ClickHouseStore) -> list[str]:
    rows = store.query_rows("SELECT event_id FROM vigil.audit_log ORDER BY event_id")
    return [str(r[0]) for r in rows]


def _ids(first: int, last: int) -> list[str]:
    return sorted(f"e-{i}'\\" for i in range(first, last))


def test_what_a_batch_fetched_before_a_rebalance_is_left_to_the_partitions_owner(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "vigil.worker")
    registry = Registry.load()
    app, ledger = _ledger_app(tmp_path, store, sender)
    before = [m.value for m in clean_messages(registry, range(0, 10), ts=NOW)]
    after = [m.value for m in clean_messages(registry, range(10, 20), ts=NOW)]

    async def run() -> list[Any]:
        async with ledger.test_context() as agent:
            old = await _put(agent, before, 0)
            await asyncio.sleep(FLUSH_SECONDS / 5)  # in the agent's batch, not yet written
            await _rebalance(app)
            # fetched after the rebalance: the same batch, handed to the sink with the others
            new = await _put(agent, after, 10)
            await asyncio.to_thread(
                wait_until, lambda: all(e.message.acked for e in new), 20, "the new generation"
            )
            return old

    old = asyncio.run(run())
    assert _stored_ids(store) == _ids(10, 20)
    assert not any(e.message.acked for e in old)  # a commit never passes them unstored
    assert "10 of 20 messages were fetched before a rebalance" in caplog.text  # one batch
    assert verify(store, Retention()).ok


def test_the_revocation_waits_for_the_insert_in_flight(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path
) -> None:
    registry = Registry.load()
    gated = GatedStore(store)
    gated.release.clear()
    app, ledger = _ledger_app(tmp_path, gated, sender)
    values = [m.value for m in clean_messages(registry, range(0, 10), ts=NOW)]

    async def run() -> list[Any]:
        async with ledger.test_context() as agent:
            events = await _put(agent, values, 0)
            assert await asyncio.to_thread(gated.held.wait, 20), "no insert began"
            rebalance = asyncio.ensure_future(_rebalance(app))
            await asyncio.sleep(0.5)
            assert not rebalance.done()  # the partitions are not given up mid-insert
            gated.release.set()
            await asyncio.wait_for(rebalance, 20)
            # the insert landed before the new owner could read the partition again
            assert _stored_ids(store) == _ids(0, 10)
            await asyncio.to_thread(
                wait_until, lambda: all(e.message.acked for e in events), 20, "the acks"
            )
            return events

    asyncio.run(run())
    assert gated.inserted == ["vigil.audit_log"]


def test_a_write_is_not_retried_once_its_partitions_moved(
    store: ClickHouseStore, sender: KafkaSender, tmp_path: Path
) -> None:
    registry = Registry.load()
    gated = GatedStore(store)
    gated.fail_next = True
    app, ledger = _ledger_app(tmp_path, gated, sender)
    values = [m.value for m in clean_messages(registry, range(0, 10), ts=NOW)]

    async def run() -> list[Any]:
        async with ledger.test_context() as agent:
            events = await _put(agent, values, 0)
            # the first attempt fails; the retry waits 0.5 s, and a rebalance comes meanwhile
            await asyncio.to_thread(wait_until, lambda: gated.inserted, 20, "the first attempt")
            await _rebalance(app)
            await asyncio.sleep(2.0)  # past the retry's back-off
            return events

    events = asyncio.run(run())
    assert gated.inserted == ["vigil.audit_log"]  # the one attempt that failed, no retry
    assert count(store, "SELECT count() FROM vigil.audit_log") == 0
    assert not any(e.message.acked for e in events)
