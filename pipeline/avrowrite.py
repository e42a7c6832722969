"""An Avro body written by Python written for its schema, straight from the pipeline's classes.

The other half of ``pipeline.avroread``. Validate encodes an event whole when it changed more
than its enrichment (redaction did): ``events.event_to_avro`` turned it into dicts, and fastavro
walked the schema for every value it wrote. ``compile_writer`` walks the schema once and writes
the source of one function that reads each value off the objects (a record's fields are their
attributes of the same name) and writes it in place: the writer's bytes are fastavro's
(tests/unit/test_avrowrite.py holds them to it).

It writes records, unions of null and one other type or of records only (the class of the value
names its branch), enums, maps, arrays, strings, bytes, longs, ints, doubles, floats, booleans,
nulls and timestamp-millis from aware datetimes. For anything else ``Unsupported`` tells the
caller to write with fastavro. A value that does not fit its type raises whatever it raises
(TypeError, AttributeError, KeyError, ValueError...): the caller then writes that event with
fastavro, which names what does not fit.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pipeline.avroread import Source, Unsupported

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SHORT_LONGS = [bytes([2 * n]) for n in range(64)]  # 0..63, zig-zag: one byte each


def write_long(n: int) -> bytes:
    """``n`` as an Avro long (a zig-zag varint). Raises ValueError past a 64-bit long."""
    if not -(2**63) <= n < 2**63:
        raise ValueError(f"{n} does not fit a long")
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _Writer(Source):
    def __init__(self, schema: Mapping[str, Any], classes: Mapping[str, type]) -> None:
        super().__init__(schema, {
            "_long": write_long, "_SHORT": SHORT_LONGS, "_EPOCH": _EPOCH,
            "_double": struct.Struct("<d").pack, "_float": struct.Struct("<f").pack,
        })  # fmt: skip
        self.classes = classes

    def value(self, schema: Any, depth: int, source: str) -> None:
        """The code that writes the value named ``source`` (a variable) of ``schema``."""
        schema = self.resolved(schema)
        if isinstance(schema, str):
            return self._primitive(schema, depth, source)
        if isinstance(schema, list):
            return self._union(schema, depth, source)
        kind = schema["type"]
        logical = schema.get("logicalType")
        if logical == "timestamp-millis" and kind == "long":
            since = self.name("d")
            self.emit(depth, f"{since} = {source} - _EPOCH  # TypeError if naive\n"
                             f"a(_long(({since}.days * 86400 + {since}.seconds) * 1000 "
                             f"+ {since}.microseconds // 1000))")  # fmt: skip
        elif logical is not None:
            raise Unsupported(f"logical type {logical!r}")
        elif kind == "record":
            self._record(schema, depth, source)
        elif kind == "enum":
            index = self.constant({symbol: i for i, symbol in enumerate(schema["symbols"])})
            self.emit(depth, f"a(_long({index}[{source}]))")
        elif kind == "map":
            key, item = self.name("k"), self.name("v")
            self.emit(depth, f"if {source}:\n    a(_long(len({source})))\n"
                             f"    for {key}, {item} in {source}.items():")  # fmt: skip
            self._primitive("string", depth + 2, key)
            self.value(schema["values"], depth + 2, item)
            self.emit(depth, 'a(b"\\x00")')
        elif kind == "array":
            item = self.name("v")
            self.emit(depth, f"if {source}:\n    a(_long(len({source})))\n"
                             f"    for {item} in {source}:")  # fmt: skip
            self.value(schema["items"], depth + 2, item)
            self.emit(depth, 'a(b"\\x00")')
        else:
            self._primitive(kind, depth, source)

    def _primitive(self, kind: str, depth: int, source: str) -> None:
        if kind in ("string", "bytes"):
            data = self.name("x")
            encode = ".encode()" if kind == "string" else ""
            self.emit(depth, f"{data} = {source}{encode}\n"
                             f"a(_SHORT[len({data})] if len({data}) < 64 else _long(len({data})))\n"
                             f"a({data})")  # fmt: skip
        elif kind in ("long", "int"):
            self.emit(depth, f"a(_SHORT[{source}] if 0 <= {source} < 64 else _long({source}))")
        elif kind in ("double", "float"):
            self.emit(depth, f"a(_{kind}({source}))")
        elif kind == "boolean":
            self.emit(depth, f'a(b"\\x01" if {source} else b"\\x00")')
        elif kind == "null":
            self.emit(depth, f"if {source} is not None:\n    raise ValueError('not null')")
        else:
            raise Unsupported(f"type {kind!r}")

    def _union(self, branches: list[Any], depth: int, source: str) -> None:
        others = [b for b in branches if b != "null"]
        null = branches.index("null") if "null" in branches else None
        if len(others) == 1 and null is not None:  # the common optional value
            index = branches.index(others[0])
            self.emit(depth, f"if {source} is None:\n    a({SHORT_LONGS[null]!r})\nelse:\n"
                             f"    a({SHORT_LONGS[index]!r})")  # fmt: skip
            self.value(others[0], depth + 1, source)
            return
        resolved = [self.resolved(b) for b in others]
        if not all(isinstance(r, dict) and r.get("type") == "record" for r in resolved):
            raise Unsupported("a union of several types that are not all records")
        kind = self.name("t")
        self.emit(depth, f"{kind} = type({source})")
        test = "if"
        if null is not None:
            self.emit(depth, f"if {source} is None:\n    a({SHORT_LONGS[null]!r})")
            test = "elif"
        for i, branch in enumerate(branches):
            if branch == "null":
                continue
            record = self.resolved(branch)["name"]
            cls = self.classes.get(record)
            if cls is None:
                raise Unsupported(f"no class is given for record {record}")
            self.emit(depth, f"{test} {kind} is {self.constant(cls)}:\n    a({SHORT_LONGS[i]!r})")
            self.value(branch, depth + 1, source)
            test = "elif"
        self.emit(depth, f"else:\n    raise ValueError('{{}} is none of the union'.format({kind}))")

    def _record(self, schema: Mapping[str, Any], depth: int, source: str) -> None:
        for field, f in zip(self.enter(schema), schema["fields"], strict=True):
            value = self.name("v")
            self.emit(depth, f"{value} = {source}.{field}")
            self.value(f["type"], depth, value)
        self.leave()


def compile_writer(
    schema: Mapping[str, Any], classes: Mapping[str, type]
) -> Callable[[Any], bytes]:
    """A function that writes an object as a record of ``schema`` (a record as fastavro's
    ``parse_schema`` or ``load_schema`` leaves it): each field is the object's attribute of
    that name. ``classes``: the class of each record that is a branch of a union of records,
    by full name. Raises Unsupported (above)."""
    source = _Writer(schema, classes)
    source.emit(0, "def write(record):\n    out = []\n    a = out.append")
    source.value(schema, 1, "record")
    source.emit(1, 'return b"".join(out)')
    write: Callable[[Any], bytes] = source.function("write", f"avro writer of {schema['name']}")
    return write
