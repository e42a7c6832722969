"""The writer written for the vigil.Event schema (``pipeline.avrowrite``, through
``Registry.encode_event``) writes the bytes fastavro writes, and leaves to fastavro what it does
not write."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import fastavro
import pytest
from hypothesis import given, settings

from pipeline.avroread import Unsupported
from pipeline.avrowrite import compile_writer
from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.events import Event, Interaction, event_to_avro
from tests.event_strategies import events


@settings(max_examples=400, deadline=None)
@given(event=events())
def test_any_event_is_written_as_fastavro_writes_it(registry: Registry, event: Event) -> None:
    written = registry.encode_event(event)
    assert written == registry.encode(EVENT_SCHEMA, event_to_avro(event))
    assert registry.read_event(written) == event


_EVENT = Event("e-1", "interaction", datetime(2026, 11, 1, 12, 30, tzinfo=UTC), "acme", "bot",
               Interaction("openai", "gpt-4o", input_tokens=12))  # fmt: skip


def test_what_does_not_fit_is_left_to_fastavro_which_names_it(registry: Registry) -> None:
    naive = dataclasses.replace(_EVENT, ts=_EVENT.ts.replace(tzinfo=None))
    # the compiled writer refuses a naive time; fastavro takes it as local time, as before
    assert registry.encode_event(naive) == registry.encode(EVENT_SCHEMA, event_to_avro(naive))
    too_big = dataclasses.replace(_EVENT, body=Interaction("openai", "gpt-4o", input_tokens=2**64))
    for encode in (
        registry.encode_event,
        lambda e: registry.encode(EVENT_SCHEMA, event_to_avro(e)),
    ):
        with pytest.raises((ValueError, OverflowError)):
            encode(too_big)


def test_what_it_does_not_write_is_named() -> None:
    record = {"type": "record", "name": "R", "fields": [
        {"name": "when", "type": {"type": "int", "logicalType": "date"}}]}  # fmt: skip
    with pytest.raises(Unsupported, match="logical type 'date'"):
        compile_writer(fastavro.parse_schema(record), {})
    mixed = {"type": "record", "name": "R", "fields": [{"name": "v", "type": ["string", "long"]}]}
    with pytest.raises(Unsupported, match="not all records"):
        compile_writer(fastavro.parse_schema(mixed), {})
    of_records = {"type": "record", "name": "R", "fields": [{"name": "v", "type": [
        {"type": "record", "name": "A", "fields": []},
        {"type": "record", "name": "B", "fields": []}]}]}  # fmt: skip
    with pytest.raises(Unsupported, match="no class is given for record A"):
        compile_writer(fastavro.parse_schema(of_records), {})
    keyword = {"type": "record", "name": "R", "fields": [{"name": "class", "type": "string"}]}
    with pytest.raises(Unsupported, match="field 'class' is no Python name"):
        compile_writer(fastavro.parse_schema(keyword), {})
