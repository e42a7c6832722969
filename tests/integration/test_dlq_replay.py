"""`vigil dlq list` shows what was rejected and why; `vigil dlq replay` re-ingests what a
configuration change made acceptable, once, and leaves the rest rejected."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.sdk import Emitter
from pipeline import dlq_cli
from pipeline.cli import main
from pipeline.codec import DEAD_LETTER_SCHEMA, EVENT_SCHEMA, Registry
from pipeline.dlq import dead_letter
from pipeline.dlq_cli import Origins, replayable_pages
from pipeline.events import Event, Interaction, InvalidEvent, event_to_avro
from pipeline.rows import DLQ_COLUMNS, Origin, dlq_row
from pipeline.services import WorkerProcess, free_port
from pipeline.settings import Settings
from pipeline.store import ClickHouseStore, connect, migrate
from pipeline.topics import ensure_topics
from tests.conftest import rdkafka_threads
from tests.integration.conftest import count, vigil, wait_until

pytestmark = pytest.mark.integration


def _event(i: int, ts: datetime, tokens: int = 10) -> Event:
    return Event(event_id=f"r-{i}", kind="interaction", ts=ts, tenant_id="acme", agent_id="bot",
                 body=Interaction("openai", "gpt-4o", input_tokens=tokens, output_tokens=1))  # fmt: skip


def test_replay_takes_back_what_a_config_change_now_accepts(vigil_env: dict[str, str]) -> None:
    strict = {**vigil_env, "VIGIL_MAX_EVENT_AGE_DAYS": "1"}
    settings = Settings.from_env(strict)
    ensure_topics(settings)
    now = datetime.now(UTC)
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    for i in range(5):
        emitter.emit(_event(i, now - timedelta(days=3)))  # too old for a 1-day window
    for i in range(5, 8):
        emitter.emit(_event(i, now, tokens=-5))  # wrong whatever the configuration
    for i in range(8, 12):
        emitter.emit(_event(i, now))
    emitter.flush()
    # what an older ledger makes of an EventBatch it cannot read: one dead letter for all of it
    registry = Registry.load()
    batch = registry.encode_batch(
        [registry.encode(EVENT_SCHEMA, event_to_avro(e))
         for e in (_event(20, now), _event(21, now), _event(22, now, tokens=-1))]
    )  # fmt: skip
    letter = dead_letter(
        batch, b"acme/bot", Origin(settings.topics.clean, 0, 7),
        InvalidEvent("wrong_schema", "payload: schema id 5 is vigil.EventBatch"),
        stage="ledger", received_at=now,
    )  # fmt: skip
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    producer.produce(settings.topics.dlq, registry.encode(DEAD_LETTER_SCHEMA, letter), b"acme/bot")
    producer.flush(30)

    worker = WorkerProcess(settings, strict)
    store = worker.start()
    assert store is not None
    try:
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") == 9, 60, "9 dead letters")
        listed = vigil(strict, "dlq", "list", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        reasons = sorted(json.loads(line)["reason_code"] for line in listed.stdout.splitlines())
        assert reasons == ["negative_value"] * 3 + ["timestamp_past"] * 5 + ["wrong_schema"]
        assert (
            "9 dead letter(s): timestamp_past 5, negative_value 3, wrong_schema 1" in listed.stderr
        )
        only = vigil(strict, "dlq", "list", "--reason", "negative_value", "--format", "json")
        assert len(only.stdout.splitlines()) == 3
        dry = vigil(strict, "dlq", "replay", "--dry-run")
        # before the config changes, only the batch's good events would pass
        assert json.loads(dry.stdout.splitlines()[0])["would_replay"] == 2
    finally:
        stopped = worker.stop()  # also when an assertion fails: a worker left running outlives
    assert stopped == 0, worker.tail()  # the test (and the relaxed one takes over the store)

    relaxed = {**vigil_env, "VIGIL_MAX_EVENT_AGE_DAYS": "30"}
    worker = WorkerProcess(Settings.from_env(relaxed), relaxed)
    store = worker.start()
    assert store is not None
    try:
        for page_size in ("4", "5000"):  # a second replay stores nothing twice
            run = vigil(relaxed, "dlq", "replay", "--page-size", page_size)
            assert run.returncode == 0, run.stderr
            result = json.loads(run.stdout.splitlines()[0])
            assert result == {"selected": 9, "replayed": 7,  # 5 + the batch's 2 good events
                              "still_rejected": {"negative_value": 4}, "not_replayable": 0}  # fmt: skip
            # pages of 4: progress after the first two pages, none after the last
            pages = [line for line in run.stderr.splitlines() if line.startswith("dlq replay:")]
            assert len(pages) == (2 if page_size == "4" else 0), run.stderr
            if pages:
                assert pages[0].startswith("dlq replay: 4 of 9 dead letters read"), pages
        sentinel = Emitter(settings.bootstrap, settings.topics.raw)  # same key: after the replays
        sentinel.emit(_event(99, now))
        sentinel.close()
        sql = "SELECT count() FROM vigil.audit_log WHERE event_id = 'r-99'"
        wait_until(lambda: count(store, sql) == 1, 60, "the sentinel")
        stored = store.query_rows("SELECT count(), uniqExact(event_id) FROM vigil.audit_log")[0]
        assert tuple(int(v) for v in stored) == (12, 12)  # 4 + 7 replayed + the sentinel
        assert count(store, "SELECT count() FROM vigil.audit_log WHERE input_tokens < 0") == 0
    finally:
        emitter.close()
        assert worker.stop() == 0, worker.tail()


def test_replay_reads_every_dead_letter_once_in_pages_however_many_share_a_time(
    store: ClickHouseStore,
) -> None:
    """Pages follow the table's order, (received_at, dlq_id): letters that share a received_at
    across a page's end are neither skipped nor read twice; letters of other stages and those
    stored after the replay began are left out."""
    base = datetime(2026, 11, 1, tzinfo=UTC)
    letters = []
    for i in range(23):
        received = base + timedelta(milliseconds=i // 5)  # five letters to a millisecond
        letters.append((f"id-{i:02d}", "validate" if i % 7 else "ledger", received))
    letters.append(("gw-1", "gateway", base))  # not replayable: the gateway kept no bytes
    rows = [(dlq_id, stage, "bad", "why: x", "raw", 0, i, "", "acme", "", "x" * (i % 4 + 1),
             i % 4 + 1, received, base) for i, (dlq_id, stage, received) in enumerate(letters)]  # fmt: skip
    store.insert("vigil.dlq", rows, DLQ_COLUMNS, "pages-1")
    expected = [dlq_id for dlq_id, stage, _ in sorted(letters, key=lambda r: (r[2], r[0]))
                if stage != "gateway"]  # fmt: skip
    for size in (1, 3, 5, 7, 23, 100):
        pages = list(replayable_pages(store, "1", size))
        assert [row[0] for page in pages for row in page] == expected, size
        assert all(len(page) <= size for page in pages)
    # bounded in bytes too: 1-4 bytes a payload, at most 5 a page, unless one letter is more
    for most in (1, 4, 5):
        pages = list(replayable_pages(store, "1", 100, page_bytes=most))
        assert [row[0] for page in pages for row in page] == expected, most
        weights = [sum(len(base64.b64decode(row[3])) for row in page) for page in pages]
        assert all(w <= most or len(p) == 1 for w, p in zip(weights, pages, strict=True))
        assert len(pages) >= min(len(expected), sum(weights) / most)  # cut by bytes, not count
    assert [row[0] for page in replayable_pages(store, "reason_code = 'none'", 3)
            for row in page] == []  # fmt: skip

    # a letter stored after the first page was read waits for the next replay, even one
    # received before it that sorts after the page (stored late, with the worker's backlog)
    pages = replayable_pages(store, "1", 10)
    first = next(pages)
    later = base + timedelta(days=1)
    store.insert("vigil.dlq", [(*rows[1][:-2], later, later)], DLQ_COLUMNS, "pages-2")
    store.insert("vigil.dlq", [("id-late", *rows[1][1:-2], later, later)], DLQ_COLUMNS, "pages-3")
    early = base + timedelta(milliseconds=4)  # past the first page's end, within the first batch
    store.insert("vigil.dlq", [("id-stored-late", *rows[1][1:-2], early, later)], DLQ_COLUMNS,
                 "pages-4")  # fmt: skip
    rest = [row[0] for page in pages for row in page]
    assert [row[0] for row in first] + rest == expected


def _home_with_letters(tmp_path: Path, codes: list[str]) -> Path:
    """A Vigil home whose embedded store holds a dead letter of acme/bot (rejected by
    validate, received now) for each reason code of ``codes``."""
    home = tmp_path / "home"
    store = connect(f"chdb://{home / 'clickhouse'}")
    migrate(store)
    registry = Registry.load()
    now = datetime.now(UTC)
    letters = [
        dead_letter(registry.encode(EVENT_SCHEMA, event_to_avro(_event(i, now))), b"acme/bot",
                    Origin("raw", 0, i), InvalidEvent(code, "why: it was rejected"),
                    stage="validate", received_at=now)
        for i, code in enumerate(codes)
    ]  # fmt: skip
    if letters:
        store.insert("vigil.dlq", [dlq_row(letter, now) for letter in letters], DLQ_COLUMNS, "t-1")
    store.close()
    return home


def test_replay_that_cannot_publish_says_so_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no broker to take them, the events that pass are not counted as replayed, and the
    replay exits 1 asking to be run again."""
    home = _home_with_letters(tmp_path, ["timestamp_past"] * 3)
    monkeypatch.setenv("VIGIL_HOME", str(home))
    monkeypatch.setenv("VIGIL_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setattr(dlq_cli, "REPLAY_FLUSH_SECONDS", 1.0)
    before = rdkafka_threads()
    assert main(["dlq", "replay"]) == 1
    # its producer holds nothing and is gone: it does not go on reconnecting in this process.
    # Counted, not compared by id: other clients still alive here replace threads of theirs
    wait_until(lambda: rdkafka_threads() <= before, 10, "the producer's threads to end")
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[0]) == {
        "selected": 3,
        "replayed": 0,
        "still_rejected": {},
        "not_replayable": 0,
    }
    assert "3 of 3 events that pass were not published" in err and "run the replay again" in err


