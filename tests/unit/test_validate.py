"""The decode/validate stage: every kind of bad input gets its own reason; good input passes."""

from __future__ import annotations

import dataclasses
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings

from pipeline.codec import DEAD_LETTER_SCHEMA, EVENT_SCHEMA, HEADER, Registry
from pipeline.config import load_config
from pipeline.enrich import enrich
from pipeline.events import (
    Cost,
    Enrichment,
    Event,
    Interaction,
    InvalidEvent,
    enriched,
    event_from_avro,
    event_from_json,
    event_to_avro,
    only_enrichment_added,
)
from pipeline.rows import Origin
from pipeline.topics import FRAMING_BYTES
from pipeline.validate import (
    BATCH_BYTES,
    Limits,
    check_event,
    clean_batch_bytes,
    clean_batches,
    decode_event,
    route,
)
from tests import pii_samples
from tests.conftest import EXAMPLES, load_example
from tests.event_strategies import events

ROOT = Path(__file__).resolve().parents[2]

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
LIMITS = Limits()


def _interaction(**body: Any) -> Event:
    return Event(
        event_id="e1",
        kind="interaction",
        ts=NOW,
        tenant_id="acme",
        agent_id="bot",
        body=Interaction("openai", "gpt-4o", **body),
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path, registry: Registry) -> None:  # type: ignore[no-untyped-def]
    event = event_from_json(load_example(path))
    wire = registry.encode(EVENT_SCHEMA, event_to_avro(event))
    assert decode_event(wire, registry, LIMITS, NOW) == event


@pytest.mark.parametrize(
    ("event", "code", "names"),
    [
        (_interaction(input_tokens=-1), "negative_value", "input_tokens"),
        (_interaction(output_tokens=10**9), "out_of_range", "output_tokens"),
        (
            _interaction(input_tokens=10, cache_read_tokens=20),
            "inconsistent_tokens",
            "cache_read_tokens",
        ),
        (
            _interaction(output_tokens=5, reasoning_tokens=6),
            "inconsistent_tokens",
            "reasoning_tokens",
        ),
        (_interaction(latency_ms=float("nan")), "not_finite", "latency_ms"),
        (_interaction(reported_cost_usd=float("inf")), "not_finite", "reported_cost_usd"),
        (_interaction(status="maybe"), "bad_value", "status"),
        (dataclasses.replace(_interaction(), tenant_id=""), "missing_tenant", "tenant_id"),
        (dataclasses.replace(_interaction(), tenant_id="  "), "missing_tenant", "tenant_id"),
        (dataclasses.replace(_interaction(), ts=NOW + timedelta(days=2)), "timestamp_future", "ts"),
        (
            dataclasses.replace(_interaction(), ts=datetime(1999, 1, 1, tzinfo=UTC)),
            "timestamp_past",
            "ts",
        ),
        (
            dataclasses.replace(_interaction(), attributes={str(i): "v" for i in range(300)}),
            "too_many_attributes",
            "attributes",
        ),
        (dataclasses.replace(_interaction(), event_id="x" * 300), "out_of_range", "event_id"),
        (
            dataclasses.replace(_interaction(), kind="cost", body=Cost(float("nan"))),
            "not_finite",
            "amount",
        ),
        (
            dataclasses.replace(_interaction(), kind="cost", body=Cost(-3.0)),
            "negative_value",
            "amount",
        ),
        (
            dataclasses.replace(_interaction(), kind="cost", body=Cost(1.0, currency="dollars")),
            "bad_value",
            "currency",
        ),
        # beyond what the ledger's Decimal(18, 9) holds: the insert would fail, again and again
        (
            dataclasses.replace(_interaction(), kind="cost", body=Cost(1e9, currency="JPY")),
            "out_of_range",
            "amount: 1000000000.0 is not below 1,000,000,000",
        ),
        (_interaction(reported_cost_usd=1e20), "out_of_range", "reported_cost_usd: 1e+20"),
    ],
)
def test_bad_events_are_rejected_with_a_reason_naming_the_field(
    event: Event, code: str, names: str
) -> None:
    with pytest.raises(InvalidEvent) as info:
        check_event(event, LIMITS, NOW)
    assert info.value.code == code
    assert names in info.value.reason


def test_oversized_payload_is_rejected_before_decoding(registry: Registry) -> None:
    event = dataclasses.replace(_interaction(input_text="x" * 2000))
    wire = registry.encode(EVENT_SCHEMA, event_to_avro(event))
    with pytest.raises(InvalidEvent) as info:
        decode_event(wire, registry, Limits(max_payload_bytes=1000), NOW)
    assert info.value.code == "oversized"
    assert str(len(wire)) in info.value.reason


