"""``find`` on texts made to be slow: it must take time linear in the text, and find what
the plain way of running the detectors finds."""

from __future__ import annotations

import dataclasses
import random
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import DEAD_LETTER_SCHEMA, EVENT_SCHEMA, Registry
from pipeline.config import parse_config
from pipeline.detectors import (
    DETECTORS,
    Deadline,
    Detector,
    Finding,
    PatternTimeout,
    Prefilter,
    _accepted_end,
    custom_detector,
    default_prefilter,
    find,
)
from pipeline.events import Event, Interaction, event_to_avro
from pipeline.redact import DEFAULT_POLICY, Policy, redact
from pipeline.rows import Origin
from pipeline.validate import Limits, route
from tests.pii_samples import GENERATORS, SLOW_TEXTS, lookalike

MIB = 1 << 20


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail if the block takes longer than ``seconds``: a guard against a hang (each of these
    takes under a tenth of a second; the quadratic versions took from 17 s to hours), not a
    speed target."""

    def expired(_signum: int, _frame: object) -> None:
        # not a TimeoutError, which a custom pattern's search turns into PatternTimeout
        pytest.fail(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def plain_find(text: str, detectors: Sequence[Detector] = DETECTORS) -> list[Finding]:
    """The detectors run the plain way: each pattern searched from where the last match ended,
    each finding compared with all kept before it (detectors listed first win overlaps)."""
    found: list[Finding] = []
    for det in detectors:
        pos = 0
        while (m := det.pattern.search(text, pos)) is not None:
            pos = m.end() if m.end() > m.start() else m.end() + 1
            start, end = m.span(det.group)
            if start < 0 or (start > 0 and text[start - 1] in det.fence):
                continue
            right = det.fence if det.right_fence is None else det.right_fence
            if det.validate or (end < len(text) and text[end] in right):
                end = _accepted_end(det, text, start, end)
                if end < 0:
                    continue
            if not any(start < e and s < end for _, s, e in found):
                found.append(Finding(det.type, start, end))
    return sorted(found, key=lambda f: f.start)


@pytest.mark.parametrize("name", SLOW_TEXTS)
def test_a_text_made_to_be_slow_is_read_in_linear_time(name: str) -> None:
    piece, findings_each = SLOW_TEXTS[name]
    text = piece * (MIB // len(piece))
    with within(10):
        found = find(text)
    assert len(found) == findings_each * (MIB // len(piece))
    # the same text a hundredth as long finds what the plain way finds
    short = piece * (MIB // 100 // len(piece))
    assert find(short) == plain_find(short)


def test_an_event_made_to_be_slow_is_redacted_in_linear_time() -> None:
    """Through the stage the worker runs: a payload of 0.8 MiB (the limit is 1 MiB) of
    addresses, JWT headers and key BEGIN lines is validated and redacted, without holding the
    worker for minutes."""
    registry = Registry.load()
    now = datetime.now(UTC)
    text = "a@b.co eyJeyJeyJeyJ -----BEGIN PRIVATE KEY----- " * (MIB // 60)
    event = Event(
        event_id="slow-1", kind="interaction", ts=now, tenant_id="acme", environment="prod",
        agent_id="support-bot",
        body=Interaction(provider="openai", model="gpt-4o", operation="chat", output_text=text),
    )  # fmt: skip
    raw = registry.encode(EVENT_SCHEMA, event_to_avro(event))
    with within(10):
        routed = route(raw, b"k", Origin("raw", 0, 0), registry, Limits(), now)
        assert routed.event is not None
        redacted = redact(event, DEFAULT_POLICY)
    assert routed.event.body == redacted.body
    output = redacted.body.output_text  # type: ignore[union-attr]
    assert "@" not in output and output.count("[EMAIL]") == MIB // 60
    assert [(r.type, r.count) for r in redacted.redactions] == [("email", MIB // 60)]


_PIECES = [
    "eyJ", "-eyJ", "abc", ".", "-", " ", "\n", ":", "@", "eyJhbGciOiJIUzI1NiJ9", "x" * 9,
    "-----BEGIN PRIVATE KEY-----", "-----BEGIN RSA PRIVATE KEY-----", "-----END PRIVATE KEY-----",
    "-----END RSA PRIVATE KEY-----", "-----BEGIN CERTIFICATE-----", "MIIEvQIBADAN", "a@b.co",
    "é", "ü", "١٢٣", "\uff14\uff15\uff16", "\u00a0", "日本", "\u2028",  # other scripts'
    # letters, digits (Arabic-Indic, fullwidth) and spaces
]  # fmt: skip


def _planted(kind: str, seed: int) -> str:
    return GENERATORS[kind](random.Random(seed))


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.sampled_from(_PIECES),
            st.builds(_planted, st.sampled_from(sorted(GENERATORS)), st.integers(0, 2**32)),
            st.builds(lambda seed: lookalike(random.Random(seed)), st.integers(0, 2**32)),
        ),
        max_size=40,
    )
)
def test_find_finds_what_the_detectors_find_the_plain_way(pieces: list[str]) -> None:
    text = "".join(pieces)
    assert find(text, default_prefilter()) == plain_find(text)


# pieces of JWTs and private keys, so that a text of a few is often nearly one, or two in one
_NEAR_MISSES = [
    "eyJ", "eyJab", "eyJabcdefgh", "ab", "abcdefgh", ".", "-", " ",
    "-----BEGIN PRIVATE KEY-----", "-----BEGIN EC PRIVATE KEY-----", "-----END PRIVATE KEY-----",
    "-----END EC PRIVATE KEY-----", "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----",
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(st.sampled_from(_NEAR_MISSES), max_size=30))
def test_near_misses_are_told_from_matches_as_the_plain_way_tells_them(pieces: list[str]) -> None:
    text = "".join(pieces)
    assert find(text, default_prefilter()) == plain_find(text)


# Python's patterns read a text as Unicode (\w, \d, \s and . take any script's letters,
# digits, spaces and characters, {n} counts characters); so must the prefilter, or it says a
# detector cannot match where its pattern does, and the value is left in the text
@pytest.mark.parametrize(
    ("pattern", "text", "value"),
    [
        (r"\w+@corp", "write to josé@corp", "josé@corp"),
        (r"M.ller", "Herr Müller", "Müller"),
        (r"ID-\d{4}", "badge ID-١٢٣٤ today", "ID-١٢٣٤"),
        (r"X[^\s,]{2,4}@corp", "to zoë\u00a0Xüöäß@corp", "Xüöäß@corp"),
        (r"(?i)ärger-\d+", "ÄRGER-12", "ÄRGER-12"),
    ],
)
def test_the_prefilter_reads_a_text_as_the_patterns_do(pattern: str, text: str, value: str) -> None:
    det = custom_detector("tenant_value", pattern)
    found = find(text, Prefilter((det,)).followed_by(default_prefilter()))  # as a policy has it
    assert (
        [text[f.start : f.end] for f in found]
        == [value]
        == [text[f.start : f.end] for f in plain_find(text, (det, *DETECTORS))]
    )


def test_a_failed_start_rules_out_no_match_past_its_run() -> None:
    """A header and a payload too short to be one end their runs at dots; the JWT after the
    second dot is found."""
    text = "eyJabcdefgh.eyJab.eyJabcdef.eyJabcdef.abcdefgh"
    assert find(text) == [Finding("jwt", 18, len(text))] == plain_find(text)


# a tenant's own patterns come first, so they win overlaps with the built-in detectors' findings
CUSTOM = (
    custom_detector("employee_id", r"EMP-\d{6}"),
    custom_detector("handle", r"[a-z]{2,}@[a-z]{2,}"),  # overlaps addresses
)
_CUSTOM_PREFILTER = Policy("p", custom=CUSTOM).prefilter


def test_a_policy_compiles_its_own_patterns_and_shares_the_built_in_prefilter() -> None:
    assert _CUSTOM_PREFILTER.detectors == (*CUSTOM, *DETECTORS)
    assert _CUSTOM_PREFILTER._then is default_prefilter()  # not compiled again for each policy


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.sampled_from(["EMP-123456", "EMP-12345", "bob@corp", "bob@corp.example.com", " "]),
            st.sampled_from(_PIECES),  # other scripts: no byte offset to start the exact scan from
            st.builds(_planted, st.sampled_from(sorted(GENERATORS)), st.integers(0, 2**32)),
        ),
        max_size=30,
    )
)
def test_custom_patterns_win_overlaps_as_the_plain_way_has_them(pieces: list[str]) -> None:
    text = "".join(pieces)
    assert find(text, _CUSTOM_PREFILTER) == plain_find(text, (*CUSTOM, *DETECTORS))


# A tenant's pattern whose time grows with the square of a text's length: from each letter of a
# run it takes the run and then finds no "@corp" after it. Python's engine takes some 20 s on
# this text; the regex module's is stopped at the event's deadline.
_SLOW_CUSTOM = {"name": "corp_handle", "pattern": r"[a-z]+@corp"}
_SLOW_FOR_IT = "a" * 200_000 + "@corq, write to bob@corp"


def _slow_policy(seconds: float) -> Policy:
    config = parse_config({"redaction": {"p": {"custom": [_SLOW_CUSTOM]}}}, {})
    return dataclasses.replace(config.policies["p"], custom_seconds=seconds)


def _interaction(text: str, attributes: dict[str, str] | None = None) -> Event:
    return Event(
        event_id="slow-custom", kind="interaction", ts=datetime.now(UTC), tenant_id="acme",
        environment="prod", agent_id="support-bot", attributes=attributes or {},
        body=Interaction(provider="openai", model="gpt-4o", operation="chat", input_text=text),
    )  # fmt: skip


def test_a_custom_pattern_slow_on_an_event_sends_it_to_the_dlq_and_names_the_pattern() -> None:
    registry = Registry.load()
    policy = _slow_policy(0.2)
    event = _interaction(_SLOW_FOR_IT)
    raw = registry.encode(EVENT_SCHEMA, event_to_avro(event))
    with within(10):
        routed = route(raw, b"k", Origin("raw", 0, 0), registry, Limits(), event.ts,
                       policy_for=lambda _tenant: policy)  # fmt: skip
    assert (routed.target, routed.reason_code) == ("dlq", "redaction_timeout")
    letter = registry.decode(routed.value, DEAD_LETTER_SCHEMA)
    assert "'corp_handle'" in letter["reason"] and "0.2 s" in letter["reason"]
    assert "aaaa" not in letter["reason"]  # the pattern is named, never the text
    # the same pattern on an event without such a text finds and masks as before
    fine = redact(_interaction("write to bob@corp today"), policy)
    assert fine.body.input_text == "write to [CORP_HANDLE] today"  # type: ignore[union-attr]


def test_a_pause_of_the_process_takes_none_of_an_events_time_for_custom_patterns() -> None:
    """An event's texts share one deadline (``redact``); between two of them the worker is
    paused for longer than the whole of it (a sleep here, as a stop or a starved machine would
    pause it). The second text is scanned as the first was: the deadline counts the process's
    CPU time, as the regex engine does within a search. On the wall clock the pause had spent
    it, and the event went to the DLQ as redaction_timeout."""
    policy = _slow_policy(0.3)
    deadline = Deadline(policy.custom_seconds)
    first = find("write to bob@corp", policy.prefilter, deadline)
    time.sleep(0.5)
    second = find("or to carol@corp", policy.prefilter, deadline)
    assert [(f.type, f.start) for f in (*first, *second)] == [
        ("corp_handle", 9),
        ("corp_handle", 6),
    ]
    assert 0 < deadline.left() <= 0.3


def test_an_events_texts_share_one_deadline_for_custom_patterns() -> None:
    """Forty such texts in one event's attributes, each taking the pattern about 0.15 s: each
    alone is in time, all of them together are not (a deadline for each text would let the event
    hold the worker for six seconds, or a thousand texts for minutes)."""
    slow = {f"note{i}": "a" * 20_000 + "@corq, bob@corp" for i in range(40)}
    event = _interaction("hello", slow)
    started = time.monotonic()
    with within(5), pytest.raises(PatternTimeout, match="corp_handle"):
        redact(event, _slow_policy(0.5))
    assert time.monotonic() - started >= 0.5  # it ran to the deadline, not refused at once
