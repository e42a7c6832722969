"""Every shipped example round-trips through the JSON form and the Avro wire format, and a
message written with an older schema is read by the current one."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import struct
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import EVENT_SCHEMA, HEADER, Registry
from pipeline.events import (
    KINDS,
    Actor,
    Enrichment,
    InvalidEvent,
    Unit,
    event_from_avro,
    event_from_json,
    event_to_avro,
    event_to_json,
)
from tests.conftest import EXAMPLES, ROOT, load_example


def test_examples_cover_every_kind() -> None:
    kinds = {load_example(p)["kind"] for p in EXAMPLES}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_round_trips_through_json_and_avro(path: Path, registry: Registry) -> None:
    original = load_example(path)
    event = event_from_json(original)
    wire = registry.encode(EVENT_SCHEMA, event_to_avro(event))
    assert wire[0] == 0 and struct.unpack(">I", wire[1:5])[0] == registry.writer_id(EVENT_SCHEMA)
    back = event_from_avro(registry.decode(wire, EVENT_SCHEMA))
    assert back == event
    as_json = event_to_json(back)
    for key, value in original.items():
        if key == "ts":
            assert event_from_json({**original, "ts": as_json["ts"]}).ts == event.ts
        elif value is not None:
            assert as_json[key] == value, key


def test_registry_ids_are_unique_and_files_parse(registry: Registry) -> None:
    assert set(registry.current) == {"vigil.Event", "vigil.DeadLetter", "vigil.EventBatch"}
    assert len(set(registry.by_id)) == len(registry.by_id)


def _old_writer_schema(registry: Registry) -> dict:
    """The current Event schema as an older producer had it: no session_id on the envelope
    and no cache/reasoning token fields on interactions."""
    schema = copy.deepcopy(registry.by_id[registry.writer_id(EVENT_SCHEMA)])
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "session_id"]
    for field in schema["fields"]:
        if field["name"] == "body":
            for branch in field["type"]:
                if branch["name"] == "vigil.Interaction":
                    branch["fields"] = [
                        f
                        for f in branch["fields"]
                        if f["name"]
                        not in ("cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
                    ]
    return schema


def test_old_writer_is_read_by_new_reader(registry: Registry, tmp_path: Path) -> None:
    old = _old_writer_schema(registry)
    record = event_to_avro(
        event_from_json(
            load_example(EXAMPLES[[p.name for p in EXAMPLES].index("interaction.json")])
        )
    )
    record.pop("session_id")
    _, body = record["body"]
    for key in ("cache_read_tokens", "cache_write_tokens", "reasoning_tokens"):
        body.pop(key)
    out = io.BytesIO()
    out.write(HEADER.pack(0, 77))
    fastavro.schemaless_writer(out, fastavro.parse_schema(old), record)
    evolved = Registry(
        by_id={**registry.by_id, 77: fastavro.parse_schema(old)},
        name_of={**registry.name_of, 77: EVENT_SCHEMA},
        current=registry.current,
    )
    event = event_from_avro(evolved.decode(out.getvalue(), EVENT_SCHEMA))
    assert event.session_id is None
    assert event.body.cache_read_tokens == 0 and event.body.reasoning_tokens == 0  # type: ignore[union-attr]
    assert event.body.input_tokens == 1200  # type: ignore[union-attr]
    assert event.tenant_id == "acme"


def test_examples_are_valid_json_objects() -> None:
    for path in EXAMPLES:
        assert isinstance(json.loads(path.read_text()), dict), path


@pytest.mark.parametrize(
    ("mangle", "code"),
    [
        (lambda b: b[:3], "truncated"),
        (lambda b: b"\x01" + b[1:], "bad_magic"),
        (lambda b: HEADER.pack(0, 4242) + b[5:], "unknown_schema"),
        (lambda b: b[:-5], "corrupt_avro"),
        (lambda b: b + b"\x00\x00", "corrupt_avro"),
    ],
    ids=["truncated", "bad_magic", "unknown_schema", "cut_body", "trailing_bytes"],
)
def test_damaged_wire_bytes_are_named(registry: Registry, mangle, code: str) -> None:  # type: ignore[no-untyped-def]
    good = registry.encode(EVENT_SCHEMA, event_to_avro(event_from_json(load_example(EXAMPLES[0]))))
    for read in (lambda raw: registry.decode(raw, EVENT_SCHEMA), registry.read_event):
        with pytest.raises(InvalidEvent) as info:
            read(mangle(good))
        assert info.value.code == code


def test_an_event_its_emitter_could_not_encode_is_named_with_the_emitters_reason(
    registry: Registry,
) -> None:
    from pipeline.codec import unencodable

    event = event_to_json(event_from_json(load_example(EXAMPLES[0])))
    said = unencodable("OverflowError: Python int too large to convert to C long", event)
    crafted = b'{"vigil_unencodable": "quoted \\ud800 here"}'  # JSON for a lone surrogate
    for raw, reason in [(said, "OverflowError: Python int too large"), (crafted, "quoted")]:
        for read in (lambda r: registry.decode(r, EVENT_SCHEMA), registry.read_event):
            with pytest.raises(InvalidEvent) as info:
                read(raw)
            assert info.value.code == "unencodable"
            assert "its emitter could not encode the event: " + reason in info.value.reason
            info.value.reason.encode()  # fit for a dead letter: no lone surrogate in it
    with pytest.raises(InvalidEvent) as other:
        registry.read_event(b'{"some": "json"}')  # JSON that is not the mark: the wire format
    assert other.value.code == "bad_magic"


def test_dead_letter_bytes_are_not_read_as_an_event(registry: Registry) -> None:
    from datetime import UTC, datetime

    from pipeline.dlq import dead_letter
    from pipeline.rows import Origin

    letter = dead_letter(
        b"x",
        None,
        Origin("t", 0, 1),
        InvalidEvent("bad_magic", "m"),
        stage="validate",
        received_at=datetime.now(UTC),
    )
    wire = registry.encode("vigil.DeadLetter", letter)
    with pytest.raises(InvalidEvent) as info:
        registry.decode(wire, EVENT_SCHEMA)
    assert info.value.code == "wrong_schema"


def test_messages_written_with_the_first_released_schema_stay_readable(registry: Registry) -> None:
    assert registry.name_of[1] == EVENT_SCHEMA and registry.writer_id(EVENT_SCHEMA) > 1
    event = event_from_json(load_example(EXAMPLES[0]))
    record = event_to_avro(event)
    record.pop("redactions")
    out = io.BytesIO()
    out.write(HEADER.pack(0, 1))
    fastavro.schemaless_writer(out, registry.by_id[1], record)
    assert event_from_avro(registry.decode(out.getvalue(), EVENT_SCHEMA)) == event
    assert registry.read_event(out.getvalue()) == event  # resolved by fastavro


def _minimal() -> dict:
    return event_to_avro(event_from_json(load_example(EXAMPLES[0])))


@pytest.mark.parametrize("n", [1, 2, 63, 64, 500, 9000])  # 64 and up: a two-byte count
def test_an_event_batch_carries_its_events_in_order_and_says_how_many(
    registry: Registry, n: int
) -> None:
    events = [registry.encode(EVENT_SCHEMA, {**_minimal(), "event_id": f"e-{i}"}) for i in range(n)]
    batch = registry.encode_batch(events)
    assert registry.is_batch(batch) and not registry.is_batch(events[0])
    assert registry.events_in(batch) == events
    assert registry.event_count(batch) == n


def test_what_is_not_an_event_batch_is_one_message_of_its_own(registry: Registry) -> None:
    single = registry.encode(EVENT_SCHEMA, _minimal())
    for raw in (single, b"", b"\x00\x00\x00\x00\x05", b"not avro at all"):
        assert registry.events_in(raw) == [raw] and registry.event_count(raw) == 1


def test_an_event_batch_that_does_not_decode_is_named(registry: Registry) -> None:
    batch = registry.encode_batch([registry.encode(EVENT_SCHEMA, _minimal())] * 3)
    with pytest.raises(InvalidEvent, match="payload: Avro body does not decode") as err:
        registry.events_in(batch[:-5])
    assert err.value.code == "corrupt_avro"
    assert registry.event_count(batch[:-5]) == 3  # read from the header: the batch's weight


def test_records_in_unions_are_named_and_write_the_bytes_plain_dicts_do(
    registry: Registry,
) -> None:
    event = event_from_json(load_example(EXAMPLES[0]))
    event = dataclasses.replace(
        event,
        unit=Unit("ticket", "T-1"),
        actor=Actor("u-1", "agent"),
        enrichment=Enrichment("priced", "0.25", "2026-01", "sam@acme.example", "ops", True),
    )
    record = event_to_avro(event)
    named = {k: v[0] for k, v in record.items() if isinstance(v, tuple)}
    assert named == {
        "unit": "vigil.Unit",
        "actor": "vigil.Actor",
        "enrichment": "vigil.Enrichment",
        "body": f"vigil.{type(event.body).__name__}",
    }
    plain = {k: (v[1] if k != "body" and isinstance(v, tuple) else v) for k, v in record.items()}
    assert registry.encode(EVENT_SCHEMA, record) == registry.encode(EVENT_SCHEMA, plain)
    assert (
        event_from_avro(registry.decode(registry.encode(EVENT_SCHEMA, record), EVENT_SCHEMA))
        == event
    )


_REGISTRY = Registry.load()
_UNENRICHED = _REGISTRY.encode(  # an event as an emitter writes it: no enrichment
    EVENT_SCHEMA,
    event_to_avro(event_from_json(load_example(ROOT / "schemas/examples/interaction.json"))),
)
_optional_text = st.none() | st.text(max_size=200)  # past 63 bytes a length takes two


@settings(max_examples=300, deadline=None)
@given(
    cost_usd=_optional_text,
    cost_status=st.text(max_size=80),
    price_version=_optional_text,
    owner=_optional_text,
    team=_optional_text,
    registered=st.booleans(),
)
def test_an_enrichment_written_into_an_event_gives_the_bytes_of_the_whole_encode(
    **fields: Any,
) -> None:
    enrichment = Enrichment(**fields)
    event = _REGISTRY.read_event(_UNENRICHED)
    assert event.enrichment is None
    whole = _REGISTRY.encode(
        EVENT_SCHEMA, event_to_avro(dataclasses.replace(event, enrichment=enrichment))
    )
    assert _REGISTRY.with_enrichment(_UNENRICHED, enrichment) == whole


def test_an_enrichment_that_does_not_fit_gets_fastavros_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match="on field owner"):
        _REGISTRY.with_enrichment(_UNENRICHED, Enrichment("none", owner=7))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on field cost_status"):
        _REGISTRY.with_enrichment(_UNENRICHED, Enrichment(None))  # type: ignore[arg-type]