def test_invalid_utf8_in_a_string_is_named(registry: Registry) -> None:
    wire = bytearray(registry.encode(EVENT_SCHEMA, event_to_avro(_interaction())))
    at = wire.index(b"acme")
    wire[at : at + 4] = b"\xff\xfe\xfd\xfc"
    with pytest.raises(InvalidEvent) as info:
        decode_event(bytes(wire), registry, LIMITS, NOW)
    assert info.value.code == "invalid_utf8"


@pytest.mark.parametrize(
    ("patch", "code"),
    [
        ({"kind": "telemetry"}, "unknown_kind"),
        ({"kind": ["interaction"]}, "unknown_kind"),  # a list or an object: it was a TypeError
        ({"kind": {"name": "cost"}}, "unknown_kind"),
        ({"unit": "T-123"}, "bad_type"),  # it was dropped, and the event costed to no unit
        ({"actor": "u-42"}, "bad_type"),
        ({"enrichment": ["x"]}, "bad_type"),
        ({"redactions": [1]}, "bad_type"),  # it was a TypeError
        ({"latency_ms": 10**400}, "out_of_range"),  # it was an OverflowError
        ({"tenant_id": None}, "missing_tenant"),
        ({"ts": "yesterday"}, "bad_timestamp"),
        ({"ts": "2026-11-20T14:03:07"}, "bad_timestamp"),
        ({"ts": 1_763_647_387}, "bad_timestamp"),  # epoch seconds: it was 1970-01-21, too old
        ({"input_tokens": "12"}, "bad_type"),
        ({"input_tokens": True}, "bad_type"),
        ({"model": None}, "missing_field"),
        ({"attributes": {"a": 1}}, "bad_type"),
    ],
)
def test_json_form_errors_name_the_field(patch: dict[str, Any], code: str) -> None:
    obj = {**load_example(EXAMPLES[[p.name for p in EXAMPLES].index("interaction.json")]), **patch}
    with pytest.raises(InvalidEvent) as info:
        event_from_json(obj)
    assert info.value.code == code


def test_a_number_is_epoch_milliseconds_and_seconds_are_named() -> None:
    obj = load_example(EXAMPLES[[p.name for p in EXAMPLES].index("interaction.json")])
    assert event_from_json({**obj, "ts": 1_763_647_387_000}).ts == datetime(
        2025, 11, 20, 14, 3, 7, tzinfo=UTC
    )
    with pytest.raises(InvalidEvent, match="1763647387 looks like epoch seconds; a number is"):
        event_from_json({**obj, "ts": 1_763_647_387})
    # a smaller number, a count or a clock's reading, was "older than 400 days"
    for small in (0, 12_345.5, -1, 999_999_999):
        with pytest.raises(InvalidEvent, match=f"ts: {small!r} as epoch milliseconds is before"):
            event_from_json({**obj, "ts": small})


def test_route_sends_good_bytes_to_clean_and_bad_bytes_to_dlq_with_the_raw_payload(
    registry: Registry,
) -> None:
    origin = Origin("vigil.events.raw", 2, 41)
    good = registry.encode(EVENT_SCHEMA, event_to_avro(_interaction(input_tokens=3)))
    routed = route(good, b"acme/bot", origin, registry, LIMITS, NOW)
    assert routed.target == "clean" and routed.key == b"acme"  # the tenant: clean_key
    assert registry.decode(routed.value, EVENT_SCHEMA)["tenant_id"] == "acme"

    bad = b"\x05not avro"
    routed = route(bad, b"acme/bot", origin, registry, LIMITS, NOW)
    assert routed.target == "dlq" and routed.reason_code == "bad_magic"
    letter = registry.decode(routed.value, DEAD_LETTER_SCHEMA)
    assert letter["payload"] == bad
    assert (letter["origin_topic"], letter["origin_partition"], letter["origin_offset"]) == (
        "vigil.events.raw",
        2,
        41,
    )
    assert letter["tenant_hint"] == "acme" and letter["stage"] == "validate"
    again = registry.decode(
        route(bad, b"acme/bot", origin, registry, LIMITS, NOW).value, DEAD_LETTER_SCHEMA
    )
    assert again["dlq_id"] == letter["dlq_id"], (
        "re-processing the same input must give the same dlq_id"
    )


def _written_with(registry: Registry, schema_id: int, raw: bytes) -> bytes:
    """The event in ``raw`` as an emitter of schema ``schema_id`` would have written it."""
    record = registry.decode(raw, EVENT_SCHEMA)
    out = io.BytesIO()
    out.write(HEADER.pack(0, schema_id))
    fastavro.schemaless_writer(out, registry.by_id[schema_id], record)
    return out.getvalue()


