"""The redact stage: every planted PII or secret is gone from every string field, look-alikes
are untouched, pseudonyms are stable per tenant, and failures never reach storage."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import DEAD_LETTER_SCHEMA, EVENT_SCHEMA, Registry
from pipeline.detectors import Detector
from pipeline.events import (
    Actor,
    Cost,
    Decision,
    Drift,
    Eval,
    Event,
    Interaction,
    InvalidEvent,
    Unit,
    event_from_avro,
    event_to_avro,
    event_to_json,
)
from pipeline.redact import ATTRIBUTE_KEYS, DROPPED, Policy, RedactionError, redact, scrub_bytes
from pipeline.rows import Origin
from pipeline.validate import Limits, route
from tests.pii_samples import GENERATORS, lookalike, sensitive_part

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
KEY = b"k" * 32
ALL_IDS = frozenset({"actor.user_id", "unit.id", "session_id", "reviewer_id"})

# field path -> builds an event carrying `text` in that field
FIELDS = {
    "input_text": lambda t: ("interaction", Interaction("openai", "gpt-4o", input_text=t)),
    "output_text": lambda t: ("interaction", Interaction("openai", "gpt-4o", output_text=t)),
    "error_type": lambda t: (
        "interaction",
        Interaction("openai", "gpt-4o", status="error", error_type=t),
    ),
    "tool_name": lambda t: ("interaction", Interaction("openai", "gpt-4o", tool_name=t)),
    "finish_reason": lambda t: ("interaction", Interaction("openai", "gpt-4o", finish_reason=t)),
    "description": lambda t: ("cost", Cost(1.0, description=t)),
    "category": lambda t: ("drift", Drift("topic", category=t)),
    "dataset": lambda t: ("eval", Eval("faithfulness", 0.9, dataset=t)),
    "reason": lambda t: ("decision", Decision("e0", "rejected", "rev-1", reason=t)),
    "reviewer_id": lambda t: ("decision", Decision("e0", "approved", t)),
}
ENVELOPE_FIELDS = ("attributes.note", "actor.user_id", "unit.id", "session_id")


def _event(field: str, text: str) -> Event:
    kind, body = FIELDS[field](text) if field in FIELDS else ("cost", Cost(1.0))
    event = Event(
        event_id="e1",
        kind=kind,
        ts=NOW,
        tenant_id="acme",
        agent_id="bot",
        body=body,
        unit=Unit("ticket", "T-1"),
        actor=Actor("u-1", "agent"),
        attributes={"keep": "fine"},
    )
    if field == "attributes.note":
        event = dataclasses.replace(event, attributes={"keep": "fine", "note": text})
    elif field == "actor.user_id":
        event = dataclasses.replace(event, actor=Actor(text, "agent"))
    elif field == "unit.id":
        event = dataclasses.replace(event, unit=Unit("ticket", text))
    elif field == "session_id":
        event = dataclasses.replace(event, session_id=text)
    return event


prose = st.text(alphabet=st.sampled_from("abcdefghij KLMNOP,."), max_size=25)


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from(sorted(GENERATORS)),
    field=st.sampled_from([*FIELDS, *ENVELOPE_FIELDS]),
    action=st.sampled_from(["mask", "pseudonymize", "drop"]),
    seed=st.integers(0, 2**32),
    before=prose,
    sep=st.sampled_from([" ", ". ", ".", ", ", "; ", ")", "!\n", "? "]),
    after=prose,
)
def test_no_planted_value_survives_in_any_field(
    kind: str, field: str, action: str, seed: int, before: str, sep: str, after: str
) -> None:
    planted = GENERATORS[kind](random.Random(seed))
    secret = sensitive_part(kind, planted)
    event = _event(field, f"{before} {planted}{sep}{after}")
    policy = Policy("p", {}, action, ALL_IDS, (), KEY)
    out = redact(event, policy)
    stored = json.dumps(event_to_json(out))
    assert secret not in stored
    assert secret not in repr(out)
    assert any(r.field == field and r.type == kind and r.count >= 1 for r in out.redactions), (
        out.redactions
    )
    assert all(secret not in json.dumps(dataclasses.asdict(r)) for r in out.redactions)
    assert out.attributes.get("keep") == "fine"


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from([*FIELDS, *ENVELOPE_FIELDS]), seed=st.integers(0, 2**32))
def test_lookalikes_come_through_untouched(field: str, seed: int) -> None:
    text = lookalike(random.Random(seed))
    event = _event(field, text)
    out = redact(event, Policy("p", {}, "mask", ALL_IDS, (), KEY))
    assert out == event and out.redactions == ()


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(sorted(GENERATORS)),
    action=st.sampled_from(["mask", "pseudonymize", "drop"]),
    seed=st.integers(0, 2**32),
    before=prose,
    after=prose,
)
def test_no_planted_value_survives_in_an_attribute_key(
    kind: str, action: str, seed: int, before: str, after: str
) -> None:
    # a key is stored as it is, and names the field a value's redaction is recorded under
    planted = GENERATORS[kind](random.Random(seed))
    secret = sensitive_part(kind, planted)
    key = f"{before} {planted} {after}"
    event = dataclasses.replace(
        _event("input_text", "fine"), attributes={"keep": "fine", key: "mail jane@acme.example"}
    )
    out = redact(event, Policy("p", {}, action, ALL_IDS, (), KEY))
    assert secret not in json.dumps(event_to_json(out)) and secret not in repr(out)
    assert all(secret not in json.dumps(dataclasses.asdict(r)) for r in out.redactions)
    assert any(r.field == ATTRIBUTE_KEYS and r.type == kind for r in out.redactions)
    assert out.attributes["keep"] == "fine"
    if action == "drop":
        assert out.attributes == {"keep": "fine"}
    else:
        [(renamed, value)] = [(k, v) for k, v in out.attributes.items() if k != "keep"]
        if action == "mask":
            assert value == "mail [EMAIL]"
        else:
            assert value.startswith("mail [EMAIL:")
        assert (f"attributes.{renamed}", "email") in [(r.field, r.type) for r in out.redactions]


def test_keys_redacted_alike_keep_both_values() -> None:
    attributes = {"jane@acme.example": "1", "[EMAIL]": "0", "bob@acme.example": "2", "n": "3"}
    event = dataclasses.replace(_event("input_text", "fine"), attributes=attributes)
    out = redact(event, Policy())
    assert out.attributes == {"[EMAIL]": "0", "n": "3", "[EMAIL]#2": "1", "[EMAIL]#3": "2"}
    assert [(r.field, r.type, r.count) for r in out.redactions] == [(ATTRIBUTE_KEYS, "email", 2)]
    plain = dataclasses.replace(event, attributes={"gen_ai.request.model": "x", "v1.2.3": "y"})
    assert redact(plain, Policy()) is plain


def test_pseudonyms_are_stable_within_a_tenant_and_differ_across_tenants() -> None:
    policy = Policy("p", {"email": "pseudonymize"}, "mask", frozenset(), (), KEY)
    a1 = redact(_event("input_text", "mail jane@acme.example now"), policy)
    a2 = redact(_event("output_text", "from jane@acme.example"), policy)
    other = redact(
        dataclasses.replace(_event("input_text", "mail jane@acme.example now"), tenant_id="globex"),
        policy,
    )
    token = a1.body.input_text.split()[1]  # type: ignore[union-attr]
    assert token.startswith("[EMAIL:") and token in a2.body.output_text  # type: ignore[union-attr, operator]
    assert token not in other.body.input_text  # type: ignore[union-attr, operator]
    masked = redact(_event("input_text", "mail jane@acme.example now"), Policy())
    assert masked.body.input_text == "mail [EMAIL] now"  # type: ignore[union-attr]


def test_drop_removes_the_field_and_keeps_required_ids_present() -> None:
    policy = Policy("p", {"us_ssn": "drop"}, "mask", ALL_IDS, (), KEY)
    assert redact(_event("input_text", "ssn 123-45-6789"), policy).body.input_text is None  # type: ignore[union-attr]
    out = redact(_event("attributes.note", "ssn 123-45-6789"), policy)
    assert "note" not in out.attributes and out.attributes["keep"] == "fine"
    assert redact(_event("unit.id", "123-45-6789"), policy).unit == Unit("ticket", DROPPED)


def test_ids_are_left_alone_unless_the_policy_scans_them() -> None:
    event = _event("actor.user_id", "jane@acme.example")
    assert redact(event, Policy()).actor == Actor("jane@acme.example", "agent")
    assert redact(event, Policy(scan_ids=frozenset({"actor.user_id"}))).actor == Actor(
        "[EMAIL]", "agent"
    )


@pytest.mark.parametrize("field", [*FIELDS, *ENVELOPE_FIELDS])
def test_every_scanned_field_reaches_the_one_scan_of_an_event(field: str) -> None:
    # redact scans an event's texts joined once and returns the event as it is when nothing
    # may match: a field missing from that scan would keep what it holds
    policy = Policy("p", {}, "mask", ALL_IDS, (), KEY)
    out = redact(_event(field, "jane@acme.example"), policy)
    assert [(r.field, r.type) for r in out.redactions] == [(field, "email")]
    assert "jane@acme.example" not in repr(out)


def test_every_field_found_at_once_is_replaced_and_recorded_in_field_order() -> None:
    mail = "jane@acme.example"
    event = Event(
        event_id="e1", kind="decision", ts=NOW, tenant_id="acme", agent_id="bot",
        body=Decision("e0", "rejected", mail, reason=f"per {mail}"),
        session_id=mail, unit=Unit("ticket", mail), actor=Actor(mail, "agent"),
        attributes={"a": mail, "b": "fine", "c": f"cc {mail}", "d": ""},
    )  # fmt: skip
    out = redact(event, Policy("p", {"email": "drop"}, "mask", ALL_IDS, (), KEY))
    assert [r.field for r in out.redactions] == [
        "reason", "reviewer_id", "attributes.a", "attributes.c", "session_id", "unit.id",
        "actor.user_id",
    ]  # fmt: skip
    assert out.body == Decision("e0", "rejected", DROPPED, reason=None)
    assert out.attributes == {"b": "fine", "d": ""}
    assert (out.session_id, out.unit, out.actor) == (
        None,
        Unit("ticket", DROPPED),
        Actor(DROPPED, "agent"),
    )
    assert mail not in repr(out)


def test_a_custom_pattern_anchored_to_the_text_is_found_in_any_field() -> None:
    # joined, "^" would see only the first text's start: such a prefilter scans each text
    anchored = Detector("order_code", re.compile(r"^ORD\d{6}$"))
    policy = Policy("p", {}, "mask", frozenset(), (anchored,), KEY)
    assert policy.prefilter.may_match(["fine", "ORD123456"])
    assert not policy.prefilter.may_match(["fine", "see ORD123456"])
    out = redact(_event("attributes.note", "ORD123456"), policy)
    assert out.attributes == {"keep": "fine", "note": "[ORDER_CODE]"}
    unanchored = Policy("q", {}, "mask", frozenset(), (Detector("order", re.compile(r"ORD\d{6}")),))
    assert unanchored.prefilter.may_match(["fine", "see ORD123456"])
    assert not unanchored.prefilter.may_match(["fine", "ORD12345", "6"])  # not across texts


def test_an_event_with_no_text_comes_through_as_it_is() -> None:
    event = dataclasses.replace(_event("category", ""), attributes={})
    assert redact(event, Policy()) is event


def test_custom_patterns_per_tenant() -> None:
    from pipeline.config import parse_config

    config = parse_config(
        {
            "tenants": {"acme": {"redaction": "hr"}},
            "redaction": {"hr": {"custom": [{"name": "employee_id", "pattern": r"EMP-\d{6}"}]}},
        },
        {},
    )
    event = _event("input_text", "badge EMP-004211 ok")
    assert redact(event, config.policy_for("acme")).body.input_text == "badge [EMPLOYEE_ID] ok"  # type: ignore[union-attr]
    assert redact(event, config.policy_for("globex")) == event


def test_redaction_failure_goes_to_the_dlq_never_to_clean(registry: Registry) -> None:
    event = _event("input_text", "mail jane@acme.example")
    wire = registry.encode(EVENT_SCHEMA, event_to_avro(event))
    keyless = Policy("p", {"email": "pseudonymize"}, "mask", frozenset(), (), None)
    with pytest.raises(RedactionError):
        redact(event, keyless)
    routed = route(
        wire, b"acme/bot", Origin("raw", 0, 7), registry, Limits(), NOW, lambda _t: keyless
    )
    assert routed.target == "dlq" and routed.reason_code == "redaction_failed"
    letter = registry.decode(routed.value, DEAD_LETTER_SCHEMA)
    assert b"jane@acme.example" not in letter["payload"] and "jane" not in letter["reason"]

    def broken(_tenant: str) -> Policy:
        raise KeyError("policy store unavailable")

    assert (
        route(wire, b"acme/bot", Origin("raw", 0, 8), registry, Limits(), NOW, broken).reason_code
        == "redaction_failed"
    )


def test_clean_events_carry_what_was_redacted(registry: Registry) -> None:
    event = _event("input_text", "card 4111 1111 1111 1111 and jane@acme.example, bob@acme.example")
    routed = route(
        registry.encode(EVENT_SCHEMA, event_to_avro(event)),
        None,
        Origin("raw", 0, 1),
        registry,
        Limits(),
        NOW,
    )
    assert routed.target == "clean"
    clean = event_from_avro(registry.decode(routed.value, EVENT_SCHEMA))
    assert {(r.field, r.type, r.count) for r in clean.redactions} == {
        ("input_text", "card", 1),
        ("input_text", "email", 2),
    }
    assert clean.body.input_text == "card [CARD] and [EMAIL], [EMAIL]"  # type: ignore[union-attr]


_TWO_TENANTS = {
    "tenants": {"acme": {"redaction": "hr"}, "globex": {"redaction": "ops"}},
    "redaction": {
        "hr": {"custom": [{"name": "employee_id", "pattern": r"EMP-\d{6}"}]},
        "ops": {"custom": [{"name": "corp_handle", "pattern": r"[a-z]+@corp"}]},
    },
}


def test_dead_letters_are_scrubbed_of_every_tenants_custom_patterns(registry: Registry) -> None:
    """A rejected event's letter keeps no value a tenant's own pattern finds: of any tenant,
    since the key that names one is the sender's to choose."""
    from pipeline.config import parse_config
    from pipeline.dlq import dead_letter

    config = parse_config(_TWO_TENANTS, {})
    event = dataclasses.replace(  # rejected: too old
        _event("input_text", "badge EMP-004211 of bob@corp, mail jane@acme.example"),
        ts=datetime(1990, 1, 1, tzinfo=UTC),
    )
    wire = registry.encode(EVENT_SCHEMA, event_to_avro(event))
    routed = route(wire, b"globex/EMP-004211", Origin("raw", 0, 7), registry, Limits(), NOW,
                   config.policy_for, scrub_with=config.scrub)  # fmt: skip
    assert routed.reason_code == "timestamp_past"
    letter = registry.decode(routed.value, DEAD_LETTER_SCHEMA)
    payload = letter["payload"]
    assert len(payload) == len(wire)  # the same shape
    for value in (b"EMP-004211", b"bob@corp", b"jane@acme.example"):
        assert value not in payload and value not in letter["origin_key"]
    assert b"badge ********** of ********, mail *****************" in payload
    # the same letter made with the built-in detectors alone keeps both tenants' values
    plain = dead_letter(wire, b"globex/bot", Origin("raw", 0, 7), InvalidEvent("x", "y"),
                        stage="validate", received_at=NOW)  # fmt: skip
    assert b"EMP-004211" in plain["payload"] and b"bob@corp" in plain["payload"]


