"""End to end on the local stack: one worker, produce -> validate -> redact -> enrich -> ledger
(chained) -> rollups -> stored and queryable, against a baseline measured in the same run: the
same bytes copied raw from the topic into ClickHouse by a minimal confluent-kafka consumer with
clickhouse-connect batch inserts; and the floor under Faust itself, a do-nothing agent over the
same topic. The drain measured follows a warm-up drain of the same backlog on topics of its
own, which the broker just started spends compiling. Then a soak at half the measured capacity
(10 minutes unless VIGIL_BENCH_SOAK_SECONDS says otherwise, after a 60 s warm-up reported on its
own): freshness (event time to queryable) of every event sent, the worker's RSS sampled every
10 s, and per minute the CPU of the worker, the broker and the sender and the hypervisor's
stolen time. Then freshness around a stall: the worker is frozen (SIGSTOP) for 5 s during a 90 s
run at the same rate, and must catch up. Last, the same backlog through the worker split in two
processes (``--role store`` and ``--role validate``). While each backlog drains, the CPU each
process uses is read from /proc, per event stored, and the hypervisor's stolen time.
"""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from confluent_kafka import Producer, TopicPartition

from bench.hot_path import batch_consumer
from bench.hot_path import measure as measure_hot_path
from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.devkafka import LocalKafka, fetch_jars
from pipeline.events import event_to_avro
from pipeline.kafkaconn import KafkaConnection
from pipeline.lag import group_client
from pipeline.logs import RDKAFKA_LOGGER
from pipeline.services import WorkerProcess, free_port
from pipeline.settings import Settings
from pipeline.store import connect
from pipeline.topics import ensure_topics
from pipeline.workload import generate, published

# The backlog each drain stores. Sustained throughput: a drain of 60,000 (until the thirtieth
# run) took 4-8 s, of which the first second or so is the worker's ramp-up (the first fetches
# and inserts, the chain heads read); in one phase a backlog of 200,000 drained at 14,100
# events/s through one process where 60,000 drained at 12,966 (docs/benchmarks.md)
EVENTS = 200_000
FRESHNESS_SECONDS = 20
STALL_RUN_SECONDS = 90.0
STALL_AT_SECONDS = 20.0
STALL_SECONDS = 5.0
# How far ahead of its time the soak's sender may send an event (stamped when sent) rather than
# sleep: a sleep per event cost the sender, which shares the worker's two cores, more CPU than
# the events themselves
SEND_AHEAD_SECONDS = 0.002
# The soak's first minute at its rate is a warm-up, its freshness reported on its own
# (freshness_warmup_p99_ms), not in the soak's. Right after the backlog drain the local
# broker's JIT compiler took half a core for about 40 s, compiling the path of many small
# produce requests the drain had not used; on two cores the worker then waited for CPU and fell
# seconds behind (docs/benchmarks.md, "The soak's first minute, a lighter sender, and the
# hypervisor's share"). A broker of a deployment runs
# on machines of its own, compiled long before.
SOAK_WARMUP_SECONDS = 60.0


def _payloads(n: int, now: datetime) -> list[tuple[bytes, bytes]]:
    registry = Registry.load()
    events = published(generate(n, now, seed=5, run_id="e2e", bad_fraction=0.0))
    while len(events) < n:
        events += events
    return [
        (
            f"{e.tenant_id}/{e.agent_id}".encode(),
            registry.encode(EVENT_SCHEMA, event_to_avro(replace(e, event_id=f"e2e-{i}"))),
        )
        for i, e in enumerate(events[:n])
    ]


def _produce(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all",
                         "compression.type": "lz4", "batch.num.messages": 10000,
                         "logger": RDKAFKA_LOGGER})  # fmt: skip
    for key, value in payloads:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)


def _count(store: Any, sql: str) -> int:
    return int(store.query_rows(sql)[0][0])


