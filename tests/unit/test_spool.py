"""The SDK's spool: what it keeps comes back whole, in order, once; what a killed writer cut
short or a damaged file holds is named, and never taken for something else."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from contextlib import suppress
from pathlib import Path

import pytest

from connectors.sdk import DeliveryError, Emitter
from connectors.spool import SUFFIX, Spool, SpoolError, SpoolFull, encode_record, survey
from tests.conftest import threads_in_child


def _drain(spool: Spool) -> list[tuple[bytes | None, bytes]]:
    records: list[tuple[bytes | None, bytes]] = []
    while (taken := spool.take()) is not None:
        records.extend(taken.records())
        taken.done()
    return records


def test_records_come_back_in_order_across_segments_and_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=100)
    kept = [(f"k{i}".encode(), f"value {i}".encode() * 3) for i in range(20)]
    kept += [(None, b"no key"), (b"", b"")]
    for key, value in kept:
        spool.append(key, value)
    spool.seal()
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) > 3  # rolled at 100 bytes
    assert _drain(spool) == kept
    assert spool.take() is None and not spool.has_segments()
    assert spool.size == 0


def test_the_segment_being_written_is_not_taken_until_sealed(tmp_path: Path) -> None:
    writer, reader = Spool(tmp_path), Spool(tmp_path)
    writer.append(b"k", b"v")
    assert reader.take() is None  # its writer holds it
    writer.seal()
    assert _drain(reader) == [(b"k", b"v")]


def test_a_taken_segment_is_not_taken_twice(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(b"k", b"v")
    spool.seal()
    first = spool.take()
    assert first is not None
    assert Spool(tmp_path).take() is None  # held by the first
    first.done()
    assert Spool(tmp_path).take() is None  # and gone


def test_a_killed_writers_segment_is_taken_by_the_next(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys; from pathlib import Path; from connectors.spool import Spool\n"
        "s = Spool(Path(sys.argv[1]))\n"
        "for i in range(3): s.append(b'k', b'kept %d' % i)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=Path.cwd())
    assert run.returncode == -9
    assert _drain(Spool(tmp_path)) == [(b"k", b"kept 0"), (b"k", b"kept 1"), (b"k", b"kept 2")]


def test_a_record_cut_short_is_named_the_ones_before_it_sent_and_the_file_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole = encode_record(b"k", b"whole")
    (tmp_path / f"00000000000000000001-1-1{SUFFIX}").write_bytes(
        whole + encode_record(b"k", b"cut")[:-2]
    )
    with caplog.at_level(logging.WARNING):
        assert _drain(Spool(tmp_path)) == [(b"k", b"whole")]
    assert "not a whole record" in caplog.text and "00000000000000000001-1-1" in caplog.text
    [aside] = tmp_path.iterdir()  # not deleted: what was not read is kept for a person
    assert aside.name.endswith(".corrupt") and aside.read_bytes().startswith(whole)


def test_a_damaged_record_keeps_the_file_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = encode_record(b"k", b"first"), bytearray(encode_record(b"k", b"second"))
    second[-1] ^= 0xFF  # a flipped bit
    name = f"00000000000000000001-1-1{SUFFIX}"
    (tmp_path / name).write_bytes(first + bytes(second) + encode_record(b"k", b"third"))
    with caplog.at_level(logging.ERROR):
        assert _drain(Spool(tmp_path)) == [(b"k", b"first")]
    assert f"at byte {len(first)}" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [name + ".corrupt"]


def test_a_full_spool_refuses_and_keeps_what_it_has(tmp_path: Path) -> None:
    record = len(encode_record(b"k", b"x" * 100))
    spool = Spool(tmp_path, max_bytes=3 * record)
    for _ in range(3):
        spool.append(b"k", b"x" * 100)
    with pytest.raises(SpoolFull, match=f"holds {3 * record} bytes of at most {3 * record}"):
        spool.append(b"k", b"x" * 100)
    spool.seal()
    again = Spool(tmp_path, max_bytes=3 * record)  # the next process counts what is there
    with pytest.raises(SpoolFull):
        again.append(b"k", b"x")
    assert len(_drain(again)) == 3
    again.append(b"k", b"x")  # room again


def test_processes_sharing_a_folder_keep_to_one_limit_between_them(tmp_path: Path) -> None:
    record = len(encode_record(b"k", b"x" * 100))
    # each counts the folder again after 2 records of its own (a sixteenth of a segment)
    limit, segment = 40 * record, 32 * record
    # two Spools on one folder hold their locks as two processes would (flock is per open file)
    first, second = (Spool(tmp_path, max_bytes=limit, segment_bytes=segment) for _ in range(2))
    kept = 0
    for _ in range(60):
        for spool in (first, second):
            with suppress(SpoolFull):
                spool.append(b"k", b"x" * 100)
                kept += 1
    assert 40 <= kept <= 40 + 2  # past the limit by at most the other's uncounted records
    assert sum(path.stat().st_size for path in tmp_path.glob(f"*{SUFFIX}")) == kept * record


def test_room_another_process_made_by_sending_is_seen(tmp_path: Path) -> None:
    record = len(encode_record(b"k", b"x" * 100))
    writer = Spool(tmp_path, max_bytes=10 * record, segment_bytes=4 * record)
    for _ in range(10):
        writer.append(b"k", b"x" * 100)
    writer.seal()
    sender = Spool(tmp_path, max_bytes=10 * record)  # another process, which sends them
    assert len(_drain(sender)) == 10
    for _ in range(10):
        writer.append(b"k", b"x" * 100)  # the writer counted 10 records; the folder is empty
    with pytest.raises(SpoolFull):
        writer.append(b"k", b"x" * 100)


def test_an_unnamed_file_of_a_dead_writer_is_cleared(tmp_path: Path) -> None:
    (tmp_path / f".00000000000000000001-1-1{SUFFIX}.new").write_bytes(b"")
    spool = Spool(tmp_path)
    assert not list(tmp_path.iterdir())
    spool.append(b"k", b"v")
    spool.seal()
    assert _drain(spool) == [(b"k", b"v")]


def test_the_process_wide_emitter_keeps_what_it_could_not_send_where_settings_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connectors import sdk
    from pipeline.services import free_port

    monkeypatch.setenv("VIGIL_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")  # nobody there
    monkeypatch.setenv("VIGIL_SDK_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setattr(sdk, "_default", None)
    monkeypatch.setattr(sdk.atexit, "register", lambda _close: None)
    sdk.emit({"event_id": "ev-1", "kind": "decision", "ts": "2026-11-20T14:05:00Z",
              "tenant_id": "acme", "agent_id": "bot", "subject_event_id": "ev-0",
              "decision": "approved", "reviewer_id": "rev-7"})  # fmt: skip
    emitter = sdk._default
    assert emitter is not None
    emitter.close(timeout=0.5)  # no DeliveryError: kept
    assert emitter.spooled == 1
    taken = Spool(tmp_path / "spool").take()
    assert taken is not None
    [(key, value)] = list(taken.records())
    assert key == b"acme/bot" and b"ev-1" in value


def test_librdkafkas_lines_go_through_logging_not_to_stderr(
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from connectors.sdk import Emitter
    from pipeline.services import free_port

    emitter = Emitter(f"127.0.0.1:{free_port()}", "t")  # nobody there
    with caplog.at_level(logging.DEBUG, "vigil.rdkafka"):
        emitter.emit_raw(b"k", b"v")
        for _ in range(20):  # librdkafka's lines are handed over as the emitter polls
            emitter.flush(0.25)
            if any(r.name == "vigil.rdkafka" for r in caplog.records):
                break
    assert any(r.name == "vigil.rdkafka" and "Connect" in r.getMessage() for r in caplog.records)
    assert "rdkafka#producer" not in capfd.readouterr().err
    with pytest.raises(DeliveryError):
        emitter.close(timeout=0.1)


def test_a_write_that_fails_ends_the_segment_at_its_last_whole_record(tmp_path: Path) -> None:
    script = (
        "import resource, signal, sys; from pathlib import Path\n"
        "from connectors.spool import Spool, SpoolError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # as a full disk would\n"
        "s = Spool(Path(sys.argv[1]))\n"
        "kept = 0\n"
        "try:\n"
        "    while True: s.append(b'k', b'x' * 150); kept += 1\n"
        "except SpoolError as exc: print(kept, exc)\n"
        "s.append(b'k', b'y' * 150)  # the next starts a segment of its own\n"
        "s.close()\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, cwd=Path.cwd())  # fmt: skip
    assert run.returncode == 0, run.stderr
    kept, said = run.stdout.split(" ", 1)
    assert int(kept) == 1000 // len(encode_record(b"k", b"x" * 150))
    assert f"the spool in {tmp_path} cannot be written" in said
    assert _drain(Spool(tmp_path)) == [(b"k", b"x" * 150)] * int(kept) + [(b"k", b"y" * 150)]
    assert not list(tmp_path.iterdir())  # nothing set aside as corrupt


def test_a_spool_or_resend_that_cannot_work_is_refused_when_the_emitter_is_made(
    tmp_path: Path,
) -> None:
    a_file = tmp_path / "spool"
    a_file.write_text("not a folder")
    with pytest.raises(SpoolError, match=f"the spool folder {a_file} cannot be used: File exists"):
        Emitter("127.0.0.1:1", spool=a_file)
    with pytest.raises(ValueError, match="spool_max_bytes: expected at least 1 byte, got 0"):
        Emitter("127.0.0.1:1", spool=tmp_path / "s", spool_max_bytes=0)
    for wait in (0, -1, float("nan")):  # 0 was a thread that never slept
        with pytest.raises(ValueError, match="resend_seconds: expected seconds above 0 or None"):
            Emitter("127.0.0.1:1", spool=tmp_path / "s", resend_seconds=wait)


def test_an_event_given_to_a_closed_emitter_is_refused_not_lost_at_exit(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

    from connectors.otel import VigilSpanExporter
    from connectors.sdk import EmitterClosed

    event = {"event_id": "ev-late", "kind": "decision", "ts": "2026-11-20T14:05:00Z",
             "tenant_id": "acme", "agent_id": "bot", "subject_event_id": "ev-0",
             "decision": "approved", "reviewer_id": "rev-7"}  # fmt: skip
    for spool in (None, tmp_path / "spool"):  # queued after close, it was in no flush or spool
        emitter = Emitter("127.0.0.1:1", "t", spool=spool)
        emitter.close(timeout=0.1)
        with pytest.raises(EmitterClosed, match="event 'ev-late' given to the emitter to t after"):
            emitter.emit(event)
        with pytest.raises(EmitterClosed, match="a message given to the emitter to t after"):
            emitter.emit_raw(b"k", b"v")
    exporter = VigilSpanExporter(emitter, tenant_id="acme", agent_id="bot")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = provider.get_tracer("t").start_span("chat", attributes={
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"})  # fmt: skip
    span.end()
    assert exporter.export([span]) == SpanExportResult.FAILURE  # type: ignore[list-item]


def test_close_gives_up_what_is_in_flight_once_and_releases_the_producer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    emitter = Emitter("127.0.0.1:1", "t")  # nobody there
    for i in range(3):
        emitter.emit_raw(b"k", b"v%d" % i)
    with caplog.at_level(logging.ERROR, "connectors.sdk"), pytest.raises(DeliveryError) as caught:
        emitter.close(timeout=0.2)
    assert str(caught.value) == (
        "3 event(s) were not delivered to Kafka: 3 still in flight after 0.2 s"
    )
    # one line for the three, not one each (a `vigil send` of 100,000 wrote 100,000)
    assert [r.getMessage() for r in caplog.records if r.name == "connectors.sdk"] == [
        "3 event(s) still in flight after 0.2 s given up"
    ]
    assert emitter.flush(1) == 0
    with pytest.raises(DeliveryError):
        emitter.close(timeout=0.1)  # a second close says the same


def test_a_closed_emitter_releases_its_producers_threads() -> None:
    """Closed, an emitter's producer no longer tries the broker (and logs it) until it is
    collected: its threads are gone. In a process of its own: this one holds clients earlier
    tests left to the collector, whose threads start and end at any time (one started while an
    emitter was made here was taken for the emitter's, and outlived its close)."""
    alive, after = threads_in_child(
        "from connectors.sdk import DeliveryError, Emitter\n"
        "from tests.conftest import rdkafka_threads\n"
        "emitter = Emitter('127.0.0.1:1', 't')  # nobody there\n"
        "for i in range(3): emitter.emit_raw(b'k', b'v%d' % i)\n"
        "alive = rdkafka_threads()\n"
        "try: emitter.close(timeout=0.2)\n"
        "except DeliveryError: pass\n"
        "print(alive, rdkafka_threads())\n"
    )
    assert alive > 0 and after == 0


def test_an_emitter_dropped_unclosed_is_collected_with_its_renewal_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the thread that looks whether the producer must be renewed holds it weakly: held
    # strongly, every emitter ever made would have kept its librdkafka client trying the broker
    monkeypatch.setattr("pipeline.producer.RENEW_AFTER_SECONDS", 0.2)
    before = set(threading.enumerate())
    emitter = Emitter("127.0.0.1:1", "t")  # nobody there
    renewing = weakref.ref(emitter._kafka)
    watching = {t for t in set(threading.enumerate()) - before if t.name == "vigil-kafka-renew"}
    assert len(watching) == 1
    del emitter
    gc.collect()
    wait = time.monotonic() + 10
    while any(t.is_alive() for t in watching) and time.monotonic() < wait:
        time.sleep(0.1)
    assert renewing() is None
    assert not any(t.is_alive() for t in watching)


def test_close_while_an_emit_waits_for_room_refuses_that_emit() -> None:
    # the producer's queue holds one message and nobody takes it: a second emit waits for room;
    # a close() then closed the producer under it, and its next poll raised RuntimeError
    # ("Producer has been closed") out of emit, the message in no count
    from connectors.sdk import EmitterClosed

    emitter = Emitter("127.0.0.1:1", "t", config={"queue.buffering.max.messages": 1})
    emitter.emit_raw(b"k", b"first")
    outcome: list[BaseException | None] = []

    def second() -> None:
        try:
            emitter.emit_raw(b"k", b"second")
            outcome.append(None)
        except BaseException as exc:  # what the thread met is the test's
            outcome.append(exc)

    waiting = threading.Thread(target=second)
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive()  # waiting for room in the queue
    with pytest.raises(DeliveryError, match="1 event\\(s\\) were not delivered"):
        emitter.close(timeout=2)  # the first given up; the second never queued
    waiting.join(5)
    assert not waiting.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], EmitterClosed)
    assert "close() was called while the producer's queue was full" in str(outcome[0])
    assert emitter.failed == 1