def test_a_reason_or_tenant_no_dead_letter_has_is_named_with_those_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped --reason selected nothing, and list and replay said only that they found
    nothing; they name the value no letter has and what the queue holds instead."""
    home = _home_with_letters(tmp_path, ["timestamp_past", "timestamp_past", "negative_value"])
    monkeypatch.setenv("VIGIL_HOME", str(home))
    monkeypatch.setenv("VIGIL_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")  # none is needed
    held = "by reason_code, vigil.dlq holds timestamp_past 2, negative_value 1"
    assert main(["dlq", "list", "--reason", "timestamp_pats"]) == 0
    err = capsys.readouterr().err
    assert f"vigil dlq list: no dead letter has reason_code 'timestamp_pats'; {held}" in err
    assert main(["dlq", "replay", "--dry-run", "--reason", "timestamp_pats"]) == 0
    err = capsys.readouterr().err
    assert f"vigil dlq replay: no dead letter has reason_code 'timestamp_pats'; {held}" in err
    assert main(["dlq", "list", "--tenant", "acne"]) == 0
    said = "no dead letter has tenant_hint 'acne'; by tenant_hint, vigil.dlq holds acme 3"
    assert said in capsys.readouterr().err
    # a value the queue holds, with nothing of it in the span asked for, is not named
    assert main(["dlq", "list", "--reason", "negative_value", "--since", "2000-01-01"]) == 0
    assert main(["dlq", "list", "--reason", "negative_value", "--since", "2999-01-01"]) == 0
    err = capsys.readouterr().err
    assert "1 dead letter(s): negative_value 1" in err and "no dead letter has" not in err
    assert main(["dlq", "replay", "--dry-run", "--reason", "negative_value"]) == 0
    assert "no dead letter has" not in capsys.readouterr().err


def test_a_reason_no_dead_letter_has_is_named_with_the_ten_most_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    codes = [f"code_{i:02d}" for i in range(12) for _ in range(12 - i)]  # code_00 12 times ...
    monkeypatch.setenv("VIGIL_HOME", str(_home_with_letters(tmp_path, codes)))
    assert main(["dlq", "list", "--reason", "nope"]) == 0
    ten = ", ".join(f"code_{i:02d} {12 - i}" for i in range(10))
    said = (
        f"no dead letter has reason_code 'nope'; by reason_code, vigil.dlq holds {ten} and 2 more"
    )
    assert f"vigil dlq list: {said}\n" in capsys.readouterr().err
    monkeypatch.setenv("VIGIL_HOME", str(_home_with_letters(tmp_path / "empty", [])))
    assert main(["dlq", "list", "--reason", "nope"]) == 0
    assert "no dead letter has reason_code 'nope': vigil.dlq is empty" in capsys.readouterr().err


_CORP = "tenants:\n  acme: {{redaction: corp}}\nredaction:\n  corp:\n    custom: [{{name: corp_handle, pattern: '{}'}}]\n"


def test_an_event_a_custom_pattern_ran_out_of_time_on_is_replayed_once_it_is_bounded(
    vigil_env: dict[str, str], tmp_path: Path
) -> None:
    """A tenant's pattern that takes some 20 s on one event's text: the event goes to the DLQ
    as redaction_timeout, its payload withheld (the pattern cannot scrub it either), the events
    around it are stored; once the pattern is bounded, the replay reads the event again from
    the raw topic and stores it, redacted. Another tenant's letter is scrubbed of the pattern."""
    slow, bounded = tmp_path / "slow.yaml", tmp_path / "bounded.yaml"
    slow.write_text(_CORP.format("[a-z]+@corp"))
    bounded.write_text(_CORP.format("[a-z]{1,40}@corp"))
    env = {**vigil_env, "VIGIL_CONFIG": str(slow)}
    settings = Settings.from_env(env)
    ensure_topics(settings)
    now = datetime.now(UTC)
    text = "a" * 200_000 + "@corq, write to bob@corp"
    emitter = Emitter(settings.bootstrap, settings.topics.raw)
    emitter.emit(_event(0, now))
    emitter.emit(Event(event_id="r-slow", kind="interaction", ts=now, tenant_id="acme",
                       agent_id="bot", body=Interaction("openai", "gpt-4o", input_text=text)))  # fmt: skip
    emitter.emit(_event(2, now))
    emitter.emit(Event(event_id="r-old", kind="interaction", ts=now - timedelta(days=400),
                       tenant_id="globex", agent_id="bot",
                       body=Interaction("openai", "gpt-4o", input_text="ask bob@corp")))  # fmt: skip
    emitter.close()
    worker = WorkerProcess(settings, env)
    store = worker.start()
    assert store is not None
    try:
        wait_until(lambda: count(store, "SELECT count() FROM vigil.audit_log") == 2, 60,
                   "the events around it")  # fmt: skip
        wait_until(lambda: count(store, "SELECT count() FROM vigil.dlq") == 2, 60, "the letters")
        letters = dict(store.query_rows(
            "SELECT reason_code, tuple(reason, payload_bytes, base64Encode(payload)) FROM vigil.dlq"
        ))  # fmt: skip
        reason, kept, _ = letters["redaction_timeout"]
        assert "'corp_handle'" in reason and "bytes are withheld" in reason
        assert kept == 0 and "aaaa" not in reason
        old = base64.b64decode(letters["timestamp_past"][2])
        assert b"ask ********" in old and b"bob@corp" not in old
    finally:
        stopped = worker.stop()
    assert stopped == 0, worker.tail()

    fixed = {**vigil_env, "VIGIL_CONFIG": str(bounded)}
    worker = WorkerProcess(Settings.from_env(fixed), fixed)
    store = worker.start()
    assert store is not None
    try:
        run = vigil(fixed, "dlq", "replay", "--reason", "redaction_timeout")
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout.splitlines()[0])["replayed"] == 1
        sql = "SELECT input_text FROM vigil.audit_log WHERE event_id = 'r-slow'"
        wait_until(lambda: store.query_rows(sql) != [], 60, "the replayed event")
        [(stored,)] = store.query_rows(sql)
        assert stored == "a" * 200_000 + "@corq, write to [CORP_HANDLE]"
    finally:
        assert worker.stop() == 0, worker.tail()


