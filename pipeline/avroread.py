"""An Avro body read by Python written for its schema, straight into the pipeline's classes.

fastavro reads a record by walking its schema for every value it reads: a dispatch on the
type's name, a look-up of its logical type, a dict for every record. It read a vigil.Event in
15-17 µs that way, and turning those dicts into an Event (``events.event_from_avro``) took 4-5
µs more. ``compile_reader`` walks the schema once, the first time it is needed, and writes the
source of one function that reads the values in the order they stand, with the common one-byte
lengths, longs and union indexes read in place, and that builds each record by calling the
class given for its name (docs/benchmarks.md, "An Event read and written by Python written for
its schema").

It reads records, unions, enums, maps, arrays, strings, bytes, longs, ints, doubles, floats,
booleans, nulls and the logical type timestamp-millis, with the writer's own schema only. For
anything else (another logical type, a named type that contains itself, a message written
with an older schema, which needs resolving) ``Unsupported`` tells the caller to read with
fastavro, which Vigil reads those with.

Bad bytes raise ValueError, IndexError, struct.error, OverflowError or UnicodeDecodeError. The
reader notices a string that runs past the end, and a record that does not end where the body
does (``Misfit``). It never loops longer than the bytes allow: a block of a map or an array
that counts more entries than there are bytes left is refused, since every entry takes at
least one byte (an array of items that may take none is Unsupported).
"""

from __future__ import annotations

import inspect
import keyword
import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_VARINT_BYTES = 10  # a 64-bit long, 7 bits a byte


class Unsupported(ValueError):
    """The schema holds what ``compile_reader`` does not read: read it with fastavro."""


class Misfit(ValueError):
    """The body does not end where its record does."""


def read_long(b: bytes, p: int) -> tuple[int, int]:
    """The Avro long (a zig-zag varint) at ``p`` and where it ends. Raises IndexError if the
    bytes end first, ValueError past 10 bytes."""
    n = shift = 0
    for end in range(p, p + _MAX_VARINT_BYTES):
        byte = b[end]
        n |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (n >> 1) ^ -(n & 1), end + 1
        shift += 7
    raise ValueError(f"a varint at byte {p} is longer than {_MAX_VARINT_BYTES} bytes")


def _length(b: bytes, p: int) -> tuple[int, int]:
    """The length of a string or bytes at ``p``, and where the value starts."""
    n, start = read_long(b, p)
    if n < 0:
        raise ValueError(f"a length at byte {p} is negative ({n})")
    return n, start


def _block(b: bytes, p: int) -> tuple[int, int]:
    """The count of entries in the map or array block at ``p`` (0 ends the map or array), and
    where its entries start."""
    count, p = read_long(b, p)
    if count < 0:  # a negative count is followed by the block's size in bytes
        count = -count
        _, p = read_long(b, p)
    if count > len(b) - p:
        raise ValueError(f"a block at byte {p} counts {count} entries in {len(b) - p} bytes")
    return count, p


def _no_branch(index: int, branches: int, at: int) -> None:
    raise ValueError(f"index {index} before byte {at} is not one of the {branches} branches")


def _past_end(p: int, n: int, size: int) -> None:
    raise ValueError(f"{n} bytes at byte {p} run past the end ({size} bytes)")


def _misfit(b: bytes, p: int) -> None:
    if p < len(b):
        raise Misfit(f"{len(b) - p} trailing bytes after the record")
    raise Misfit(f"the record runs {p - len(b)} bytes past the end")