def _baseline(bootstrap: str, topic: str, n: int, path: Path) -> float:
    """Events/s copying the topic raw into ClickHouse: consume, batch, insert; nothing else."""
    store = connect(f"chdb://{path}")
    store.command("CREATE DATABASE IF NOT EXISTS raw")
    store.command(
        "CREATE TABLE raw.events (k String, v String) ENGINE = MergeTree ORDER BY tuple()"
    )
    consumer = batch_consumer(bootstrap, "e2e-baseline", topic)
    done = 0
    t0 = None
    while done < n:
        batch = [m for m in consumer.consume(5000, timeout=1.0) if m.error() is None]
        if not batch:
            continue
        t0 = t0 or time.perf_counter()
        store.insert("raw.events", [(m.key() or b"", m.value()) for m in batch], ("k", "v"),
                     f"b-{batch[0].partition()}-{batch[0].offset()}")  # fmt: skip
        consumer.commit(asynchronous=False)
        done += len(batch)
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    consumer.close()
    stored = _count(store, "SELECT count() FROM raw.events")
    store.close()
    assert stored == n, (stored, n)
    return n / elapsed


def _clean_published(bootstrap: str, topic: str) -> int:
    """How many events the worker has validated so far: the clean topic's end offsets, from
    the watermarks alone. (``consumer_lag`` also asks for committed offsets, which fails while
    the group coordinator of a broker just started is not ready.)"""
    with group_client(KafkaConnection(bootstrap), "e2e-watch") as consumer:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in partitions
        )


def _faust_floor(bootstrap: str, topic: str, n: int, stock: bool = False) -> float:
    """events/s of a do-nothing Faust agent over the same topic (``bench.faust_floor``), on the
    worker's consumer or (``stock``) Faust's own."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.faust_floor", bootstrap, topic, str(n)]
        + (["--stock"] if stock else []),
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    if "events_per_s=" not in run.stdout:
        raise RuntimeError(f"bench.faust_floor printed no figure: {run.stderr[-2000:]}")
    return float(run.stdout.split("events_per_s=")[1].split()[0])


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) all threads of a process have used.

    Not split by thread: chDB renames the Python thread that calls into it, so a thread's name
    does not tell Python's work from the engine's (perf showed a thread named ``Unknown``
    running mostly Python). ``perf record -p PID`` does tell them apart."""
    tick = os.sysconf("SC_CLK_TCK")
    used = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        used += (int(fields[11]) + int(fields[12])) / tick
    return used


def _cpu_sample(watch: Mapping[str, int | None]) -> dict[str, float]:
    """CPU seconds each process of ``watch`` (name -> pid, None: not running) has used."""
    return {name: _cpu_seconds(pid) if pid else float("nan") for name, pid in watch.items()}


def _drain(
    store: Any, bootstrap: str, clean_topic: str, workers: dict[str, int], broker: int | None
) -> tuple[float, dict[str, float], float]:
    """Wait for the worker(s) to store the backlog of EVENTS: events/s from the first event
    validated to the last one queryable, CPU microseconds per event of each process
    (``workers``: name -> pid) and the broker meanwhile, and the % of the machine's time the
    hypervisor stole meanwhile."""
    while _clean_published(bootstrap, clean_topic) == 0:
        time.sleep(0.05)
    watch = {**workers, "broker": broker}
    before, ticks = _cpu_sample(watch), machine_ticks()
    t0 = time.perf_counter()
    while _count(store, "SELECT count() FROM vigil.audit_log") < EVENTS:
        time.sleep(0.2)
    rate = EVENTS / (time.perf_counter() - t0)
    after, steal = _cpu_sample(watch), steal_percent(ticks, machine_ticks())
    return rate, {k: (after[k] - v) / EVENTS * 1e6 for k, v in before.items()}, steal


def _fresh(
    env: dict[str, str], home: Path, name: str, payloads: list[tuple[bytes, bytes]]
) -> tuple[dict[str, str], Settings]:
    """``env`` and its settings for a drain of its own: a home (so a store), topics and a
    consumer group named ``name``, the backlog ``payloads`` on its raw topic."""
    env = {**env, "VIGIL_HOME": str(home), "VIGIL_TOPIC_PREFIX": name, "VIGIL_CONSUMER_GROUP": name}
    settings = Settings.from_env(env)
    ensure_topics(settings)
    _produce(settings.bootstrap, settings.topics.raw, payloads)
    return env, settings


