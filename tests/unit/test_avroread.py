"""The reader written for the vigil.Event schema (``pipeline.avroread``, through
``Registry.read_event``) reads what fastavro reads, into the same Event, and refuses what
fastavro refuses."""

from __future__ import annotations

import io
import random
from dataclasses import FrozenInstanceError, dataclass, fields, replace
from datetime import UTC, datetime

import fastavro
import pytest
from hypothesis import given, settings

from pipeline.avroread import Unsupported, compile_reader
from pipeline.codec import EVENT_SCHEMA, HEADER, Registry
from pipeline.events import (
    AVRO_CLASSES,
    AVRO_MAKERS,
    Actor,
    Drift,
    Enrichment,
    Event,
    Interaction,
    InvalidEvent,
    Redaction,
    Unit,
    event_from_avro,
    event_to_avro,
    filled,
)
from pipeline.workload import generate
from tests.event_strategies import events


def _interaction(base: Event) -> Event:
    """``base`` as an interaction with every optional field set, enriched and redacted."""
    body = Interaction("openai", "gpt-4o", "chat", 5400, 310, 2048, 0, 12, 812.5, "error",
                       "timeout", "length", "search", "my email is [EMAIL]", "sure", 0.0131)  # fmt: skip
    return replace(
        base,
        kind="interaction",
        body=body,
        trace_id="t" * 32,
        span_id="s" * 16,
        actor=Actor("user-1", "agent"),
        attributes={f"k{i}": "v" * i for i in range(70)},
        redactions=(Redaction("body.input_text", "email", 1),),
        enrichment=Enrichment("priced", "0.0131", "2026-11", "sam@acme.example", "ops", True),
    )


def _fastavro_read(registry: Registry, raw: bytes) -> Event:
    return event_from_avro(registry.decode(raw, EVENT_SCHEMA))


def _outcome(read, raw: bytes) -> tuple[str, Event | None]:  # type: ignore[no-untyped-def]
    try:
        return "read", read(raw)
    except InvalidEvent as exc:
        return exc.code, None


@settings(max_examples=400, deadline=None)
@given(event=events())
def test_any_event_reads_back_as_fastavro_reads_it(registry: Registry, event: Event) -> None:
    raw = registry.encode(EVENT_SCHEMA, event_to_avro(event))
    assert registry.read_event(raw) == event == _fastavro_read(registry, raw)


def test_damaged_bytes_are_refused_as_fastavro_refuses_them(registry: Registry) -> None:
    """Every truncation, and 100 bytes overwritten at random, of events of every kind. Each
    is refused by both readers, or read by both as the same event; with one exception, where
    fastavro is wrong: it takes a negative union index as counting from the end."""
    rng = random.Random(7)
    events = generate(400, datetime.now(UTC), seed=3, run_id="fuzz", bad_fraction=0.0).events
    picked = {e.kind: e for e in events} | {"first": events[0]}
    picked["interaction"] = _interaction(events[0])
    assert len(picked) == 6
    checked = refused = 0
    for event in picked.values():
        good = registry.encode(EVENT_SCHEMA, event_to_avro(event))
        damaged = [good[:n] for n in range(len(good))]
        for _ in range(100):
            at = rng.randrange(HEADER.size, len(good))
            damaged.append(good[:at] + bytes([rng.randrange(256)]) + good[at + 1 :])
        for raw in damaged:
            ours, theirs = (
                _outcome(registry.read_event, raw),
                _outcome(lambda r: _fastavro_read(registry, r), raw),
            )
            checked += 1
            if ours == theirs:
                refused += ours[0] != "read"
                continue
            if theirs[0] == "read":  # read by fastavro alone: a negative union index
                with pytest.raises(InvalidEvent, match=r"index -\d+ before byte \d+ is not one of"):
                    registry.read_event(raw)
                continue
            # both refuse, for reasons found in a different order
            assert {ours[0], theirs[0]} <= {"corrupt_avro", "invalid_utf8", "truncated"}, raw
            refused += 1
    assert checked > 1000 and refused > checked // 2


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda b: b + b"\x00\x00", "payload: 2 trailing bytes after the record"),
        (lambda b: b[:-9], r"payload: Avro body does not decode \(.*"),
    ],
    ids=["trailing", "cut"],
)
def test_a_body_that_does_not_end_with_its_record_is_named(
    registry: Registry,
    mangle,  # type: ignore[no-untyped-def]
    reason: str,
) -> None:
    event = generate(1, datetime.now(UTC), seed=1, run_id="x", bad_fraction=0.0).events[0]
    raw = mangle(registry.encode(EVENT_SCHEMA, event_to_avro(event)))
    with pytest.raises(InvalidEvent, match=reason) as err:
        registry.read_event(raw)
    assert err.value.code == "corrupt_avro"


def _written(schema: dict, record: dict) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return out.getvalue()


_TAGS = {"type": "record", "name": "Tags", "fields": [
    {"name": "tags", "type": {"type": "map", "values": "string"}},
    {"name": "note", "type": "string"},
]}  # fmt: skip


def _tags(**fields: object) -> dict[str, object]:
    return fields