class Source:
    """The lines of a function's source, written for a schema, and what its names stand for.
    Shared with ``pipeline.avrowrite``."""

    def __init__(self, schema: Mapping[str, Any], scope: Mapping[str, Any]) -> None:
        self.lines: list[str] = []
        self.scope = dict(scope)
        self.named: Mapping[str, Any] = schema.get("__named_schemas", {})
        self._count = 0
        self._within: list[str] = []  # the records being written, outermost first

    def name(self, what: str) -> str:
        self._count += 1
        return f"{what}{self._count}"

    def constant(self, value: Any) -> str:
        name = self.name("_c")
        self.scope[name] = value
        return name

    def emit(self, depth: int, text: str) -> None:
        self.lines += ["    " * depth + line for line in text.splitlines()]

    def resolved(self, schema: Any) -> Any:
        """``schema``, or the named type it names."""
        return self.named.get(schema, schema) if isinstance(schema, str) else schema

    def enter(self, record: Mapping[str, Any]) -> list[str]:
        """Begins writing ``record``: its field names. Raises Unsupported for a record inside
        itself or a field that is no Python name; ``leave`` ends it."""
        name = record["name"]
        if name in self._within:
            raise Unsupported(f"record {name} contains itself")
        fields = [f["name"] for f in record["fields"]]
        if bad := [f for f in fields if not f.isidentifier() or keyword.iskeyword(f)]:
            raise Unsupported(f"record {name}: field {bad[0]!r} is no Python name")
        self._within.append(name)
        return fields

    def leave(self) -> None:
        self._within.pop()

    def function(self, name: str, title: str) -> Any:
        """The function ``name`` the lines define, its source kept as its ``source``."""
        text = "\n".join(self.lines)
        scope = dict(self.scope)
        exec(compile(text, f"<{title}>", "exec"), scope)
        function = scope[name]
        function.source = text  # for a person reading what it does
        return function