def test_a_withheld_payload_is_read_again_while_its_topic_keeps_it(
    vigil_env: dict[str, str],
) -> None:
    settings = Settings.from_env(vigil_env)
    ensure_topics(settings)
    raw = settings.topics.raw
    offsets: list[int] = []
    producer = Producer({"bootstrap.servers": settings.bootstrap})
    for value in (b"first", b"second"):
        producer.produce(raw, value, b"acme/bot", partition=0,
                         on_delivery=lambda _err, m: offsets.append(m.offset()))  # fmt: skip
    producer.flush(30)
    origins = Origins(settings)
    try:
        assert origins.read(raw, 0, offsets[0]) == (b"acme/bot", b"first")
        assert origins.read(raw, 0, offsets[1]) == (b"acme/bot", b"second")
        # the topic's retention deletes the first: it is gone, and the second still read
        admin = AdminClient({"bootstrap.servers": settings.bootstrap})
        [deleted] = admin.delete_records([TopicPartition(raw, 0, offsets[1])]).values()
        deleted.result(timeout=30)
        assert origins.read(raw, 0, offsets[0]) is None
        assert origins.read(raw, 0, offsets[1]) == (b"acme/bot", b"second")
        assert origins.read(raw, 0, offsets[1] + 1) is None  # past the end: none there
    finally:
        origins.close()
