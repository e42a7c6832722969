"""The worker's Kafka consumer, as Faust builds it, waits at most FETCH_MAX_WAIT_MS for a fetch.

Faust fixes the wait at 1,500 ms. With it, a worker that fell behind once (a stall, a slow
insert) kept a standing queue of about 3 s at half capacity: aiokafka leaves partitions with
unconsumed records out of the next fetch, which then waits the whole 1.5 s on idle partitions
(docs/benchmarks.md, "Freshness after a stall"). This guards the override against Faust
renaming what it overrides."""

from __future__ import annotations

import asyncio

from pipeline.worker import FETCH_MAX_WAIT_MS, _App


def test_the_consumer_faust_creates_fetches_with_the_short_wait() -> None:
    async def created_consumer_wait() -> int:
        app = _App("vigil-test", broker="kafka://127.0.0.1:1", web_enabled=False)
        thread = app.consumer._thread  # the thread Faust runs the aiokafka consumer on
        try:
            consumer = thread._create_consumer(asyncio.get_running_loop())
            return int(consumer._fetch_max_wait_ms)
        finally:
            thread.thread_loop.close()  # never started: nothing else closes it

    assert FETCH_MAX_WAIT_MS < 1500
    assert asyncio.run(created_consumer_wait()) == FETCH_MAX_WAIT_MS
