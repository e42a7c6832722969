"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body.

Schema ids come from a local registry file (``schemas/registry.json``) so that a Schema
Registry can be put in front later without changing a byte on the wire. Pure: no I/O after
``Registry.load``.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import load_schema

from pipeline.avroread import Misfit, Unsupported, compile_reader, read_long
from pipeline.avrowrite import compile_writer
from pipeline.events import (
    AVRO_CLASSES,
    AVRO_MAKERS,
    Enrichment,
    Event,
    InvalidEvent,
    enrichment_to_avro,
    event_from_avro,
    event_to_avro,
)

MAGIC = 0
HEADER = struct.Struct(">bI")
# What an emitter publishes in place of an event it could not encode (a number past 64 bits, a
# lone surrogate in a string: ``unencodable``), so that the pipeline keeps it in the DLQ with
# the emitter's reason rather than the client dropping it, or the batch around it.
UNENCODABLE_MARK = b'{"vigil_unencodable":'


# what the encoder raises for a value the schema cannot hold
ENCODE_ERRORS = (ValueError, TypeError, OverflowError)


def encode_failure(exc: Exception) -> str:
    """Why an event could not be encoded, fit for a dead letter: a reason may quote the value
    (a lone surrogate), escaped here."""
    return _escaped(f"{type(exc).__name__}: {exc}")


def _escaped(text: str) -> str:
    return text[:1000].encode("utf-8", "backslashreplace").decode()


def unencodable(reason: str, event: Mapping[str, Any]) -> bytes:
    """The raw message standing for an event (its JSON form) that could not be encoded."""
    doc = {"vigil_unencodable": reason[:1000], "event": event}
    return json.dumps(doc, default=str).encode()


SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
EVENT_SCHEMA = "vigil.Event"
DEAD_LETTER_SCHEMA = "vigil.DeadLetter"
EVENT_BATCH_SCHEMA = "vigil.EventBatch"