def test_clean_bytes_are_the_whole_event_encoded_however_validate_made_them(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where validate only adds the enrichment, it writes it into the raw bytes in place of
    their null (``Registry.with_enrichment``); the bytes must be those of a whole encode."""
    config = load_config(ROOT / "vigil.yaml", {})

    def enrich_with(event: Event) -> Event:
        return enrich(event, config.catalog, config.agents)

    raws = pii_samples.raw_workload(registry, NOW)
    older = [_written_with(registry, 3, raw) for raw in raws[:40]]  # before enrichment existed
    overlong = [raw[:-1] + b"\x80\x00" for raw in raws[:40]]  # the null's index in two bytes
    enriched_by_emitter = [
        registry.encode(EVENT_SCHEMA, event_to_avro(dataclasses.replace(
            event_from_avro(registry.decode(raw, EVENT_SCHEMA)), enrichment=Enrichment("none")
        )))
        for raw in raws[:40]
    ]  # fmt: skip
    inputs = [*raws, *older, *overlong, *enriched_by_emitter]
    encode, whole_encodes = Registry.encode_event, []

    def counted(self: Registry, event: Event) -> bytes:
        whole_encodes.append(event.event_id)
        return encode(self, event)

    monkeypatch.setattr(Registry, "encode_event", counted)
    routed = [
        route(raw, None, Origin("raw", 0, i), registry, LIMITS, NOW, config.policy_for,
              enrich_with)
        for i, raw in enumerate(inputs)
    ]  # fmt: skip
    monkeypatch.undo()

    for i, r in enumerate(routed):
        assert r.event is not None and r.event.enrichment is not None
        assert r.value == registry.encode(EVENT_SCHEMA, event_to_avro(r.event)), f"input {i}"
        assert event_from_avro(registry.decode(r.value, EVENT_SCHEMA)) == r.event
    # encoded whole: what was redacted, and every input that is not of the current schema with
    # a one-byte null enrichment; the rest had the enrichment written into their raw bytes
    redacted = {r.event.event_id for r in routed[: len(raws)] if r.event and r.event.redactions}
    assert len(redacted) == 80
    assert sorted(whole_encodes) == sorted(
        [*redacted, *(r.event.event_id for r in routed[len(raws) :] if r.event)]
    )
    assert registry.with_enrichment(raws[0], Enrichment("none")) is not None
    assert all(
        registry.with_enrichment(raw, Enrichment("none")) is None
        for raw in [*older, *overlong, raws[0][:-1] + b"\x02"]
    )


def test_clean_events_are_batched_per_key_in_order_within_the_caps(registry: Registry) -> None:
    keys = [b"acme/a", b"acme/b", None, b"beta/a"]
    clean = [(keys[i % 4], f"event-{i}".encode() * (1 + i % 3)) for i in range(200)]
    clean.insert(50, (b"acme/a", b"x" * 5000))  # alone above the byte cap
    batches = clean_batches(clean, registry, max_events=7, max_bytes=200)

    assert len(batches) <= 40  # 201 events: batched, not one message each
    for _key, batch in batches:
        values = registry.events_in(batch)
        assert 1 <= len(values) <= 7
        assert len(values) == 1 or sum(map(len, values)) <= 200
    for key in keys:  # every event once, in its key's order
        mine = [v for k, batch in batches if k == key for v in registry.events_in(batch)]
        assert mine == [v for k, v in clean if k == key]
    assert (b"acme/a", registry.encode_batch([b"x" * 5000])) in batches
    assert clean_batches([], registry) == []


@pytest.mark.parametrize("size", [1, 150, 200, 5_000])
def test_an_event_batch_fits_the_clean_topic_it_is_sized_for(registry: Registry, size: int) -> None:
    # 192 KiB batches were refused, each by itself, by a clean topic taking 100,000 bytes
    most = 100_000 - FRAMING_BYTES  # as the worker reads it: the topic's limit less framing
    assert clean_batch_bytes(10_000_000) == BATCH_BYTES
    clean = [(b"acme", bytes([i % 251]) * size) for i in range(2_000)]
    batches = clean_batches(clean, registry, max_bytes=clean_batch_bytes(most))
    assert all(len(batch) <= most for _, batch in batches)
    assert sum(len(registry.events_in(batch)) for _, batch in batches) == 2_000


@settings(max_examples=200, deadline=None)
@given(event=events())
def test_enriched_is_replace_with_every_other_field_the_same_object(event: Event) -> None:
    enrichment = Enrichment("priced", "0.25", "2026-11", "sam@acme.example", "ops", True)
    bare = dataclasses.replace(event, enrichment=None)
    assert enriched(bare, enrichment) == dataclasses.replace(bare, enrichment=enrichment)
    assert only_enrichment_added(bare, enriched(bare, enrichment))


def test_the_largest_amount_the_ledger_holds_is_valid() -> None:
    for event in (
        dataclasses.replace(_interaction(), kind="cost", body=Cost(999_999_999.99)),
        _interaction(reported_cost_usd=999_999_999.99),
    ):
        assert check_event(event, LIMITS, NOW) is event