def _warm_up(
    env: dict[str, str], home: Path, broker: int | None, payloads: list[tuple[bytes, bytes]]
) -> tuple[float, dict[str, float]]:
    """The backlog through one worker on topics and a store of its own before the drain that
    is measured: events/s and CPU per event, reported, not taken as the run's. A broker just
    started spends its first drains compiling (its JVM): 8-11 us of CPU an event in probes'
    first drains against 4-6 a few drains later, CPU the worker shares two cores with
    (docs/benchmarks.md, "A warm-up drain"); a deployed broker has long been warm."""
    env, settings = _fresh(env, home, "e2e-warm", payloads)
    worker = WorkerProcess(settings, env)
    try:
        store = worker.start()
        assert worker.proc is not None
        rate, cpu, _ = _drain(store, settings.bootstrap, settings.topics.clean,
                              {"worker": worker.proc.pid}, broker)  # fmt: skip
        return rate, cpu
    finally:
        worker.stop()


def _split_roles(
    env: dict[str, str],
    home: Path,
    broker: int | None,
    payloads: list[tuple[bytes, bytes]],
    soak_seconds: float = 0.0,
) -> tuple[float, dict[str, float], dict[str, Any]]:
    """The same backlog (``payloads``) through the worker split in two processes,
    ``--role store`` and ``--role validate``, on fresh topics and a fresh store: events/s and
    CPU per event. Then, if ``soak_seconds``, a soak at half that rate: its figures (as
    ``_soak``'s, RSS of the store process, which holds the state) and validate's RSS."""
    env, settings = _fresh(env, home, "e2e-split", payloads)
    store_worker = WorkerProcess(settings, env, role="store")
    validate_worker = WorkerProcess(settings, env, role="validate")
    try:
        store = store_worker.start()
        validate_worker.start()
        assert store_worker.proc is not None and validate_worker.proc is not None
        pids = {"store": store_worker.proc.pid, "validate": validate_worker.proc.pid}
        rate, cpu, steal = _drain(store, settings.bootstrap, settings.topics.clean, pids, broker)
        if not soak_seconds:
            return rate, cpu, {"drain_steal_percent": steal}
        print(f"  the split worker at half of it for {soak_seconds:.0f}s ...", flush=True)
        validate_rss = _rss_mb(pids["validate"])
        soaked = _soak(store, settings, pids["store"], rate / 2, soak_seconds, broker)
        soaked["validate_rss_start_end_mb"] = [validate_rss, _rss_mb(pids["validate"])]
        print(f"  split soak at {rate / 2:,.0f} events/s: freshness p50 "
              f"{soaked['freshness_p50_ms']:,.0f} ms, p99 {soaked['freshness_p99_ms']:,.0f} ms; "
              f"store RSS {soaked['soak_rss_start_mb']:,.0f} -> {soaked['soak_rss_end_mb']:,.0f} "
              f"MB (highest {soaked['soak_rss_max_mb']:,.0f}), validate RSS {validate_rss:,.0f} "
              f"-> {soaked['validate_rss_start_end_mb'][1]:,.0f} MB", flush=True)  # fmt: skip
        return rate, cpu, {"drain_steal_percent": steal, **soaked}
    finally:
        validate_worker.stop()
        store_worker.stop()


class Sample(NamedTuple):
    """What ``_send_stamped`` reads every 10 s: seconds since it began, the worker's RSS, the
    CPU seconds each watched process has used so far, and the machine's clock ticks so far
    (all cores) with those stolen by the hypervisor among them."""

    at: float
    rss_mb: float
    cpu_seconds: dict[str, float]
    ticks: tuple[int, int]


def machine_ticks() -> tuple[int, int]:
    """All cores' clock ticks so far and the stolen ones (``/proc/stat``'s first line)."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks), ticks[7]


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The % of the machine's time between two ``machine_ticks()`` the hypervisor stole: on a
    shared machine, how much of its speed it did not have."""
    ticks = after[0] - before[0]
    return 100 * (after[1] - before[1]) / ticks if ticks else float("nan")


def _sample(at: float, pid: int, watch: Mapping[str, int | None]) -> Sample:
    return Sample(at, _rss_mb(pid), _cpu_sample(watch), machine_ticks())