def test_dead_letters_are_scrubbed_of_values_in_other_scripts(registry: Registry) -> None:
    """A payload is UTF-8 where it holds text: read as one character a byte alone, "Müller" is
    "MÃ¼ller" to a pattern, and ``M.ller`` or ``\\w+@corp`` does not find what it finds in the
    event's text."""
    from pipeline.config import parse_config
    from pipeline.dlq import dead_letter

    custom = [{"name": "surname", "pattern": r"M.ller"},
              {"name": "corp_handle", "pattern": r"\w+@corp"}]  # fmt: skip
    config = parse_config({"redaction": {"p": {"custom": custom}}}, {})
    text = "Herr Müller wrote from josé@corp to jane@acme.example"
    assert redact(_event("input_text", text), config.policies["p"]).body.input_text == (  # type: ignore[union-attr]
        "Herr [SURNAME] wrote from [CORP_HANDLE] to [EMAIL]"
    )
    wire = registry.encode(EVENT_SCHEMA, event_to_avro(_event("input_text", text)))
    letter = dead_letter(wire, b"acme/bot", Origin("raw", 0, 7), InvalidEvent("x", "y"),
                         stage="validate", received_at=NOW, scrub_with=config.scrub)  # fmt: skip
    payload = letter["payload"]
    assert len(payload) == len(wire)
    for value in ("Müller", "josé@corp", "jane@acme.example"):
        assert value.encode() not in payload
    assert b"Herr ******* wrote from ********** to *****************" in payload


