"""The worker's Kafka consumer, as Faust builds it.

It waits at most FETCH_MAX_WAIT_MS for a fetch. Faust fixes the wait at 1,500 ms. With it, a
worker that fell behind once (a stall, a slow insert) kept a standing queue of about 3 s at
half capacity: aiokafka leaves partitions with unconsumed records out of the next fetch, which
then waits the whole 1.5 s on idle partitions (docs/benchmarks.md, "Freshness after a stall").

It hands a fetched message to its stream without tasks when that does not block, and with
Faust's own ``wait_first`` (a rebalance abandons the delivery) when it does. It keeps no
per-message statistics (Faust's Monitor is not a sensor of the worker's app).

These guard the overrides against Faust renaming or changing what they override."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from pipeline.worker import FETCH_MAX_WAIT_MS, WorkerApp


def test_the_consumer_faust_creates_fetches_with_the_short_wait() -> None:
    async def created_consumer_wait() -> int:
        app = WorkerApp("vigil-test", broker="kafka://127.0.0.1:1", web_enabled=False)
        thread = app.consumer._thread  # the thread Faust runs the aiokafka consumer on
        try:
            consumer = thread._create_consumer(asyncio.get_running_loop())
            return int(consumer._fetch_max_wait_ms)
        finally:
            thread.thread_loop.close()  # never started: nothing else closes it

    assert FETCH_MAX_WAIT_MS < 1500
    assert asyncio.run(created_consumer_wait()) == FETCH_MAX_WAIT_MS


def _with_consumer(body: Callable[[Any, list[str]], Awaitable[None]]) -> list[str]:
    """Run ``body(consumer, tasks)`` on a fresh loop; ``tasks`` names every task created."""
    tasks: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
            tasks.append(getattr(coro, "__qualname__", repr(coro)))
            return asyncio.Task(coro, loop=loop, **kw)

        app = WorkerApp("vigil-test", broker="kafka://127.0.0.1:1", web_enabled=False)
        try:
            loop.set_task_factory(counting_factory)
            await body(app.consumer, tasks)
        finally:
            loop.set_task_factory(None)
            app.consumer._thread.thread_loop.close()

    asyncio.run(main())
    return tasks


def test_a_delivery_that_does_not_block_runs_without_tasks() -> None:
    delivered: list[int] = []

    async def deliver(n: int) -> None:
        delivered.append(n)

    async def body(consumer: Any, tasks: list[str]) -> None:
        for n in range(3):
            await consumer.wait_first(deliver(n), consumer.suspend_flow.wait())

    assert _with_consumer(body) == []
    assert delivered == [0, 1, 2]


def test_a_delivery_that_blocks_finishes_when_what_it_waits_for_is_done() -> None:
    steps: list[str] = []

    async def deliver(room: asyncio.Future[str]) -> str:
        steps.append("started")
        steps.append(await room)
        await asyncio.sleep(0)
        steps.append("put")
        return "delivered"

    async def body(consumer: Any, tasks: list[str]) -> None:
        room: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, room.set_result, "room")
        result = await consumer.wait_first(deliver(room), consumer.suspend_flow.wait())
        assert result.results == ["delivered"] and not result.stopped

    tasks = _with_consumer(body)
    assert steps == ["started", "room", "put"]
    assert tasks and "_finish" in tasks  # the rest went through Faust's wait_first


def test_a_rebalance_abandons_a_blocked_delivery_as_faust_does() -> None:
    steps: list[str] = []

    async def deliver(never: asyncio.Future[None]) -> None:
        try:
            await never
        except asyncio.CancelledError:
            steps.append("cancelled at its wait")
            raise
        steps.append("put")

    async def body(consumer: Any, tasks: list[str]) -> None:
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.05, consumer.stop_flow)  # what a revoke does
        result = await consumer.wait_first(deliver(never), consumer.suspend_flow.wait())
        assert result.results == [True]  # suspend_flow.wait() won
        await asyncio.sleep(0.01)  # the abandoned delivery's cancellation runs

    _with_consumer(body)
    assert steps == ["cancelled at its wait"]


def test_a_failing_delivery_raises_whether_or_not_it_blocked() -> None:
    async def fails_at_once() -> None:
        raise ValueError("cannot decode")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("cannot decode later")

    async def body(consumer: Any, tasks: list[str]) -> None:
        with pytest.raises(ValueError, match="cannot decode"):
            await consumer.wait_first(fails_at_once(), consumer.suspend_flow.wait())
        with pytest.raises(ValueError, match="cannot decode later"):
            await consumer.wait_first(fails_later(), consumer.suspend_flow.wait())

    _with_consumer(body)


def test_the_worker_keeps_no_per_message_statistics() -> None:
    async def sensors_and_monitor() -> tuple[list[Any], Any]:
        app = WorkerApp("vigil-test", broker="kafka://127.0.0.1:1", web_enabled=False)
        try:
            app.on_init_dependencies()  # where Faust adds its monitor to the sensors
            return list(app.sensors), app.monitor
        finally:
            app.consumer._thread.thread_loop.close()

    sensors, monitor = asyncio.run(sensors_and_monitor())
    assert monitor not in sensors
    assert monitor is not None  # the consumer still reports offsets to it
