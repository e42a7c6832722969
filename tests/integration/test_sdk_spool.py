"""The SDK's spool against a real broker: events the broker did not take while it was away,
and those of an emitter that closed or was killed before it came back, reach the raw topic,
each once, by event_id accounting."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from connectors.sdk import Emitter
from connectors.spool import SUFFIX, encode_record
from pipeline.codec import Registry
from pipeline.devkafka import LocalKafka, fetch_jars
from pipeline.events import Event, Interaction, InvalidEvent
from pipeline.services import free_port
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.integration.conftest import events_on, vigil, wait_until

pytestmark = pytest.mark.integration

FAST_TIMEOUT = {"message.timeout.ms": 3000}  # a broker away 3 s is away, here


def _event(event_id: str) -> Event:
    return Event(event_id=event_id, kind="interaction", ts=datetime.now(UTC), tenant_id="acme",
                 agent_id="spool-bot", body=Interaction("openai", "gpt-4o", input_tokens=7))  # fmt: skip


def _ids_on_raw(bootstrap: str, topic: str, expected: set[str]) -> list[str]:
    events = events_on(bootstrap, topic, lambda seen: {e.event_id for e in seen} >= expected)
    return sorted(event.event_id for event in events)


def _segments(folder: Path) -> list[Path]:
    return list(folder.glob(f"*{SUFFIX}"))


def test_what_a_closed_or_killed_emitter_kept_is_sent_by_the_next(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ensure_topics(settings)
    folder = tmp_path / "spool"
    nobody = f"127.0.0.1:{free_port()}"  # where no broker answers

    closed = Emitter(nobody, settings.topics.raw, spool=folder)  # messages wait 300 s
    with caplog.at_level(logging.WARNING):
        for i in range(200):
            closed.emit(_event(f"closed-{i}"))
        closed.close(timeout=2)  # no DeliveryError: what is still queued is kept
    assert (closed.spooled, closed.failed, closed.delivered) == (200, 0, 0)
    assert caplog.text.count("the broker does not take events") == 1  # once, not per event
    assert f"kept in {folder}" in caplog.text

    script = (
        "import os, signal, sys\n"
        "from connectors.sdk import Emitter\n"
        "from tests.integration.test_sdk_spool import FAST_TIMEOUT, _event\n"
        "e = Emitter(sys.argv[1], sys.argv[2], spool=sys.argv[3], config=FAST_TIMEOUT)\n"
        "for i in range(50): e.emit(_event(f'killed-{i}'))\n"
        "while e.spooled < 50: e.flush(0.2)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, nobody, settings.topics.raw,
                             str(folder)], timeout=60)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    exits = (
        "import sys\n"
        "from connectors.sdk import Emitter\n"
        "from tests.integration.test_sdk_spool import _event\n"
        "e = Emitter(sys.argv[1], sys.argv[2], spool=sys.argv[3])\n"
        "for i in range(30): e.emit(_event(f'exited-{i}'))\n"
    )  # and exits without closing it, its messages queued for 300 s more
    exited = subprocess.run([sys.executable, "-c", exits, nobody, settings.topics.raw,
                             str(folder)], timeout=60)  # fmt: skip
    assert exited.returncode == 0
    assert len(_segments(folder)) == 3  # the closed one's, the killed one's, the exited one's

    sender = Emitter(settings.bootstrap, settings.topics.raw, spool=folder, resend_seconds=0.2)
    sender.emit(_event("live-0"))
    wait_until(lambda: not _segments(folder), 60, "the spool sent")
    sender.close()
    assert (sender.failed, sender.delivered) == (0, 281)
    expected = {f"closed-{i}" for i in range(200)} | {f"killed-{i}" for i in range(50)}
    expected |= {f"exited-{i}" for i in range(30)}
    expected.add("live-0")
    assert _ids_on_raw(settings.bootstrap, settings.topics.raw, expected) == sorted(expected)
    assert not list(folder.iterdir())


def test_a_broker_away_past_the_message_timeout_loses_nothing(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    broker = LocalKafka(tmp_path / "kafka", fetch_jars(Settings.from_env(vigil_env).cache_dir),
                        free_port(2))  # fmt: skip
    broker.start()
    settings = Settings.from_env({**vigil_env, "VIGIL_KAFKA_BOOTSTRAP": broker.bootstrap})
    folder = tmp_path / "spool"
    try:
        ensure_topics(settings)
        warm = Emitter(settings.bootstrap, settings.topics.raw)  # the new topic's leaders known
        warm.emit(_event("warm-up"))
        warm.close()
        emitter = Emitter(settings.bootstrap, settings.topics.raw, spool=folder,
                          config=FAST_TIMEOUT, resend_seconds=0.5)  # fmt: skip
        for i in range(100):
            emitter.emit(_event(f"before-{i}"))
        assert emitter.flush(30) == 0 and emitter.delivered == 100
        broker.stop()
        for i in range(100):
            emitter.emit(_event(f"away-{i}"))
        deadline = time.monotonic() + 30
        while emitter.spooled < 100 and time.monotonic() < deadline:
            emitter.flush(0.5)  # serves the failures' reports, which keep them
        assert (emitter.spooled, emitter.failed) == (100, 0)
        broker.start()
        for i in range(100):
            emitter.emit(_event(f"after-{i}"))
        wait_until(lambda: emitter.delivered >= 300 and not _segments(folder), 90,
                   "the kept events sent again", lambda: repr(emitter))  # fmt: skip
        emitter.close()
        assert emitter.failed == 0 and not _segments(folder)
        expected = {f"{when}-{i}" for when in ("before", "away", "after") for i in range(100)}
        expected.add("warm-up")
        assert _ids_on_raw(settings.bootstrap, settings.topics.raw, expected) == sorted(expected)
    finally:
        broker.stop()


def test_vigil_spool_shows_and_sends_what_an_agent_left(
    vigil_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    ensure_topics(settings)
    folder = tmp_path / "spool"
    nobody = f"127.0.0.1:{free_port()}"
    left = Emitter(nobody, settings.topics.raw, spool=folder)
    for i in range(40):
        left.emit(_event(f"left-{i}"))
    left.close(timeout=1)  # the agent is gone; its 40 events wait in the folder
    damaged = encode_record(b"acme/spool-bot", Registry.load().encode_event(_event("damaged-0")))
    (folder / f"00000000000000000001-1-1{SUFFIX}").write_bytes(damaged + b"VS\x00\x01")

    shown = vigil(vigil_env, "spool", "show", str(folder))
    assert shown.returncode == 0, shown.stderr
    assert "41 event(s) waiting in 2 segment(s)" in shown.stderr
    assert "0 held by a running process; 0 set aside as .corrupt" in shown.stderr
    assert shown.stdout.count("waiting; does not read to its end") == 1

    unreachable = vigil({**vigil_env, "VIGIL_KAFKA_BOOTSTRAP": nobody},
                        "spool", "send", str(folder), "--timeout", "2")  # fmt: skip
    assert unreachable.returncode == 1
    assert "did not take them all within 2 s: run it again" in unreachable.stderr
    assert "41 event(s) waiting in 2 segment(s)" in unreachable.stderr  # nothing lost

    sent = vigil(vigil_env, "spool", "send", str(folder), "--timeout", "60")
    assert sent.returncode == 1, sent.stderr  # the damaged file is left for a person
    assert "41 event(s) sent to" in sent.stderr
    assert "0 event(s) waiting in 0 segment(s)" in sent.stderr
    assert "1 set aside as .corrupt" in sent.stderr
    expected = {f"left-{i}" for i in range(40)} | {"damaged-0"}
    assert _ids_on_raw(settings.bootstrap, settings.topics.raw, expected) == sorted(expected)


def test_a_kept_message_larger_than_this_emitter_sends_goes_for_the_dlq(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spool left by an emitter that sent larger messages: produce() refused the record with
    a KafkaException, which ended the spool's thread, and nothing it held was sent again."""
    ensure_topics(settings)
    folder = tmp_path / "spool"
    folder.mkdir()
    registry = Registry.load()
    small, large = (registry.encode_event(_event(name)) for name in ("small", "large"))
    large += b"\x00" * 2000  # past what the emitter below sends
    (folder / f"00000000000000000001-1-1{SUFFIX}").write_bytes(
        encode_record(b"acme/spool-bot", large) + encode_record(b"acme/spool-bot", small)
    )
    emitter = Emitter(settings.bootstrap, settings.topics.raw, spool=folder, resend_seconds=0.2,
                      config={"message.max.bytes": 1500})  # fmt: skip
    with caplog.at_level(logging.WARNING, "connectors.sdk"):
        wait_until(lambda: not _segments(folder), 60, "the spool sent", lambda: caplog.text)
    emitter.close()
    assert (emitter.delivered, emitter.failed) == (2, 0)
    assert f"a message of {len(large)} bytes in 00000000000000000001-1-1{SUFFIX}" in caplog.text
    values = _values_on(settings.bootstrap, settings.topics.raw, 2)
    assert values[1] == small
    with pytest.raises(InvalidEvent) as refused:  # what the worker makes of the other
        registry.read_event(values[0])
    assert refused.value.code == "oversized"
    assert refused.value.reason == (
        "payload: its emitter could not encode the event: oversized: a message kept in the "
        f"spool is {len(large):,} bytes encoded; its emitter sends 1,500 at most "
        "(message.max.bytes)"
    )


def _values_on(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """The first ``count`` messages' values on ``topic`` (one partition's, in order)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{time.time_ns()}",
                         "auto.offset.reset": "earliest"})  # fmt: skip
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while len(values) < count and time.monotonic() < deadline:
            values += [m.value() for m in consumer.consume(10, timeout=1) if m.error() is None]
    finally:
        consumer.close()
    return values