def _send_stamped(
    store: Any,
    settings: Settings,
    pid: int,
    rate: float,
    seconds: float,
    prefix: str,
    watch: Mapping[str, int | None] | None = None,
) -> list[Sample]:
    """Send events at ``rate`` for ``seconds``, each stamped when sent and numbered
    ``{prefix}-{i}``, and wait until all are stored. Every 10 s, a ``Sample``: the RSS of the
    worker (``pid``) and the CPU of the processes in ``watch`` (name -> pid)."""
    registry = Registry.load()
    sent = int(rate * seconds)
    fresh = published(generate(min(sent, 50_000), datetime.now(UTC), seed=9, run_id="fresh",
                               bad_fraction=0.0))  # fmt: skip
    producer = Producer(
        {"bootstrap.servers": settings.bootstrap, "linger.ms": 5, "logger": RDKAFKA_LOGGER}
    )
    watch = watch or {}
    samples: list[Sample] = []
    start = time.perf_counter()
    for i in range(sent):
        due = start + i / rate
        ahead = due - time.perf_counter()
        if ahead > SEND_AHEAD_SECONDS:
            time.sleep(ahead)
        if not samples or due - start >= samples[-1].at + 10:
            samples.append(_sample(due - start, pid, watch))
        e = fresh[i % len(fresh)]
        # stamped as sent: an event sent early is not made to look fresher
        value = registry.encode_event(replace(e, event_id=f"{prefix}-{i}", ts=datetime.now(UTC)))
        producer.produce(settings.topics.raw, value, f"{e.tenant_id}/{e.agent_id}".encode())
        producer.poll(0)
    producer.flush(60)
    query = f"SELECT count() FROM vigil.audit_log WHERE startsWith(event_id, '{prefix}-')"
    while _count(store, query) < sent:
        time.sleep(0.2)
    samples.append(_sample(time.perf_counter() - start, pid, watch))
    return samples


def _cpu_by_minute(samples: list[Sample]) -> list[dict[str, float]]:
    """Per minute of ``samples``: each watched process's CPU in % of one core, and the % of
    the machine's time the hypervisor stole (``steal``): what the machine gave."""
    minutes = []
    for a, b in itertools.pairwise(samples[::6] + samples[-1:]):
        if b.at - a.at < 1:
            continue
        share = {name: 100 * (b.cpu_seconds[name] - used) / (b.at - a.at)
                 for name, used in a.cpu_seconds.items()}  # fmt: skip
        share["steal"] = steal_percent(a.ticks, b.ticks)
        minutes.append({k: round(v, 1) for k, v in share.items()})
    return minutes


# i of an event ``_send_stamped`` numbered ``{prefix}-{i}``, in SQL
_SENT_INDEX = "toUInt64(splitByChar('-', event_id)[2])"


def _lags(store: Any, prefix: str) -> list[float]:
    """Freshness in ms of the events numbered ``{prefix}-{i}``, sorted. Queryable when stored:
    ingested_at is stamped by the ledger sink just before its insert."""
    return sorted(float(r[0]) for r in store.query_rows(
        "SELECT dateDiff('millisecond', ts, ingested_at) FROM vigil.audit_log "
        f"WHERE startsWith(event_id, '{prefix}-')"))  # fmt: skip


def _p99(lags: list[float]) -> float:
    return lags[int(len(lags) * 0.99) - 1]


def _soak(
    store: Any, settings: Settings, pid: int, rate: float, seconds: float, broker: int | None
) -> dict[str, Any]:
    """Fresh events at ``rate``: SOAK_WARMUP_SECONDS of them, then ``seconds`` more.
    Freshness: event time to stored, for every event after the warm-up, and the warm-up's on
    its own; after the warm-up, the worker's RSS, and per minute the CPU the worker, the
    broker and this process used and the machine's stolen time."""
    _send_stamped(store, settings, pid, rate, SOAK_WARMUP_SECONDS, "warm")
    warmup = _lags(store, "warm")
    watch = {"worker": pid, "sender": os.getpid(), "broker": broker}
    samples = _send_stamped(store, settings, pid, rate, seconds, "fresh", watch)
    rss = [(s.at, s.rss_mb) for s in samples]
    ours = "startsWith(event_id, 'fresh-')"
    lags = _lags(store, "fresh")
    # minutes of sending, as the samples count them: event i was due i / rate s in
    minute = f"intDiv({_SENT_INDEX}, {max(1, int(rate * 60))})"
    by_minute = [float(r[0]) for r in store.query_rows(
        "SELECT quantileExact(0.99)(dateDiff('millisecond', ts, ingested_at)) "
        f"FROM vigil.audit_log WHERE {ours} GROUP BY {minute} ORDER BY {minute}")]  # fmt: skip
    second_half = [mb for t, mb in rss if t >= seconds / 2]
    return {
        "freshness_p50_ms": statistics.median(lags),
        "freshness_p99_ms": _p99(lags),
        "freshness_offered_events_per_s": rate,
        "freshness_warmup_seconds": SOAK_WARMUP_SECONDS,
        "freshness_warmup_p99_ms": _p99(warmup),
        "freshness_p99_ms_by_minute": by_minute,
        "soak_cpu_percent_by_minute": _cpu_by_minute(samples),
        "soak_seconds": seconds,
        "soak_rss_start_mb": rss[0][1],
        "soak_rss_mid_mb": second_half[0],
        "soak_rss_end_mb": rss[-1][1],
        "soak_rss_max_mb": max(mb for _, mb in rss),
        "soak_rss_samples_mb": [round(mb, 1) for _, mb in rss],
    }


