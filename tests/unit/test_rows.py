"""Event -> row is a pure function; its column list must match the DDL."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from hashlib import sha256

import pytest

from pipeline import ledger
from pipeline.events import Enrichment, InvalidEvent, event_from_json
from pipeline.ledger import CHAINED_COLUMNS, row_hash
from pipeline.rows import AUDIT_COLUMNS, DLQ_COLUMNS, Origin, audit_row
from pipeline.store import MIGRATIONS_DIR
from tests.conftest import EXAMPLES, load_example

INGESTED = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def _ddl_columns(table: str) -> list[str]:
    """Columns in the order the migrations create them: CREATE TABLE, then ADD COLUMNs."""
    columns: list[str] = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        text = path.read_text()
        if f"CREATE TABLE IF NOT EXISTS vigil.{table}\n" in text:
            body = text[text.index("(") + 1 : text.rindex(")")]
            columns += [
                m.group(1)
                for m in re.finditer(r"^\s{4}(\w+)\s+[A-Z]", body, re.M)
                if m.group(1) != "INDEX"
            ]
        elif f"ALTER TABLE vigil.{table}\n" in text:
            columns += re.findall(r"ADD COLUMN IF NOT EXISTS (\w+)", text)
    assert columns, f"no DDL for {table}"
    return columns


def test_column_lists_match_the_ddl() -> None:
    assert list(AUDIT_COLUMNS) == _ddl_columns("audit_log")
    assert list(DLQ_COLUMNS) == _ddl_columns("dlq")


def _row(name: str) -> dict[str, object]:
    event = event_from_json(load_example(next(p for p in EXAMPLES if p.name == name)))
    return dict(
        zip(
            AUDIT_COLUMNS,
            audit_row(event, Origin("vigil.events.clean", 3, 99), INGESTED),
            strict=True,
        )
    )


def test_interaction_row_golden() -> None:
    row = _row("interaction.json")
    assert row["event_id"] == "01J9Z6V8Q3-int-0001"
    assert row["ts"] == datetime(2026, 11, 20, 14, 3, 7, 125000, tzinfo=UTC)
    assert (row["unit_type"], row["unit_id"], row["actor_user_id"], row["actor_role"]) == (
        "ticket",
        "T-123",
        "u-42",
        "agent",
    )
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]) == (
        1200,
        310,
        1024,
    )
    assert row["latency_ms"] == 842.5 and row["finish_reason"] == "stop" and row["error_type"] == ""
    assert row["amount"] is None and row["score"] is None and row["decision"] == ""
    assert (row["source_topic"], row["source_partition"], row["source_offset"]) == (
        "vigil.events.clean",
        3,
        99,
    )
    assert row["attributes"] == {"gen_ai.request.temperature": "0.2"}


def test_cost_amount_is_an_exact_decimal() -> None:
    row = _row("cost.json")
    assert (
        row["amount"] == Decimal("0.35")
        and row["currency"] == "USD"
        and row["category"] == "human_review"
    )
    assert row["input_tokens"] == 0 and row["provider"] == ""


def test_an_amount_its_column_cannot_hold_makes_no_row() -> None:
    """Only an event that skipped validation can carry one; its row would fail the whole
    batch's insert, so ``audit_row`` raises, naming the field, for the ledger to reject it."""
    cost = event_from_json(load_example(next(p for p in EXAMPLES if p.name == "cost.json")))
    for body, field in (
        (dataclasses.replace(cost.body, amount=1e10), "amount"),
        (dataclasses.replace(cost.body, amount=float("nan")), "amount"),
    ):
        with pytest.raises(InvalidEvent) as info:
            audit_row(dataclasses.replace(cost, body=body), Origin("clean", 0, 1), INGESTED)
        assert info.value.code == "out_of_range" and info.value.reason.startswith(field)
    priced = dataclasses.replace(cost, enrichment=Enrichment("priced", "1000000000.000000000"))
    with pytest.raises(InvalidEvent, match=r"^cost_usd: 1000000000\.000000000 is not below"):
        audit_row(priced, Origin("clean", 0, 1), INGESTED)


def test_decision_and_eval_rows() -> None:
    decision = _row("decision.json")
    assert (decision["decision"], decision["reviewer_id"], decision["subject_event_id"]) == (
        "approved",
        "rev-7",
        "01J9Z6V8Q3-int-0001",
    )
    evaluation = _row("eval.json")
    assert (evaluation["metric"], evaluation["score"], evaluation["threshold"]) == (
        "faithfulness",
        0.91,
        0.8,
    )
    drift = _row("drift_categorical.json")
    assert (drift["metric"], drift["category"], drift["value"]) == ("detected_language", "de", None)


