"""Repricing on the real engine: differences are recorded, the ledger is untouched, and a second
run records nothing new."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import reprice as reprice_module
from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.enrich import enrich
from pipeline.events import Event, Interaction, InvalidEvent, event_to_avro
from pipeline.prices import DEFAULT_CATALOG, Catalog
from pipeline.reprice import ADJUSTMENT_COLUMNS, reprice
from pipeline.rows import Origin
from pipeline.sink import LedgerSink, Message
from pipeline.store import ClickHouseStore, connect, migrate

pytestmark = pytest.mark.integration
JULY = datetime(2025, 7, 1, tzinfo=UTC)


def _store(store: ClickHouseStore, registry: Registry, events: list[Event]) -> None:
    LedgerSink(store, registry).write(
        [
            Message(Origin("clean", 0, i), None, registry.encode(EVENT_SCHEMA, event_to_avro(e)))
            for i, e in enumerate(events)
        ]
    )


def _catalog(tmp_path: Path, version: str, gpt_4o_input: float, *added: dict[str, Any]) -> Path:
    """The shipped catalog as ``version``, with gpt-4o's input price (per million tokens) from
    2024-10-02 changed and ``added`` entries; its path."""
    data = yaml.safe_load(DEFAULT_CATALOG.read_text())
    data["version"] = version
    for entry in data["models"]:
        if entry["model"] == "gpt-4o" and str(entry["effective_from"]) == "2024-10-02":
            entry["input"] = gpt_4o_input
    data["models"].extend(added)
    path = tmp_path / f"{version}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_reprice_records_differences_and_never_changes_the_ledger(
    store: ClickHouseStore, registry: Registry, tmp_path: Path
) -> None:
    catalog = Catalog.load()
    events = []
    for i, model in enumerate(["gpt-4o", "gpt-4o-mini", "home-grown-llm"] * 10):
        e = Event(
            event_id=f"r-{i}",
            kind="interaction",
            ts=JULY,
            tenant_id="acme",
            agent_id="bot",
            body=Interaction("openai", model, input_tokens=1_000_000, output_tokens=100_000),
        )
        events.append(enrich(e, catalog, {}))
    _store(store, registry, events)
    before = store.query_raw("SELECT * FROM vigil.audit_log ORDER BY event_id", "TSVRaw")

    home_grown = {"provider": "openai", "model": "home-grown-llm", "effective_from": "2025-01-01",
                  "input": 1.00, "output": 1.00, "checked": "2025-01-01"}  # fmt: skip
    new_path = _catalog(tmp_path, "next", 2.00, home_grown)  # a price cut on gpt-4o

    result = reprice(store, Catalog.load(new_path))
    assert result.examined == 30 and result.changed == 20 and result.newly_priced == 10
    assert result.by_model["gpt-4o"] == Decimal("-0.5") * 10  # 1M input tokens, $0.50/M cheaper
    assert result.by_model["home-grown-llm"] == Decimal("1.1") * 10
    assert result.delta == Decimal("6")
    rows = store.query_rows(
        "SELECT count(), sum(delta_usd), uniqExact(event_id) FROM vigil.cost_adjustments WHERE new_version = 'next'"
    )
    assert (int(rows[0][0]), Decimal(rows[0][1]), int(rows[0][2])) == (20, Decimal("6"), 20)

    again = reprice(store, Catalog.load(new_path))
    assert again.already_recorded == 20
    assert int(store.query_rows("SELECT count() FROM vigil.cost_adjustments")[0][0]) == 20
    assert store.query_raw("SELECT * FROM vigil.audit_log ORDER BY event_id", "TSVRaw") == before
    assert dataclasses.is_dataclass(result) and result.version == "next"


def test_the_same_event_id_in_two_tenants_gets_two_adjustments(
    store: ClickHouseStore, registry: Registry, tmp_path: Path
) -> None:
    catalog = Catalog.load()

    def shared(tenant: str, i: int) -> Event:
        body = Interaction("openai", "gpt-4o", input_tokens=1_000_000)
        e = Event(event_id=f"shared-{i}", kind="interaction", ts=JULY, tenant_id=tenant,
                  agent_id="bot", body=body)  # fmt: skip
        return enrich(e, catalog, {})

    events = [shared(tenant, i) for tenant in ("acme", "globex") for i in range(3)]
    _store(store, registry, events)
    cut = _catalog(tmp_path, "cut", 2.00)
    # what an earlier release recorded for acme's shared-0: its id was made without the tenant
    earlier = ("old-formula-id", "shared-0", JULY, "acme", "bot", "gpt-4o", Decimal("2.5"),
               Decimal("2"), Decimal("-0.5"), catalog.version, "cut", JULY)  # fmt: skip
    store.insert("vigil.cost_adjustments", [earlier], ADJUSTMENT_COLUMNS, "earlier-release")

    result = reprice(store, Catalog.load(cut))

    assert (result.examined, result.changed, result.already_recorded) == (6, 6, 1)
    rows = store.query_rows(
        "SELECT tenant_id, event_id FROM vigil.cost_adjustments WHERE new_version = 'cut' "
        "ORDER BY tenant_id, event_id"
    )
    assert [tuple(r) for r in rows] == [
        (tenant, f"shared-{i}") for tenant in ("acme", "globex") for i in range(3)
    ]
    assert reprice(store, Catalog.load(cut)).already_recorded == 6
    assert int(store.query_rows("SELECT count() FROM vigil.cost_adjustments")[0][0]) == 6


def test_a_catalog_pricing_a_call_beyond_reason_is_named_and_records_nothing(
    tmp_path: Path, registry: Registry
) -> None:
    """A price a million times too large (a per-token price entered per million) gave costs
    beyond the adjustments' Decimal(18, 9) columns: past the Int64 beneath them the insert
    failed with the client's words; below it the cost was recorded beyond the columns'
    precision, and then the command named the event. The catalog itself is now refused: no
    price reaches 1,000,000 USD per million tokens, so no call of the bounded token counts
    passes the ledger's limit. The command names the entry, and records nothing."""
    catalog = Catalog.load()
    home = tmp_path / "home"
    store = connect(f"chdb://{home / 'clickhouse'}")
    migrate(store)
    events = []
    for i, model in enumerate(["gpt-4o-mini", "gpt-4o"]):
        body = Interaction("openai", model, input_tokens=2_000_000)
        event = Event(event_id=f"big-{i}", kind="interaction", ts=JULY, tenant_id="acme",
                      agent_id="bot", body=body)  # fmt: skip
        events.append(enrich(event, catalog, {}))
    _store(store, registry, events)
    store.close()
    typo = _catalog(tmp_path, "typo", 2_500_000_000.0)
    entry = next(i for i, m in enumerate(yaml.safe_load(typo.read_text())["models"])
                 if m["input"] == 2_500_000_000.0)  # fmt: skip

    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "cost", "reprice", "--catalog", str(typo)],
        env={**os.environ, "VIGIL_HOME": str(home)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        f"vigil: error: {typo}: models[{entry}].input: expected USD per million tokens, from 0 "
        "to below 1,000,000, got 2500000000.0"
    ), done.stderr
    store = connect(f"chdb://{home / 'clickhouse'}")
    try:
        assert int(store.query_rows("SELECT count() FROM vigil.cost_adjustments")[0][0]) == 0
    finally:
        store.close()


