"""How the worker closes its raw consumer on stop (``worker._RawTopic.close``): after any call
still running on the consumer's thread, and for at most its timeout. librdkafka's commit and
close wait for the group coordinator, so with the broker down a close can take as long as the
coordinator is away; once a worker's SIGTERM waited on it until the worker was killed. The
consumer here is a stand-in whose close blocks, raises or returns as told; the real consumer's
close, with the broker up and down, is exercised by tests/integration/test_faults.py."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException

from pipeline.settings import Settings
from pipeline.worker import _RawTopic


class _Consumer:
    def __init__(self, close: threading.Event | Exception | None = None) -> None:
        self._close = close
        self.calls: list[str] = []

    def slow_call(self) -> None:
        time.sleep(0.3)
        self.calls.append("slow call ended")

    def close(self) -> None:
        self.calls.append("close")
        if isinstance(self._close, threading.Event):
            self._close.wait()
        elif isinstance(self._close, Exception):
            raise self._close

    def __repr__(self) -> str:
        return "BatchConsumer(stand-in)"


def _raw_topic(tmp_path: Path, consumer: _Consumer) -> _RawTopic:
    raw = _RawTopic(Settings.from_env({"VIGIL_HOME": str(tmp_path)}))
    raw._consumer = consumer  # type: ignore[assignment]
    return raw


def test_a_close_that_does_not_return_is_given_up_after_its_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    never = threading.Event()
    consumer = _Consumer(close=never)
    raw = _raw_topic(tmp_path, consumer)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="vigil.worker"):
            asyncio.run(raw.close(timeout=0.5))
        took = time.monotonic() - started
        assert consumer.calls == ["close"]
        assert 0.5 <= took < 5, f"close returned after {took:.1f} s"
        assert "BatchConsumer(stand-in) did not commit and leave its group within" in caplog.text
        # the thread left closing is a daemon: it cannot keep the worker's process alive
        closing = [t for t in threading.enumerate() if t.name == "vigil-raw-close"]
        assert closing and all(t.daemon for t in closing)
    finally:
        never.set()


def test_the_close_comes_after_a_call_still_running_and_is_awaited(tmp_path: Path) -> None:
    consumer = _Consumer()
    raw = _raw_topic(tmp_path, consumer)

    async def stop_during_a_call() -> None:
        running = asyncio.ensure_future(raw._call(consumer.slow_call))
        await asyncio.sleep(0.05)  # the slow call is on the consumer's thread
        await raw.close(timeout=5)
        assert running.done()

    asyncio.run(stop_during_a_call())
    assert consumer.calls == ["slow call ended", "close"]
    assert raw._consumer is None
    asyncio.run(raw.close(timeout=5))  # a second close does nothing
    assert consumer.calls == ["slow call ended", "close"]


def test_a_failed_close_raises_its_error(tmp_path: Path) -> None:
    failure = KafkaException(KafkaError(KafkaError._FATAL, "fenced"))
    raw = _raw_topic(tmp_path, _Consumer(close=failure))
    with pytest.raises(KafkaException) as raised:
        asyncio.run(raw.close(timeout=5))
    assert raised.value is failure
