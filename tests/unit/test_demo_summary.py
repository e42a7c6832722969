"""The demo's summary tables, as a person reads them in a terminal."""

from __future__ import annotations

from pipeline.demo import _table
from pipeline.trail import clipped


def test_a_table_aligns_its_columns_and_ends_no_line_in_spaces() -> None:
    table = _table([("bad_magic", 38, "payload: magic byte is 7"), ("x", 1_200, "y")],
                   ("reason", "count", "example"))  # fmt: skip
    lines = table.splitlines()
    assert lines[0] == "  reason     count  example"
    assert lines[2] == "  bad_magic     38  payload: magic byte is 7"
    assert lines[3] == "  x          1,200  y"  # numbers to the right, the rest to the left
    assert all(line == line.rstrip() for line in lines)


def test_a_long_example_is_clipped_with_an_ellipsis() -> None:
    assert clipped("kind: 'telemetry' is not one of", 12) == "kind: 'tele…"
    assert clipped("short", 12) == "short"
    assert len(clipped("x" * 100, 70)) == 70