def _gpt_4o_calls(n: int) -> list[Event]:
    catalog = Catalog.load()
    events = []
    for i in range(n):
        body = Interaction("openai", "gpt-4o", input_tokens=1_000_000)
        event = Event(event_id=f"c-{i}", kind="interaction", ts=JULY, tenant_id=f"t{i % 2}",
                      agent_id="bot", body=body)  # fmt: skip
        events.append(enrich(event, catalog, {}))
    return events


def test_reprice_reads_and_records_in_chunks_saying_how_far_it_has_got(
    store: ClickHouseStore, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reprice_module, "_CHUNK", 7)
    _store(store, registry, _gpt_4o_calls(25))
    said: list[tuple[int, int]] = []

    result = reprice(store, Catalog.load(_catalog(tmp_path, "cut", 2.00)),
                     progress=lambda examined, recorded: said.append((examined, recorded)))  # fmt: skip

    assert (result.examined, result.changed) == (25, 25)
    assert said == [(7, 0), (14, 0), (21, 0), (25, 7), (25, 14), (25, 21), (25, 25)]
    rows = store.query_rows(
        "SELECT count(), uniqExact(tenant_id, event_id) FROM vigil.cost_adjustments"
    )
    assert tuple(map(int, rows[0])) == (25, 25)


def test_an_event_that_cannot_be_repriced_records_nothing_and_leaves_the_store_usable(
    store: ClickHouseStore, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adjustments of the chunks read before it are not recorded either; and the ledger's
    rows, read as they come, no longer hold the store while the error is handled (the command
    closes the store then; another thread's query waited for the stream)."""
    monkeypatch.setattr(reprice_module, "_CHUNK", 3)
    _store(store, registry, _gpt_4o_calls(10))
    priced = reprice_module.money
    calls = [0]

    def money(value: Decimal, what: str) -> Decimal:
        calls[0] += 1
        if calls[0] == 8:
            raise InvalidEvent("out_of_range", f"{what}: beyond the ledger's columns")
        return priced(value, what)

    monkeypatch.setattr(reprice_module, "money", money)
    answered: list[Any] = []
    try:
        reprice(store, Catalog.load(_catalog(tmp_path, "cut", 2.00)))
    except InvalidEvent as exc:
        assert "cost_usd of event c-" in str(exc)
        query = "SELECT count() FROM vigil.cost_adjustments"
        other = threading.Thread(target=lambda: answered.append(store.query_rows(query)))
        other.start()
        other.join(10)
    assert answered == [[(0,)]]
