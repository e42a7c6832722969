"""The worker's batch pipelining (``worker._pipelined``), on a stand-in for a stream of batches:
order, one batch in flight, and failures that surface even when no next batch comes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pipeline.worker import _pipelined


async def batches(given: list[list[int]]) -> AsyncIterator[list[int]]:
    """Yields the given batches, then waits forever, as an idle topic does."""
    for batch in given:
        yield batch
    await asyncio.Event().wait()


def test_batches_are_worked_one_at_a_time_in_order_while_the_next_is_taken() -> None:
    log: list[str] = []

    async def work(batch: list[Any]) -> None:
        log.append(f"start {batch[0]}")
        await asyncio.sleep(0.01)
        log.append(f"end {batch[0]}")

    async def run() -> None:
        task = asyncio.ensure_future(_pipelined(batches([[1], [2], [3]]), work))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert log == ["start 1", "end 1", "start 2", "end 2", "start 3", "end 3"]


def test_a_failing_batch_raises_at_once_even_when_no_next_batch_comes() -> None:
    async def work(batch: list[Any]) -> None:
        await asyncio.sleep(0.01)
        raise ValueError(f"batch {batch[0]} failed")

    async def run() -> None:
        await asyncio.wait_for(_pipelined(batches([[7]]), work), timeout=5)

    with pytest.raises(ValueError, match="batch 7 failed"):
        asyncio.run(run())


def test_a_failure_seen_when_the_next_batch_arrives_is_raised_too() -> None:
    async def work(batch: list[Any]) -> None:
        if batch[0] == 1:
            raise ValueError("first batch failed")

    async def run() -> None:
        await asyncio.wait_for(_pipelined(batches([[1], [2]]), work), timeout=5)

    with pytest.raises(ValueError, match="first batch failed"):
        asyncio.run(run())