@dataclass(frozen=True)
class Registry:
    """Schema ids <-> parsed Avro schemas. ``writer_id(name)`` is the id new messages use;
    every id stays readable, decoded with the newest schema of its name as the reader."""

    by_id: Mapping[int, Any]
    name_of: Mapping[int, str]
    current: Mapping[str, int]

    @classmethod
    def load(cls, path: Path | None = None) -> Registry:
        """Read the registry file and parse every schema it names. Raises ValueError on a
        registry that reuses an id or names a file that does not parse."""
        path = path or SCHEMAS_DIR / "registry.json"
        entries = json.loads(path.read_text())["schemas"]
        by_id: dict[int, Any] = {}
        name_of: dict[int, str] = {}
        current: dict[str, int] = {}
        for entry in entries:
            schema_id = int(entry["id"])
            if schema_id in by_id:
                raise ValueError(f"{path}: schema id {schema_id} is used twice")
            by_id[schema_id] = load_schema(str(path.parent / entry["file"]))
            name_of[schema_id] = entry["name"]
            current[entry["name"]] = max(schema_id, current.get(entry["name"], 0))
        return cls(by_id=by_id, name_of=name_of, current=current)

    def writer_id(self, name: str) -> int:
        return self.current[name]

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Record -> wire bytes with the current schema of ``name``. Raises ValueError
        (from fastavro) when the record does not fit the schema."""
        schema_id = self.current[name]
        out = io.BytesIO()
        out.write(HEADER.pack(MAGIC, schema_id))
        fastavro.schemaless_writer(out, self.by_id[schema_id], record)
        return out.getvalue()

    @cached_property
    def _enrichment_writer(self) -> Callable[[Enrichment], bytes]:
        """A writer of the current vigil.Event's ``enrichment`` record."""
        fields = self.by_id[self.current[EVENT_SCHEMA]]["fields"]
        field = next(f for f in fields if f["name"] == "enrichment")
        record = next(branch for branch in field["type"] if branch != "null")
        return _object_writer(record, {}, enrichment_to_avro)

    def with_enrichment(self, raw: bytes, enrichment: Enrichment) -> bytes | None:
        """``raw``, an event written with the current vigil.Event schema and no enrichment, with
        ``enrichment`` written in place of that null (its last field), at a fraction of the cost
        of encoding the enriched event whole. The bytes decode to that event; they are the
        bytes ``encode`` gives where ``raw`` was written as fastavro writes (Vigil's emitters
        do), since Avro lets a writer split arrays and maps into blocks differently. None if
        ``raw`` is not such an event: another schema id, or its last byte is not a null's
        one-byte union index. Raises what fastavro raises (ValueError, TypeError: naming the
        field) if ``enrichment`` does not fit."""
        header = self._event_header
        # the byte before a lone 0 must end a varint (high bit clear), else the 0 is the end of
        # a longer encoding of the index, not all of it
        if not raw.startswith(header) or len(raw) < HEADER.size + 2 or raw[-1] or raw[-2] & 0x80:
            return None
        # the union's second branch, zig-zag encoded (2), then the record
        return b"".join((raw[:-1], b"\x02", self._enrichment_writer(enrichment)))

    def encode_batch(self, events: Sequence[bytes]) -> bytes:
        """Wire-format events (as ``encode(EVENT_SCHEMA, ...)`` made them) -> one EventBatch."""
        return self.encode(EVENT_BATCH_SCHEMA, {"events": events})

    def is_batch(self, raw: bytes) -> bool:
        """Whether ``raw`` names the EventBatch schema in its header (nothing else is read)."""
        return (
            len(raw) > HEADER.size
            and raw[0] == MAGIC
            and self.name_of.get(HEADER.unpack_from(raw)[1]) == EVENT_BATCH_SCHEMA
        )

    def events_in(self, raw: bytes) -> list[bytes]:
        """The events a clean-topic message carries: an EventBatch's elements, else the message
        itself (one event, as the clean topic held before batches; what is not an event fails
        its own decode later). Raises InvalidEvent (as ``decode``) if a batch does not decode."""
        if not self.is_batch(raw):
            return [raw]
        return list(self.decode(raw, EVENT_BATCH_SCHEMA)["events"])

    def event_count(self, raw: bytes) -> int:
        """How many events ``events_in(raw)`` would return, read from the batch's first block
        header without decoding the batch (at least 1: a batch that does not decode is one
        dead letter)."""
        if not self.is_batch(raw):
            return 1
        try:
            count, _ = read_long(raw, HEADER.size)
        except (IndexError, ValueError):  # cut short: one dead letter
            return 1
        return max(1, abs(count))  # a negative block count is followed by the block's size

    def decode(self, raw: bytes, expect: str) -> dict[str, Any]:
        """Wire bytes -> record read with the newest schema of ``expect``.

        Raises InvalidEvent with code truncated, bad_magic, unknown_schema, wrong_schema,
        corrupt_avro or invalid_utf8 — each saying what was wrong with the bytes.
        """
        schema_id = self._schema_id(raw, expect)
        # resolve only an older writer's schema: resolution costs more than the read itself
        reader = None if schema_id == self.current[expect] else self.by_id[self.current[expect]]
        body = io.BytesIO(raw[HEADER.size :])
        try:
            record = fastavro.schemaless_reader(
                body, self.by_id[schema_id], reader, return_record_name=True,
                return_record_name_override=True,
            )  # fmt: skip
        except _UNDECODABLE as exc:
            raise _undecodable(exc) from exc
        if body.tell() != len(raw) - HEADER.size:
            raise InvalidEvent(
                "corrupt_avro",
                f"payload: {len(raw) - HEADER.size - body.tell()} trailing bytes after the record",
            )
        if not isinstance(record, dict):
            raise InvalidEvent("corrupt_avro", "payload: Avro body is not a record")
        return record

    def read_event(self, raw: bytes) -> Event:
        """Wire bytes -> the Event they hold: ``event_from_avro(decode(raw, EVENT_SCHEMA))``,
        in 60% of its time where ``raw`` was written with the current vigil.Event schema
        (``pipeline.avroread``). Raises InvalidEvent as ``decode`` and ``event_from_avro``."""
        read = self._event_reader
        if read is None or self._schema_id(raw, EVENT_SCHEMA) != self.current[EVENT_SCHEMA]:
            return event_from_avro(self.decode(raw, EVENT_SCHEMA))
        try:
            event: Event = read(raw, HEADER.size)
        except InvalidEvent:  # the event's kind and body disagree
            raise
        except _UNDECODABLE as exc:
            raise _undecodable(exc) from exc
        return event

    def encode_checked(self, event: Event) -> bytes:
        """``encode_event``. Raises InvalidEvent('unencodable') for an event the schema cannot
        hold (a number past 64 bits, a lone surrogate in a string)."""
        try:
            return self.encode_event(event)
        except ENCODE_ERRORS as exc:
            why = f"the event does not fit the event schema: {encode_failure(exc)}"
            raise InvalidEvent("unencodable", why) from None

    def encode_event(self, event: Event) -> bytes:
        """``encode(EVENT_SCHEMA, event_to_avro(event))``, in a fraction of its time: written by
        ``pipeline.avrowrite`` for the current vigil.Event schema, and by fastavro where that
        does not write it (the same bytes, or fastavro's error for what does not fit)."""
        return self._event_header + self._event_writer(event)

    @cached_property
    def _event_header(self) -> bytes:
        return HEADER.pack(MAGIC, self.current[EVENT_SCHEMA])

    @cached_property
    def _event_writer(self) -> Callable[[Event], bytes]:
        classes = {name: c for name, c in AVRO_CLASSES.items() if isinstance(c, type)}
        return _object_writer(self.by_id[self.current[EVENT_SCHEMA]], classes, event_to_avro)

    @cached_property
    def _event_reader(self) -> Callable[[bytes, int], Any] | None:
        try:
            return compile_reader(self.by_id[self.current[EVENT_SCHEMA]], AVRO_MAKERS)
        except Unsupported:
            return None

    def _schema_id(self, raw: bytes, expect: str) -> int:
        """The schema id ``raw``'s header names, one of ``expect``'s. Raises InvalidEvent."""
        if len(raw) < HEADER.size + 1:
            raise InvalidEvent("truncated", f"payload: {len(raw)} bytes is shorter than a header")
        magic, schema_id = HEADER.unpack_from(raw)
        if magic != MAGIC and raw.startswith(UNENCODABLE_MARK):
            reason = _unencodable_reason(raw)
            code = "oversized" if reason.startswith(_OVERSIZED) else "unencodable"
            raise InvalidEvent(code, f"payload: {reason}")
        if magic != MAGIC:
            raise InvalidEvent(
                "bad_magic", f"payload: magic byte is {magic}, expected 0 (Confluent wire format)"
            )
        if schema_id not in self.by_id:
            raise InvalidEvent(
                "unknown_schema", f"payload: schema id {schema_id} is not registered"
            )
        if self.name_of[schema_id] != expect:
            raise InvalidEvent(
                "wrong_schema",
                f"payload: schema id {schema_id} is {self.name_of[schema_id]}, expected {expect}",
            )
        return int(schema_id)