def test_a_payload_custom_patterns_run_out_of_time_on_is_withheld(registry: Registry) -> None:
    from pipeline.config import parse_config
    from pipeline.dlq import WITHHELD, dead_letter

    config = parse_config(_TWO_TENANTS, {})
    scrub = dataclasses.replace(config.scrub, custom_seconds=0.2)
    payload = ("a" * 200_000 + "@corq, to bob@corp").encode()
    letter = dead_letter(payload, b"acme/bot", Origin("raw", 3, 9), InvalidEvent("x", "why"),
                         stage="validate", received_at=NOW, scrub_with=scrub)  # fmt: skip
    assert letter["payload"] == b""
    assert letter["reason"].startswith(
        f"why (its 200,018{WITHHELD}the custom pattern 'corp_handle'"
    )
    # where they finish, the payload is kept, scrubbed
    short = dead_letter(payload[-5_000:], b"acme/bot", Origin("raw", 3, 9), InvalidEvent("x", "why"),
                        stage="validate", received_at=NOW, scrub_with=scrub)  # fmt: skip
    assert short["reason"] == "why" and short["payload"].endswith(b"@corq, to ********")


def test_a_withheld_payload_stays_marked_when_its_reason_runs_out_of_time_too() -> None:
    """The replay re-reads a letter's payload from its origin where the reason says it was
    withheld (``dlq.WITHHELD``): a reason the patterns run out of time on as well, when the
    letter is made or when the DLQ sink scrubs it again, keeps saying so."""
    from pipeline.config import parse_config
    from pipeline.dlq import WITHHELD, scrubbed

    config = parse_config(_TWO_TENANTS, {})
    scrub = dataclasses.replace(config.scrub, custom_seconds=0.001)
    slow = "a" * 3_990 + "@corq to bob@corp"  # each "a" a start to scan on from: not in 1 ms
    payload, reason = scrubbed((slow * 100).encode(), f"why {slow}", "x", scrub)
    assert payload == b"" and WITHHELD in reason
    assert reason.startswith("x: the reason is withheld (the custom pattern 'corp_handle'")
    assert "aaa" not in reason
    # the sink's second scrub of that letter, whose reason it has not scrubbed
    payload, again = scrubbed(b"", f"why {slow} (its 400,700{WITHHELD}...)", "x", scrub)
    assert payload == b"" and WITHHELD in again and "aaa" not in again
    # a reason alone withheld, its payload kept (nothing in it the pattern may match, so no
    # deadline to miss): nothing to read again
    payload, reason = scrubbed(b"to nobody", f"why {slow}", "x", scrub)
    assert payload == b"to nobody" and WITHHELD not in reason
    assert reason.startswith("x: the reason is withheld")


