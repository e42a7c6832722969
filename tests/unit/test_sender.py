"""The sender says what has waited long for the broker's acknowledgement, and still waits; closed,
it lets go of the broker."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pipeline import producer
from pipeline.kafkaconn import KafkaConnection
from pipeline.producer import KafkaSender, Unavailable
from tests.conftest import threads_in_child


def test_a_batch_not_acknowledged_for_long_is_said_once_with_its_topics(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(producer, "SLOW_ACK_SECONDS", 0.3)
    sender = KafkaSender(KafkaConnection("127.0.0.1:1"), {"log_level": 0})  # nobody there
    records = [("t-clean", b"k", b"secret value"), ("t-dlq", None, b"v"), ("t-clean", b"k", b"v")]
    try:
        with caplog.at_level(logging.WARNING, "vigil.producer"), pytest.raises(Unavailable) as late:
            asyncio.run(sender.send(records, timeout=1.0))
    finally:
        sender.close(timeout=0.1)
    assert str(late.value) == "the broker did not acknowledge within 1s"
    said = [r.getMessage() for r in caplog.records if r.name == "vigil.producer"]
    assert [line for line in said if "not acknowledged" in line] == [
        "3 record(s) for t-clean, t-dlq not acknowledged by Kafka after 0.3 s, still waiting: a "
        "broker down or out of reach, or a partition with fewer in-sync copies than its "
        "min.insync.replicas"
    ]
    assert not any("secret" in line for line in said)


def test_a_wait_shorter_than_the_slow_mark_says_nothing_of_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(producer, "SLOW_ACK_SECONDS", 5.0)
    sender = KafkaSender(KafkaConnection("127.0.0.1:1"), {"log_level": 0})
    try:
        with caplog.at_level(logging.WARNING, "vigil.producer"), pytest.raises(Unavailable):
            asyncio.run(sender.send([("t-clean", b"k", b"v")], timeout=0.5))
    finally:
        sender.close(timeout=0.1)
    assert not [r for r in caplog.records if "not acknowledged" in r.getMessage()]


def test_a_closed_sender_releases_its_producers_threads_and_gives_up_what_it_held() -> None:
    """Closed with a record the broker never took, a sender returns it as undelivered and its
    producer's threads are gone at once: they went on trying the broker, and logging it, for as
    long as anything held the sender (a worker's app in the tests: some 50 librdkafka threads
    were alive at the end of CI's integration tests). Closing the producer without giving up the
    record first would wait for it until message.timeout.ms (120 s here). In a process of its
    own, for the reason test_spool's emitter test gives."""
    alive, left, after, again = threads_in_child(
        "import asyncio\n"
        "from pipeline.kafkaconn import KafkaConnection\n"
        "from pipeline.producer import KafkaSender, Unavailable\n"
        "from tests.conftest import rdkafka_threads\n"
        "sender = KafkaSender(KafkaConnection('127.0.0.1:1'), {'log_level': 0})  # nobody there\n"
        "try: asyncio.run(sender.send([('t-clean', b'k', b'v')], timeout=0.2))\n"
        "except Unavailable: pass\n"
        "alive = rdkafka_threads()\n"
        "left = sender.close(timeout=0.2)\n"
        "print(alive, left, rdkafka_threads(), sender.close(timeout=0.2))\n"
    )
    assert alive > 0 and (left, after, again) == (1, 0, 0)
