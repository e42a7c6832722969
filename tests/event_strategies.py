"""A Hypothesis strategy for any valid Event, every optional part drawn or left out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

from pipeline.events import (
    DECISIONS,
    Actor,
    Cost,
    Decision,
    Drift,
    Enrichment,
    Eval,
    Event,
    Interaction,
    Redaction,
    Unit,
)

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)  # past 63: 2 bytes
_optional_text = st.none() | _text
_long = st.integers(-(2**63), 2**63 - 1)
_double = st.none() | st.floats(allow_nan=False)
_bodies = st.one_of(
    st.builds(Interaction, _text, _text, _text, _long, _long, _long, _long, _long, _double,
              _text, _optional_text, _optional_text, _optional_text, _optional_text,
              _optional_text, _double),
    st.builds(Cost, st.floats(allow_nan=False), _text, _text, _optional_text),
    st.builds(Drift, _text, _double, _optional_text),
    st.builds(Eval, _text, st.floats(allow_nan=False), _double, _optional_text, _optional_text),
    st.builds(Decision, _text, st.sampled_from(sorted(DECISIONS)), _text, _optional_text),
)  # fmt: skip
_KIND = {Interaction: "interaction", Cost: "cost", Drift: "drift", Eval: "eval",
         Decision: "decision"}  # fmt: skip


@st.composite
def events(draw: st.DrawFn) -> Event:
    body = draw(_bodies)
    ms = draw(st.integers(-(10**12), 10**13))
    return Event(
        event_id=draw(_text),
        kind=_KIND[type(body)],
        ts=datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms),
        tenant_id=draw(_text),
        agent_id=draw(_text),
        body=body,
        environment=draw(_text),
        trace_id=draw(_optional_text),
        span_id=draw(_optional_text),
        session_id=draw(_optional_text),
        unit=draw(st.none() | st.builds(Unit, _text, _text)),
        actor=draw(st.none() | st.builds(Actor, _text, _optional_text)),
        attributes=draw(st.dictionaries(_text, _text, max_size=70)),  # past 63: 2-byte counts
        redactions=tuple(
            draw(st.lists(st.builds(Redaction, _text, _text, st.integers(0, 2**31 - 1))))
        ),
        enrichment=draw(
            st.none()
            | st.builds(
                Enrichment,
                _text,
                _optional_text,
                _optional_text,
                _optional_text,
                _optional_text,
                st.booleans(),
            )
        ),
    )