def _stall(store: Any, settings: Settings, pid: int, rate: float) -> dict[str, Any]:
    """Freshness around a stall: events at ``rate`` for STALL_RUN_SECONDS, the worker frozen
    (SIGSTOP, as a long GC pause or a starved VM would) for STALL_SECONDS from STALL_AT_SECONDS
    in. p99 per 10 s of sending, and p99 of the events sent 30 s or more after the stall: a
    worker that catches up is back to its soak figure by then."""
    resume_at = STALL_AT_SECONDS + STALL_SECONDS
    freeze = threading.Timer(STALL_AT_SECONDS, os.kill, (pid, signal.SIGSTOP))
    thaw = threading.Timer(resume_at, os.kill, (pid, signal.SIGCONT))
    freeze.start()
    thaw.start()
    try:
        _send_stamped(store, settings, pid, rate, STALL_RUN_SECONDS, "stall")
    finally:
        freeze.cancel()
        thaw.join()
    per_10s = int(rate * 10)
    after = int(rate * (resume_at + 30))
    lag = "dateDiff('millisecond', ts, ingested_at)"
    by_10s = [float(r[0]) for r in store.query_rows(
        f"SELECT quantileExact(0.99)({lag}) FROM vigil.audit_log "
        f"WHERE startsWith(event_id, 'stall-') GROUP BY intDiv({_SENT_INDEX}, {per_10s}) "
        f"ORDER BY intDiv({_SENT_INDEX}, {per_10s})")]  # fmt: skip
    settled = float(store.query_rows(
        f"SELECT quantileExact(0.99)({lag}) FROM vigil.audit_log "
        f"WHERE startsWith(event_id, 'stall-') AND {_SENT_INDEX} >= {after}")[0][0])  # fmt: skip
    return {
        "stall_seconds": STALL_SECONDS,
        "stall_freshness_p99_ms_by_10s": by_10s,
        "stall_freshness_p99_ms_from_30s_after": settled,
    }