def test_events_not_delivered_are_said_in_a_few_lines_not_one_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a `vigil send` or `dlq replay` of 100,000 to a broker that is away wrote 100,000 lines;
    # a spool that is full wrote one for each event it refused
    for spool in (None, tmp_path / "spool"):
        caplog.clear()
        emitter = Emitter("127.0.0.1:1", "t", config={"message.timeout.ms": 300}, spool=spool,
                          spool_max_bytes=100, resend_seconds=None)  # fmt: skip
        for i in range(200):
            emitter.emit_raw(b"k", b"v%d" % i)
        with caplog.at_level(logging.ERROR, "connectors.sdk"), pytest.raises(DeliveryError):
            emitter.close(timeout=5)
        lines = [r.getMessage() for r in caplog.records if r.name == "connectors.sdk"]
        kept = emitter.spooled
        assert emitter.failed == 200 - kept and (spool is None) == (kept == 0)
        said = sum(int(m.split()[0]) if m[0].isdigit() else 1 for m in lines
                   if "not delivered" in m)  # fmt: skip
        assert said == 200 - kept  # every one counted in a line, in two lines
        assert len(lines) == (2 if spool is None else 3)
        if spool is not None:
            assert lines[0].startswith("the spool does not take what the broker did not")


def test_the_spools_thread_outlives_a_round_that_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # an exception out of one round ended the thread: nothing the spool held was sent again
    rounds: list[int] = []

    def send_spooled() -> int:
        rounds.append(1)
        if len(rounds) == 1:
            raise OSError("the disk went away")
        return 0

    emitter = Emitter("127.0.0.1:1", "t", spool=tmp_path / "s", resend_seconds=0.05)
    monkeypatch.setattr(emitter, "send_spooled", send_spooled)
    with caplog.at_level(logging.ERROR, "connectors.sdk"):
        deadline = time.monotonic() + 10
        while len(rounds) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    emitter.close(timeout=0.1)
    assert len(rounds) >= 3
    assert "sending the spool in " in caplog.text
    assert "again failed (OSError: the disk went away); tried again in 0.05 s" in caplog.text


def test_what_is_not_a_file_in_the_folder_is_not_a_segment(tmp_path: Path) -> None:
    # a folder, or a pipe, named like a segment: IsADirectoryError in every reader (the spool's
    # thread that sends again too), or an open() that never returned
    spool = Spool(tmp_path)
    spool.append(b"k", b"v")
    spool.seal()
    (tmp_path / f"0-folder{SUFFIX}").mkdir()
    os.mkfifo(tmp_path / f"0-pipe{SUFFIX}")
    segments, corrupt = survey(tmp_path)
    assert [(s.records, s.whole) for s in segments] == [(1, True)] and corrupt == []
    assert spool.has_segments()
    assert _drain(spool) == [(b"k", b"v")]
