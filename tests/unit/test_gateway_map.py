"""The gateway's mapping of a request's records: one record that fails in a way the mapping did
not foresee is that record's dead letter, never the request's 500 (its other records lost)."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline import gateway as gateway_module
from pipeline.codec import DEAD_LETTER_SCHEMA, Registry
from pipeline.config import Config
from pipeline.dlq import LETTER_FRAMING, MAX_KEPT_PAYLOAD, MAX_LETTER_BYTES, kept_payload
from pipeline.gateway import Gateway
from pipeline.otel_mapping import SpanView, span_to_event
from pipeline.settings import Settings
from pipeline.topics import FRAMING_BYTES


def _span(name: str) -> SpanView:
    start = int(datetime.now(UTC).timestamp() * 1e9)
    attrs = {"gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}
    return SpanView(name, 1, 2, start, start + 1_000_000, attrs, {})


def test_a_record_the_mapping_did_not_foresee_is_a_dead_letter_and_the_rest_go_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fragile(view: SpanView, **kw: Any) -> Any:
        if view.name == "boom":
            raise RuntimeError("a value from the record: secret-prompt")
        return span_to_event(view, **kw)

    monkeypatch.setattr(gateway_module, "span_to_event", fragile)
    registry = Registry.load()
    gateway = Gateway(Settings.from_env({}), Config(), registry, sender=None)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, "vigil.gateway"):
        good, bad = gateway._map([_span("chat"), _span("boom"), _span("chat")], "acme", "traces")
    assert len(good) == 2
    [(view, why)] = bad
    assert view.name == "boom" and why.code == "mapping_failed"
    assert why.reason == "the record could not be mapped to an event (RuntimeError)"
    topic, _key, value = gateway._dead_letter(view, why, "acme", "/v1/traces")
    assert topic == gateway.settings.topics.dlq
    letter = registry.decode(value, DEAD_LETTER_SCHEMA)
    assert (letter["reason_code"], letter["stage"]) == ("mapping_failed", "gateway")
    assert "RuntimeError" in caplog.text and "secret-prompt" not in caplog.text


def test_a_span_larger_than_the_pipeline_takes_is_a_dead_letter_that_fits_a_message() -> None:
    # sent on, the worker refused it as oversized; past the raw topic's own limit, the broker
    # refused it and the request was a 503 at every retry, its other spans with it
    registry = Registry.load()
    settings = Settings.from_env({"VIGIL_MAX_PAYLOAD_BYTES": "100000"})
    gateway = Gateway(settings, Config(), registry, sender=None)  # type: ignore[arg-type]
    big = _span("chat")
    big.attributes["gen_ai.prompt"] = "x" * 400_000
    good, bad = gateway._map([_span("chat"), big], "acme", "traces")
    assert len(good) == 1
    [(view, why)] = bad
    assert view is big and why.code == "oversized"
    assert why.reason.endswith("bytes encoded, more than the limit of 100,000")
    _topic, _key, value = gateway._dead_letter(view, why, "acme", "/v1/traces")
    assert len(value) < 300_000  # the dead letter keeps the record's head
    assert registry.decode(value, DEAD_LETTER_SCHEMA)["reason_code"] == "oversized"
    # the raw topic's messages hold less than the payload limit: that is the limit
    narrow = Gateway(settings, Config(), registry, sender=None)  # type: ignore[arg-type]
    narrow.sized({settings.topics.raw: 50_000 + FRAMING_BYTES})
    middling = _span("chat")
    middling.attributes["gen_ai.prompt"] = "x" * 60_000
    assert narrow._map([middling], "acme", "traces")[1][0][1].reason.endswith(
        "more than the limit of 50,000"
    )


@pytest.mark.parametrize("dlq_bytes", [100_000, 30_000])
def test_a_dead_letter_keeps_no_more_than_a_smaller_dlq_takes(dlq_bytes: int) -> None:
    # a letter of 256 KiB of its span, refused by a DLQ taking less, was sent again for ever
    registry = Registry.load()
    settings = Settings.from_env({"VIGIL_MAX_PAYLOAD_BYTES": "100000"})
    keep = kept_payload(dlq_bytes)
    assert keep == dlq_bytes - 16_384
    gateway = Gateway(settings, Config(), registry, sender=None)  # type: ignore[arg-type]
    gateway.sized({settings.topics.dlq: dlq_bytes})
    big = _span("chat")
    big.attributes["gen_ai.prompt"] = "x" * 400_000
    [(view, why)] = gateway._map([big], "acme", "traces")[1]
    _topic, key, value = gateway._dead_letter(view, why, "acme", "/v1/traces")
    assert len(key) + len(value) < dlq_bytes
    letter = registry.decode(value, DEAD_LETTER_SCHEMA)
    assert len(letter["payload"]) == keep
    assert re.search(rf"\(dead letter keeps the first {keep:,} of 4\d\d,\d{{3}} bytes\)$",
                     letter["reason"]), letter["reason"]  # fmt: skip


def test_what_a_dead_letter_keeps_follows_the_dlq_limit() -> None:
    assert kept_payload(None) == MAX_KEPT_PAYLOAD  # the cluster did not say
    assert kept_payload(4 << 20) == kept_payload(MAX_LETTER_BYTES) == MAX_KEPT_PAYLOAD
    assert kept_payload(MAX_LETTER_BYTES - 1) == MAX_KEPT_PAYLOAD - 1
    assert kept_payload(LETTER_FRAMING) == kept_payload(1_000) == 0


def test_the_bytes_held_are_bounded_and_given_back_however_a_request_ends() -> None:
    held = gateway_module.Held(100)
    with held.request() as first:
        assert first.take(60) and first.take(20) and held.now == 80
        with held.request() as second:
            assert not second.take(30)  # would be 110: refused, nothing taken
            assert held.now == 80 and second.take(20) and held.now == 100
            assert not first.take(1)
        assert held.now == 80  # the second's 20 given back
        first.keep(50)  # what it did not need
        assert held.now == first.taken == 50
        first.keep(70)  # nothing to give back
        assert held.now == first.taken == 50
    assert held.now == 0
    with pytest.raises(RuntimeError), held.request() as failing:
        assert failing.take(100)
        raise RuntimeError("the request's handler failed")
    assert held.now == 0


def test_a_request_waits_for_room_as_others_give_theirs_back_or_for_so_long() -> None:
    """``take_waiting`` (gRPC's calls): room as soon as enough is given back, whether by a
    request ending or keeping less than it took; without room in time, nothing taken."""
    held = gateway_module.Held(100)

    async def waits() -> tuple[list[tuple[str, int, int]], bool, float]:
        seen = []
        with held.request() as first, held.request() as second:
            assert first.take(60) and second.take(30)
            with held.request() as waiting:
                wanted = asyncio.ensure_future(waiting.take_waiting(50, 10))
                await asyncio.sleep(0.05)
                seen.append(("both held", held.waiting, held.now))
                second.keep(0)  # 60 held: not room enough yet
                await asyncio.sleep(0.05)
                seen.append(("30 back", held.waiting, held.now))
                first.keep(40)  # 40 held: room
                assert await wanted
                seen.append(("taken", held.waiting, held.now))
                loop = asyncio.get_running_loop()
                started = loop.time()
                refused = not await waiting.take_waiting(50, 0.2)  # 90 held
                waited = loop.time() - started
                seen.append(("refused", held.waiting, held.now))
        return seen, refused, waited

    seen, refused, waited = asyncio.run(waits())
    assert seen == [("both held", 1, 90), ("30 back", 1, 60), ("taken", 0, 90),
                    ("refused", 0, 90)]  # fmt: skip
    assert refused and 0.2 <= waited < 5
    assert held.now == 0