def measure(soak_seconds: float | None = None) -> dict[str, Any]:
    """The figures of ``bench/results.json``'s "e2e" entry. ``soak_seconds``: how long the
    half-capacity run lasts (VIGIL_BENCH_SOAK_SECONDS, 600 by default). The split worker is
    soaked too when VIGIL_BENCH_SPLIT_SOAK_SECONDS is set (it is not by default)."""
    soak = soak_seconds or float(os.environ.get("VIGIL_BENCH_SOAK_SECONDS", "600"))
    split_soak = float(os.environ.get("VIGIL_BENCH_SPLIT_SOAK_SECONDS", "0"))
    with tempfile.TemporaryDirectory(prefix="vigil-bench-e2e-") as tmp:
        home = Path(tmp)
        port = free_port(2)  # the broker's listener and its controller's
        env = {
            **os.environ,
            "VIGIL_HOME": str(home / "home"),
            "VIGIL_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
            "VIGIL_TOPIC_PREFIX": "e2e",
        }
        settings = Settings.from_env(env)
        broker = LocalKafka(home / "kafka", fetch_jars(settings.cache_dir), port)
        print("end-to-end benchmark: local broker and one worker ...", flush=True)
        broker.start()
        worker = WorkerProcess(settings, env)
        try:
            ensure_topics(settings)
            payloads = _payloads(EVENTS, datetime.now(UTC))
            _produce(settings.bootstrap, settings.topics.raw, payloads)  # the backlog
            floor = _faust_floor(settings.bootstrap, settings.topics.raw, EVENTS)
            stock_floor = _faust_floor(settings.bootstrap, settings.topics.raw, EVENTS, True)
            print(f"  a do-nothing Faust agent: {floor:,.0f} events/s on the worker's consumer, "
                  f"{stock_floor:,.0f} on Faust's own", flush=True)  # fmt: skip
            warm, warm_cpu = _warm_up(env, home / "warm", broker.pid(), payloads)
            print(f"  a warm-up drain (not the figure): {warm:,.0f} events/s, CPU per event: "
                  + ", ".join(f"{k} {v:.0f} us" for k, v in warm_cpu.items()),
                  flush=True)  # fmt: skip
            store = worker.start()
            assert store is not None and worker.proc is not None
            # from the first validated event: the group join is not throughput
            e2e, cpu, steal = _drain(store, settings.bootstrap, settings.topics.clean,
                                     {"worker": worker.proc.pid}, broker.pid())  # fmt: skip
            print(f"  e2e: {e2e:,.0f} events/s, CPU per event: "
                  + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items())
                  + f"; the hypervisor stole {steal:.0f}% of the machine", flush=True)  # fmt: skip
            print(f"  soak at half of it for {soak:.0f}s ...", flush=True)
            soaked = _soak(store, settings, worker.proc.pid, e2e / 2, soak, broker.pid())
            for p99, used in zip(soaked["freshness_p99_ms_by_minute"],
                                 soaked["soak_cpu_percent_by_minute"], strict=False):  # fmt: skip
                print(f"    a minute: p99 {p99:,.0f} ms; % of a core: "
                      + ", ".join(f"{k} {v:.0f}" for k, v in used.items()), flush=True)  # fmt: skip
            peak = _rss_mb(worker.proc.pid, "VmHWM")
            print(f"  a {STALL_SECONDS:.0f}s stall of the worker during {STALL_RUN_SECONDS:.0f}s "
                  "at the same rate ...", flush=True)  # fmt: skip
            stalled = _stall(store, settings, worker.proc.pid, e2e / 2)
            worker.stop()
            split, split_cpu, split_soaked = _split_roles(env, home / "split", broker.pid(),
                                                          payloads, split_soak)  # fmt: skip
            print(f"  the worker split in two processes (store, validate): {split:,.0f} events/s, "
                  "CPU per event: " + ", ".join(f"{k} {v:.0f} us" for k, v in split_cpu.items()),
                  flush=True)  # fmt: skip
            stamped = (SOAK_WARMUP_SECONDS, soak, STALL_RUN_SECONDS)  # what _send_stamped sent
            sent = EVENTS + sum(int(e2e / 2 * seconds) for seconds in stamped)
            baseline = _baseline(settings.bootstrap, settings.topics.raw, sent, home / "baseline")
            hot_settings = Settings.from_env({**env, "VIGIL_TOPIC_PREFIX": "e2e-hot"})
            ensure_topics(hot_settings)
            hot = measure_hot_path(hot_settings, settings.topics.raw, hot_settings.topics.clean,
                                   EVENTS, home / "hot")  # fmt: skip
            print(f"  the same stages without Faust's delivery: {hot:,.0f} events/s", flush=True)
        finally:
            worker.stop()
            broker.stop()
    return {
        "e2e_events_per_s": e2e,
        "baseline_events_per_s": baseline,
        "ratio_vs_baseline": e2e / baseline,
        # the same backlog through one worker first, on the broker just started (``_warm_up``)
        "warmup_drain_events_per_s": warm,
        "warmup_drain_cpu_us_per_event": warm_cpu,
        "faust_do_nothing_agent_events_per_s": floor,
        "faust_stock_do_nothing_agent_events_per_s": stock_floor,
        # where the machine's two cores go while the backlog drains, per event stored
        "cpu_us_per_event": cpu,
        # a shared machine's speed: the % of its time the hypervisor gave to others meanwhile
        "drain_steal_percent": steal,
        "e2e_split_roles_events_per_s": split,
        "split_roles_cpu_us_per_event": split_cpu,
        **{f"split_roles_{k}": v for k, v in split_soaked.items()},
        "hot_path_without_faust_events_per_s": hot,
        **soaked,
        **stalled,
        "worker_peak_rss_mb": peak,
        "events": EVENTS,
    }


if __name__ == "__main__":
    import json

    from bench import use_work_dir

    print(f"temporary files in {use_work_dir()}")
    print(json.dumps(measure(), indent=1))
