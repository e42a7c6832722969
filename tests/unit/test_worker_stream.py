"""The worker's weighted take (``WorkerStream.noack_take_weighted``) on a real Faust stream, fed
through Faust's own in-memory test channel: a batch is full by weight, a short batch comes after
``within``, and nothing is acknowledged until the agent says so."""

from __future__ import annotations

import asyncio
from typing import Any

from pipeline.worker import WorkerApp, batch_weight

# A short batch is handed out ``within`` seconds after the take began waiting, which may be
# before the first event arrives: at 0.2 s a loaded machine once cut the first batch short
# ([2, 3, 2] events for [3, 3, 1]) while the test context started and the events came in.
WITHIN = 1.0


def _take(values: list[bytes], max_weight: int, within: float) -> list[list[tuple[bytes, bool]]]:
    """Put ``values`` through an agent taking by weight (a value weighs its length), which
    acknowledges every event but ``b"c"``; return each batch as (value, acknowledged at the
    end)."""
    app = WorkerApp(
        "vigil-test-weighted",
        broker="memory://",
        store="memory://",
        web_enabled=False,
        value_serializer="raw",
    )
    taken: list[list[Any]] = []

    @app.agent()  # type: ignore[untyped-decorator]
    async def taker(stream: Any) -> None:
        async for batch in stream.noack_take_weighted(max_weight, within, lambda e: len(e.value)):
            taken.append(batch)
            for event in batch:
                if event.value != b"c":
                    await stream.ack(event)

    async def main() -> None:
        async with taker.test_context() as agent:
            for value in values:
                await agent.put(value)
            await asyncio.sleep(within * 3)

    asyncio.run(main())
    return [[(e.value, e.message.acked) for e in batch] for batch in taken]


def test_a_batch_is_full_once_its_weight_is_reached_and_the_rest_comes_within() -> None:
    batches = _take([b"aaaa", b"bbbbbb", b"c", b"d" * 11, b"ee"], max_weight=10, within=WITHIN)
    assert batches == [
        [(b"aaaa", True), (b"bbbbbb", True)],  # 10: full
        [(b"c", False), (b"d" * 11, True)],  # one heavy event fills a batch, whatever came first
        [(b"ee", True)],  # not full: handed out after ``within``
    ]  # and only what the agent acknowledged is acknowledged


def test_a_count_of_one_per_event_takes_like_faust_noack_take() -> None:
    batches = _take([b"x"] * 7, max_weight=3, within=WITHIN)
    assert [len(b) for b in batches] == [3, 3, 1]


def test_a_batch_is_full_at_its_count_of_events_or_its_bytes_whichever_comes_first() -> None:
    # full at 5,000 events or 32 MiB: a unit of 6,710 bytes
    def weight(events: int, size: int) -> int:
        return batch_weight(events, size, 5000, 32 * 1024 * 1024)

    assert weight(1, 700) == 1  # small events count as events
    assert weight(285, 190_000) == 285  # an EventBatch of small events: its events
    assert weight(1, 50_000) == 8  # a 50 KB event: its bytes
    assert weight(3, 190_000) == 29  # an EventBatch of three of them: its bytes
    assert 5000 // weight(1, 50_000) * 50_000 <= 32 * 1024 * 1024  # so a batch stays in budget