def test_a_maker_is_given_the_fields_by_position_only_where_it_takes_them_in_order() -> None:
    """A call by position is faster than by name; a maker whose parameters stand in another
    order than the record's fields, or that takes them only by name, gets them by name."""
    raw = _written(_TAGS, {"tags": {"a": "b"}, "note": "n"})

    def in_order(tags: dict[str, str], note: str) -> tuple[object, ...]:
        return ("in order", tags, note)

    def turned(note: str, tags: dict[str, str]) -> tuple[object, ...]:
        return ("turned", tags, note)

    def named(*, tags: dict[str, str], note: str) -> tuple[object, ...]:
        return ("named", tags, note)

    for maker, call in ((in_order, "(v1, v5)"), (turned, "(tags=v1, note=v5)"),
                        (named, "(tags=v1, note=v5)"), (_tags, "(tags=v1, note=v5)")):  # fmt: skip
        read = compile_reader(fastavro.parse_schema(_TAGS), {"Tags": maker})
        assert call in read.source  # type: ignore[attr-defined]
        expected = {"tags": {"a": "b"}, "note": "n"} if maker is _tags else (
            maker.__name__.replace("_", " "), {"a": "b"}, "n")  # fmt: skip
        assert read(raw, 0) == expected


def test_a_block_counting_more_entries_than_bytes_left_is_refused_at_once() -> None:
    read = compile_reader(fastavro.parse_schema(_TAGS), {"Tags": _tags})
    raw = _written(_TAGS, {"tags": {"a": "b"}, "note": "n"})
    assert read(raw, 0) == {"tags": {"a": "b"}, "note": "n"}
    # a count of 2**40 entries (a zig-zag varint) where 7 bytes are left: refused before the
    # first entry is read, not after 2**40 of them
    huge = bytes([0x80, 0x80, 0x80, 0x80, 0x80, 0x40])
    with pytest.raises(ValueError, match=f"a block at byte 6 counts {2**40} entries in 7 bytes"):
        read(huge + raw[1:], 0)
    # the note's length (its second-last byte) says 5 where one byte follows
    with pytest.raises(ValueError, match=r"5 bytes at byte 7 run past the end \(8 bytes\)"):
        read(raw[:-2] + b"\x0a" + raw[-1:], 0)


def test_what_it_does_not_read_is_left_to_fastavro() -> None:
    decimal = {**_TAGS, "fields": [{"name": "price", "type": {
        "type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}}]}  # fmt: skip
    with pytest.raises(Unsupported, match="logical type 'decimal'"):
        compile_reader(fastavro.parse_schema(decimal), {"Tags": _tags})
    with pytest.raises(Unsupported, match="no class is given for record Tags"):
        compile_reader(fastavro.parse_schema(_TAGS), {})
    linked = {"type": "record", "name": "Node", "fields": [
        {"name": "next", "type": ["null", "Node"]}]}  # fmt: skip
    with pytest.raises(Unsupported, match="record Node contains itself"):
        compile_reader(fastavro.parse_schema(linked), {"Node": _tags})
    nulls = {**_TAGS, "fields": [{"name": "gaps", "type": {"type": "array", "items": "null"}}]}
    with pytest.raises(Unsupported, match="an array of items that may take no bytes"):
        compile_reader(fastavro.parse_schema(nulls), {"Tags": _tags})
    keyword = {**_TAGS, "fields": [{"name": "from", "type": "string"}]}
    with pytest.raises(Unsupported, match="field 'from' is no Python name"):
        compile_reader(fastavro.parse_schema(keyword), {"Tags": _tags})


def test_a_class_that_does_not_take_its_records_fields_is_named(registry: Registry) -> None:
    def unit(type: str) -> Unit:  # no id
        return Unit(type, "")

    schema = registry.by_id[registry.writer_id(EVENT_SCHEMA)]
    with pytest.raises(ValueError, match=r"record vigil\.Unit: unit does not take its fields"):
        compile_reader(schema, {**AVRO_CLASSES, "vigil.Unit": unit})


@pytest.mark.parametrize(
    ("kind", "body", "code"),
    [
        ("cost", Drift("m", 1.0), "kind_mismatch"),
        ("telemetry", Drift("m", 1.0), "unknown_kind"),
    ],
)
def test_an_envelope_and_body_that_disagree_are_named_by_both_readers(
    registry: Registry, kind: str, body: Drift, code: str
) -> None:
    event = generate(1, datetime.now(UTC), seed=1, run_id="x", bad_fraction=0.0).events[0]
    record = {**event_to_avro(event), "kind": kind, "body": ("vigil.Drift", {
        "metric": body.metric, "value": body.value, "category": None})}  # fmt: skip
    raw = registry.encode(EVENT_SCHEMA, record)
    refused = []
    for read in (registry.read_event, lambda r: _fastavro_read(registry, r)):
        with pytest.raises(InvalidEvent) as err:
            read(raw)
        refused.append((err.value.code, str(err.value)))
    assert refused[0] == refused[1] and refused[0][0] == code


def test_a_filled_object_is_the_one_its_class_makes() -> None:
    """``filled`` (what the reader builds records with) makes what the class's own __init__
    makes from the same fields, by name or in order, as frozen; a field left out is refused,
    not defaulted."""
    for name, cls in [*AVRO_CLASSES.items(), ("vigil.Event", Event)]:
        if not isinstance(cls, type):
            continue
        values = {f.name: f"{f.name}-{i}" for i, f in enumerate(fields(cls))}  # each its own
        made = filled(cls)(**values)
        assert type(made) is cls and made == cls(**values) == filled(cls)(*values.values()), name
        assert {f.name: getattr(made, f.name) for f in fields(cls)} == values
        with pytest.raises(FrozenInstanceError):
            made.__setattr__(fields(cls)[0].name, "changed")
        with pytest.raises(TypeError):
            filled(cls)(**dict(list(values.items())[1:]))
    assert AVRO_MAKERS.keys() == AVRO_CLASSES.keys()

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(slots=True)
    class NotFrozen:
        a: int

    for cls in (NoSlots, NotFrozen, int):
        with pytest.raises(TypeError, match=r"not a frozen dataclass|not a slot"):
            filled(cls)