def test_scrubbed_dead_letter_bytes_keep_their_avro_shape(registry: Registry) -> None:
    event = dataclasses.replace(
        _event("input_text", "call +1 (415) 555-0132 re AKIAIOSFODNN7EXAMPLE"),
        ts=datetime(1990, 1, 1, tzinfo=UTC),
    )
    wire = registry.encode(EVENT_SCHEMA, event_to_avro(event))
    scrubbed = scrub_bytes(wire)
    assert (
        len(scrubbed) == len(wire)
        and b"AKIAIOSFODNN7EXAMPLE" not in scrubbed
        and b"555-0132" not in scrubbed
    )
    back = event_from_avro(registry.decode(scrubbed, EVENT_SCHEMA))
    assert back.event_id == "e1" and "*" in back.body.input_text  # type: ignore[union-attr, operator]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Grüße — schreiben Sie an jane@acme.example oder ☎ +49 30 12345678",
            "Grüße — schreiben Sie an [EMAIL] oder ☎ [PHONE]",
        ),
        ("card 4111 1111 1111 1111 2026 expiry", "card [CARD] 2026 expiry"),
        ("IBAN GB82 WEST 1234 5698 7654 32 K", "IBAN [IBAN] K"),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY----- done",
            "[PRIVATE_KEY] done",
        ),
    ],
)
def test_non_ascii_text_and_greedy_neighbours(text: str, expected: str) -> None:
    assert redact(_event("input_text", text), Policy()).body.input_text == expected  # type: ignore[union-attr]
