"""``find`` on texts made to be slow: it must take time linear in the text, and find what
the plain way of running the detectors finds."""

from __future__ import annotations

import random
import re
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.detectors import (
    DETECTORS,
    Detector,
    Finding,
    Prefilter,
    _accepted_end,
    default_prefilter,
    find,
)
from pipeline.events import Event, Interaction, event_to_avro
from pipeline.redact import DEFAULT_POLICY, redact
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
        raise TimeoutError(f"took longer than {seconds} s")

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


def test_a_failed_start_rules_out_no_match_past_its_run() -> None:
    """A header and a payload too short to be one end their runs at dots; the JWT after the
    second dot is found."""
    text = "eyJabcdefgh.eyJab.eyJabcdef.eyJabcdef.abcdefgh"
    assert find(text) == [Finding("jwt", 18, len(text))] == plain_find(text)


# a tenant's own patterns come first, so they win overlaps with the built-in detectors' findings
CUSTOM = (
    Detector("employee_id", re.compile(r"EMP-\d{6}")),
    Detector("handle", re.compile(r"[a-z]{2,}@[a-z]{2,}")),  # overlaps addresses
)
_CUSTOM_PREFILTER = Prefilter((*CUSTOM, *DETECTORS))


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.sampled_from(["EMP-123456", "EMP-12345", "bob@corp", "bob@corp.example.com", " "]),
            st.builds(_planted, st.sampled_from(sorted(GENERATORS)), st.integers(0, 2**32)),
        ),
        max_size=30,
    )
)
def test_custom_patterns_win_overlaps_as_the_plain_way_has_them(pieces: list[str]) -> None:
    text = "".join(pieces)
    assert find(text, _CUSTOM_PREFILTER) == plain_find(text, (*CUSTOM, *DETECTORS))