class _Reader(Source):
    def __init__(self, schema: Mapping[str, Any], makers: Mapping[str, Callable[..., Any]]):
        super().__init__(schema, {
            "_long": read_long, "_length": _length, "_block": _block, "_no_branch": _no_branch,
            "_misfit": _misfit, "_past_end": _past_end, "_double": struct.Struct("<d").unpack_from,
            "_float": struct.Struct("<f").unpack_from, "_EPOCH": _EPOCH, "_timedelta": timedelta,
        })  # fmt: skip
        self.makers = makers

    def index(self, depth: int, target: str) -> None:
        """A long (a union's or an enum's index) into ``target``, one byte read in place."""
        self.emit(depth, f"{target} = b[p]\nif {target} < 128:\n    p += 1\n"
                         f"    {target} = ({target} >> 1) ^ -({target} & 1)\n"
                         f"else:\n    {target}, p = _long(b, p)")  # fmt: skip

    def value(self, schema: Any, depth: int, target: str, top: bool = False) -> None:
        """The code that reads one value of ``schema`` into ``target``."""
        schema = self.resolved(schema)
        if isinstance(schema, str):
            return self._primitive(schema, depth, target)
        if isinstance(schema, list):
            return self._union(schema, depth, target)
        kind = schema["type"]
        logical = schema.get("logicalType")
        if logical == "timestamp-millis" and kind == "long":
            self.index(depth, target)
            self.emit(depth, f"{target} = _EPOCH + _timedelta(0, 0, 0, {target})  # milliseconds")
        elif logical is not None:
            raise Unsupported(f"logical type {logical!r}")
        elif kind == "record":
            self._record(schema, depth, target, top)
        elif kind == "enum":
            symbols = self.constant(tuple(schema["symbols"]))
            self.index(depth, target)
            self.emit(depth, f"if not 0 <= {target} < {len(schema['symbols'])}:\n"
                             f"    _no_branch({target}, {len(schema['symbols'])}, p)\n"
                             f"{target} = {symbols}[{target}]")  # fmt: skip
        elif kind in ("map", "array"):
            self._repeated(schema, depth, target)
        else:
            self._primitive(kind, depth, target)

    def _primitive(self, kind: str, depth: int, target: str) -> None:
        if kind in ("string", "bytes"):
            decode = ".decode()" if kind == "string" else ""
            self.emit(depth, "n = b[p]\nif n < 128 and not n & 1:  # short, not negative\n"
                             "    n >>= 1\n    p += 1\nelse:\n    n, p = _length(b, p)\n"
                             "if p + n > size:\n    _past_end(p, n, size)\n"
                             f"{target} = b[p : p + n]{decode}\np += n")  # fmt: skip
        elif kind in ("long", "int"):
            self.index(depth, target)
        elif kind in ("double", "float"):
            size = 8 if kind == "double" else 4
            self.emit(depth, f"{target} = _{kind}(b, p)[0]\np += {size}")
        elif kind == "boolean":
            self.emit(depth, f"{target} = b[p] != 0\np += 1")
        elif kind == "null":
            self.emit(depth, f"{target} = None")
        else:
            raise Unsupported(f"type {kind!r}")

    def _union(self, branches: list[Any], depth: int, target: str) -> None:
        self.index(depth, "u")
        for i, branch in enumerate(branches):
            self.emit(depth, f"{'if' if i == 0 else 'elif'} u == {i}:")
            self.value(branch, depth + 1, target)
        self.emit(depth, f"else:\n    _no_branch(u, {len(branches)}, p)")

    def _repeated(self, schema: Mapping[str, Any], depth: int, target: str) -> None:
        count, item = self.name("c"), self.name("v")
        is_map = schema["type"] == "map"
        if not is_map and self._may_be_empty(schema["items"]):
            raise Unsupported("an array of items that may take no bytes")  # see _block
        self.emit(depth, f"{target} = {{}}" if is_map else f"{target} = []")
        self.emit(depth, f"while True:\n    {count}, p = _block(b, p)\n    if not {count}:\n"
                         f"        break\n    for _ in range({count}):")  # fmt: skip
        if is_map:
            key = self.name("k")
            self._primitive("string", depth + 2, key)
            self.value(schema["values"], depth + 2, item)
            self.emit(depth + 2, f"{target}[{key}] = {item}")
        else:
            self.value(schema["items"], depth + 2, item)
            self.emit(depth + 2, f"{target}.append({item})")

    def _may_be_empty(self, schema: Any) -> bool:
        """Whether a value of ``schema`` may be written as no bytes at all."""
        schema = self.resolved(schema)
        if isinstance(schema, dict) and schema["type"] == "record":
            return schema["name"] in self._within or all(
                self._may_be_empty(f["type"]) for f in schema["fields"]
            )
        return schema == "null" or (isinstance(schema, dict) and schema["type"] == "null")

    def _record(self, schema: Mapping[str, Any], depth: int, target: str, top: bool) -> None:
        name = schema["name"]
        fields = self.enter(schema)
        maker = self.makers.get(name)
        if maker is None:
            raise Unsupported(f"no class is given for record {name}")
        try:
            inspect.signature(maker).bind(**dict.fromkeys(fields))
        except TypeError as exc:
            raise ValueError(
                f"record {name}: {maker.__name__} does not take its fields ({exc})"
            ) from exc
        values = []
        for f in schema["fields"]:
            values.append(self.name("v"))
            self.value(f["type"], depth, values[-1])
        self.leave()
        if top:  # the body must end here; checked before the class sees the values
            self.emit(depth, "if p != size:\n    _misfit(b, p)")
        if _in_order(maker, fields):  # by position: 0.4-1.4 µs less an event read (of 12-13)
            arguments = ", ".join(values)
        else:
            arguments = ", ".join(f"{f}={v}" for f, v in zip(fields, values, strict=True))
        self.emit(depth, f"{target} = {self.constant(maker)}({arguments})")


def _in_order(maker: Callable[..., Any], fields: list[str]) -> bool:
    """Whether ``maker`` takes ``fields`` by position, in the order the record has them."""
    params = list(inspect.signature(maker).parameters.values())
    return len(params) >= len(fields) and all(
        p.name == f and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p, f in zip(params, fields, strict=False)
    )


def compile_reader(
    schema: Mapping[str, Any], makers: Mapping[str, Callable[..., Any]]
) -> Callable[[bytes, int], Any]:
    """A function that reads, from ``b[p:]`` to the end of ``b``, one record written with
    ``schema`` (a record as fastavro's ``parse_schema`` or ``load_schema`` leaves it), and
    returns it built by ``makers``: a callable for the full name of each record, taking the
    record's fields as keyword arguments. An enum reads as its symbol, a map as a dict, an
    array as a list. Raises Unsupported (above); ValueError if a maker does not take its
    record's fields."""
    source = _Reader(schema, makers)
    source.emit(0, "def read(b, p):\n    size = len(b)")
    source.value(schema, 1, "record", top=True)
    source.emit(1, "return record")
    read: Callable[[bytes, int], Any] = source.function("read", f"avro reader of {schema['name']}")
    return read