# what a reader raises for bytes that do not decode
_UNDECODABLE = (EOFError, ValueError, IndexError, TypeError, OverflowError, struct.error)


def _undecodable(exc: Exception) -> InvalidEvent:
    """What a reader raised for bad bytes -> InvalidEvent, invalid_utf8 or corrupt_avro."""
    if isinstance(exc, Misfit):
        return InvalidEvent("corrupt_avro", f"payload: {exc}")
    if isinstance(exc, UnicodeDecodeError):
        return InvalidEvent("invalid_utf8", f"payload: a string is not valid UTF-8 ({exc.reason})")
    return InvalidEvent(
        "corrupt_avro", f"payload: Avro body does not decode ({str(exc) or type(exc).__name__})"
    )


def _object_writer(
    schema: Mapping[str, Any], classes: Mapping[str, type], to_avro: Callable[[Any], Any]
) -> Callable[[Any], bytes]:
    """A writer of an object as the body of a record of ``schema``: by the function
    ``pipeline.avrowrite`` writes for it (``classes`` as it takes them), and by fastavro, of
    ``to_avro(obj)``, where that does not compile or does not write the object. The same bytes
    either way, or fastavro's error (ValueError, TypeError) naming what does not fit."""
    by_fastavro = _fastavro_writer(schema)

    def fallback(obj: Any) -> bytes:
        return by_fastavro(to_avro(obj))

    try:
        compiled = compile_writer(schema, classes)
    except Unsupported:
        return fallback

    def write(obj: Any) -> bytes:
        try:
            return compiled(obj)
        except Exception:  # fastavro names what does not fit
            return fallback(obj)

    return write


def _fastavro_writer(schema: Any) -> Callable[[Mapping[str, Any]], bytes]:
    parsed = fastavro.parse_schema(schema)

    def write(record: Mapping[str, Any]) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, parsed, record)
        return out.getvalue()

    return write


# how ``_unencodable_reason`` begins for an event its emitter found too large to send
OVERSIZED_MARK = "oversized: "
_OVERSIZED = f"its emitter could not encode the event: {OVERSIZED_MARK}"


def _unencodable_reason(raw: bytes) -> str:
    """Why the emitter of an ``unencodable`` message could not encode its event."""
    try:
        reason = json.loads(raw)["vigil_unencodable"]
    except (ValueError, KeyError, TypeError):
        return "an event its emitter could not encode (no reason readable)"
    # a payload's word, escaped as encode_failure escapes, so it can be written into a dead letter
    return f"its emitter could not encode the event: {_escaped(str(reason))}"