def _json_hash(values: tuple[object, ...]) -> str:
    """The row hash as the ledger computed it with ``json`` until 2026-12-05."""
    canonical = list(values)
    for i, normalise in ledger._NORMALISED:
        if canonical[i] is not None:
            as_json = float if normalise is ledger._float else normalise
            canonical[i] = as_json(canonical[i])
    text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return sha256(text.encode()).hexdigest()


def _chained_row() -> list[object]:
    event = event_from_json(load_example(EXAMPLES[5]))
    return [*audit_row(event, Origin("vigil.events.clean", 1, 9), INGESTED), 3, "ef" * 32]


def test_times_are_stored_and_hashed_at_the_millisecond() -> None:
    event = event_from_json(load_example(EXAMPLES[5]))
    for micro in (0, 999, 123_000, 123_456, 999_999):
        at = INGESTED.replace(microsecond=micro)
        row = audit_row(dataclasses.replace(event, ts=at), Origin("clean", 0, 1), at)
        columns = dict(zip(AUDIT_COLUMNS, row, strict=True))
        assert (
            columns["ts"] == columns["ingested_at"] == at.replace(microsecond=micro // 1000 * 1000)
        )


def test_the_canonical_text_is_the_one_json_wrote() -> None:
    """Every character a string may hold (all of Unicode but the surrogates, which no event
    decodes to), and floats of every form ``repr`` gives, hash as they did through ``json``."""
    row = _chained_row()
    text = CHAINED_COLUMNS.index("input_text")
    row[text] = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    assert row_hash(tuple(row)) == _json_hash(tuple(row))
    floats = [CHAINED_COLUMNS.index(c) for c in ("latency_ms", "value", "score", "threshold")]
    measures = [1e16, 1e-05, 0.1, -0.0, 5e-324, 1.7976931348623157e308, 1e22, 2.5, 1e15, 7, 0]
    for measure in measures:
        for i in floats:
            row[i] = measure
        assert row_hash(tuple(row)) == _json_hash(tuple(row)), measure


@pytest.mark.parametrize(
    ("column", "value"),
    [("latency_ms", float("nan")), ("value", float("inf")), ("score", float("-inf")),
     ("environment", datetime(2026, 1, 1, tzinfo=UTC)), ("source_offset", 2**64)],
)  # fmt: skip
def test_a_value_canonical_json_cannot_hold_is_refused(column: str, value: object) -> None:
    row = _chained_row()
    row[CHAINED_COLUMNS.index(column)] = value
    with pytest.raises(ValueError, match="canonical JSON"):
        row_hash(tuple(row))


def test_row_hashes_are_those_of_chains_already_stored() -> None:
    """The canonical encoding is fixed by every chain stored so far: these hashes were computed
    by the ledger as it was when they were recorded (2026-12-02), and must never change."""
    hashes = []
    for i, path in enumerate(EXAMPLES):
        event = event_from_json(load_example(path))
        row = (*audit_row(event, Origin("vigil.events.clean", 2, 100 + i), INGESTED), i + 1)
        hashes.append(row_hash((*row, "ab" * 32)))
    assert len(hashes) == 7 and sha256(",".join(hashes).encode()).hexdigest() == (
        "589a6c4b3982a24d0050531c46c77b62eb365d22764040432160e05e9570d85d"
    )
    # non-ASCII and escapes in strings, floats written with exponents, a long decimal
    interaction = load_example(EXAMPLES[5])
    assert interaction["kind"] == "interaction"
    tricky = {
        **interaction,
        "attributes": {"city": "Zürich 東京", "q": 'a"b\\c\u0001\n', "emoji": "🙂"},
        "latency_ms": 1e-05,
        "reported_cost_usd": 12345678.123456789,
        "input_text": "ünïcode \u2028 line",
    }
    drift = {**load_example(EXAMPLES[2]), "value": 1e16}
    assert drift["kind"] == "drift"
    at = Origin("vigil.events.clean", 0, 7)
    assert [
        row_hash((*audit_row(event_from_json(obj), at, INGESTED), 1, "cd" * 32))
        for obj in (tricky, drift)
    ] == [
        "939a0cec1972c68a1fa11a0b71615b72030409b4dc257cbad7dcd43feef1b0e8",
        "509eaa6457ad5af6547bc1e6ff431356ecd4fb0934b049fe97ec8ac0470519b3",
    ]
