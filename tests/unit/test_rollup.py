"""One-minute rollups: folded exactly, closed by the watermark, bounded in memory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pipeline.events import Cost, Enrichment, Event, Interaction, Unit
from pipeline.rollup import LATENCY_SAMPLE, Rollups

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def _call(i: int, ts: datetime, agent: str = "bot", error: bool = False) -> Event:
    return Event(
        event_id=f"e{i}", kind="interaction", ts=ts, tenant_id="acme", agent_id=agent,
        unit=Unit("ticket", f"T-{i}"),
        body=Interaction("openai", "gpt-4o", input_tokens=100, output_tokens=10,
                         cache_read_tokens=5, latency_ms=float(i % 100),
                         status="error" if error else "ok"),
        enrichment=Enrichment("priced", "0.001000000"),
    )  # fmt: skip


def test_windows_fold_exactly_and_close_after_the_watermark_passes() -> None:
    r = Rollups()
    for i in range(120):  # two minutes, one call a second
        r.add(_call(i, T0 + timedelta(seconds=i), error=i % 10 == 0))
    r.add(Event(event_id="c", kind="cost", ts=T0 + timedelta(seconds=5), tenant_id="acme",
                agent_id="bot", body=Cost(2.5), enrichment=Enrichment("non_token", "2.5")))  # fmt: skip
    assert r.close() == []  # the watermark (10:01:59) is within a minute of 10:01's end
    r.add(_call(999, T0 + timedelta(minutes=3)))
    first, *rest = r.close()  # now 10:00 and 10:01 are both over
    assert first["window_start"] == T0.isoformat() and first["model"] == "gpt-4o"
    assert (first["interactions"], first["errors"], first["input_tokens"]) == (60, 6, 6000)
    assert first["cache_read_tokens"] == 300 and first["unit_type"] == "ticket"
    assert first["latency_ms_p50"] == 30.0 and first["latency_ms_p99"] == 59.0
    cost = next(w for w in rest if w["model"] == "")  # the cost event's own key
    assert (cost["events"], cost["cost_usd"]) == (1, "2.5")
    assert cost["window_start"] == T0.isoformat()  # late, after 10:01's events: still 10:00
    assert sum(w["events"] for w in (first, *rest)) == 121
    assert len(r.open) == 1  # only 10:03 is still open


def test_memory_stays_bounded_however_many_keys_appear() -> None:
    r = Rollups(max_open=50)
    for i in range(1000):
        r.add(_call(i, T0, agent=f"agent-{i}"))
        closed = r.close()
        assert len(r.open) <= 50
        assert all(w["events"] == 1 for w in closed)
    assert len(r.close_all()) == 50 and not r.open
    big = Rollups()
    for i in range(5 * LATENCY_SAMPLE):
        big.add(_call(i, T0))
    (window,) = big.open.values()
    assert len(window.latencies) == LATENCY_SAMPLE and window.seen_latencies == 5 * LATENCY_SAMPLE


def test_a_fast_clock_does_not_close_the_windows_open_now() -> None:
    """A call stamped 50 minutes ahead of when it was stored (a producer's clock running fast)
    moves the watermark only to when it was stored: 10:00's window stays open for the calls
    still coming on time, and is published once, whole. The fast call keeps its own window."""
    r = Rollups()
    for i in range(30):
        r.add(_call(i, T0 + timedelta(seconds=i)), T0 + timedelta(seconds=i))
    r.add(_call(30, T0 + timedelta(minutes=50, seconds=30)), T0 + timedelta(seconds=30))
    assert r.close() == []
    for i in range(31, 60):
        r.add(_call(i, T0 + timedelta(seconds=i)), T0 + timedelta(seconds=i))
    r.add(_call(60, T0 + timedelta(minutes=2)), T0 + timedelta(minutes=2))
    (ten,) = r.close()
    assert (ten["window_start"], ten["interactions"]) == (T0.isoformat(), 59)
    assert {k[4] for k in r.open} == {T0 + timedelta(minutes=2), T0 + timedelta(minutes=50)}
    # taken at its own time, it published 10:00's window with the 30 calls before it
    fast = Rollups()
    for i in range(31):
        fast.add(_call(i, T0 + timedelta(seconds=i) + timedelta(minutes=50) * (i == 30)))
    assert [w["interactions"] for w in fast.close()] == [30]
