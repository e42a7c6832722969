"""Stage micro-benchmarks, each printed as events/s and as a ratio against a baseline measured
in the same run (plain fastavro decoding of the same bytes), so machines compare fairly; and
the redaction corpus: recall, precision, look-alikes untouched, MB/s of text on one core; and
the OTLP gateway (spans/s, latency at a fixed load) and the whole pipeline end to end against
a raw-copy baseline, on a local broker.

Writes bench/results.json, and the latest run's table in docs/benchmarks.md (``bench.table``).
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import fastavro

from bench import best_seconds, use_work_dir
from bench.e2e import machine_ticks, steal_percent
from bench.e2e import measure as measure_e2e
from bench.gateway import measure as measure_gateway
from bench.redaction import measure as measure_redaction
from bench.table import main as write_table
from pipeline.alerts import Evaluator
from pipeline.codec import EVENT_SCHEMA, HEADER, Registry
from pipeline.config import load_config
from pipeline.enrich import enrich
from pipeline.events import Event, event_from_avro, event_to_avro
from pipeline.handoff import HandOff
from pipeline.ledger import link
from pipeline.rollup import Rollups
from pipeline.rows import Origin, audit_row
from pipeline.sink import LedgerSink, Message
from pipeline.store import connect, migrate
from pipeline.validate import Limits, decode_event, route
from pipeline.workload import generate, published

N = 20_000


def _rate(fn: Callable[[], object], count: int) -> float:
    return count / best_seconds(fn)


def _fold(events: list[Event], evaluator: Evaluator) -> None:
    """What the worker does after each stored batch: roll up, close windows, evaluate."""
    rollups = Rollups()
    for i in range(0, len(events), 1000):
        for event in events[i : i + 1000]:
            rollups.add(event)
            evaluator.observe(event)
        rollups.close()


def _ledger_write_rate(registry: Registry, events: list[Event], handed: bool = False) -> float:
    """events/s of LedgerSink.write into a fresh embedded store, in batches of 5,000 (decode,
    row, stored-keys query, chain heads as the worker finds them while it holds its partitions,
    hash chain, insert): best of 3 runs of new events.
    ``handed``: every event is in a ``HandOff`` first, as validate leaves them in one process."""
    with tempfile.TemporaryDirectory(prefix="vigil-bench-ledger-") as tmp:
        store = connect(f"chdb://{tmp}")
        try:
            migrate(store)
            handoff = HandOff(max_events=len(events), max_bytes=1 << 40)
            sink = LedgerSink(store, registry, handoff=handoff if handed else None)
            best = 0.0
            for run in range(3):
                renamed = [replace(e, event_id=f"l{run}-{i}") for i, e in enumerate(events)]
                wire = [registry.encode(EVENT_SCHEMA, event_to_avro(e)) for e in renamed]
                messages = [Message(Origin("clean", i % 6, i), b"k", value)
                            for i, value in enumerate(wire)]  # fmt: skip
                handoff.put(zip(wire, renamed, strict=True))
                t0 = time.perf_counter()
                for i in range(0, len(messages), 5000):
                    sink.write(messages[i : i + 5000], held=0)  # as a worker's one generation
                best = max(best, len(messages) / (time.perf_counter() - t0))
            return best
        finally:
            store.close()


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def interpreter() -> str:
    """Which Python ran the run, and whether its libpython is a shared library: the same code
    drained 13% more events/s in one process under Debian's /usr/bin/python3.11 (libpython
    linked into the program, built with profile-guided optimisation) than under a pyenv build
    (libpython shared, no PGO) in the same hour (docs/benchmarks.md, "Which Python")."""
    maps = Path("/proc/self/maps")
    linked = "libpython3" in maps.read_text() if maps.exists() else None
    libpython = {True: "libpython shared", False: "libpython linked in", None: "libpython ?"}
    return f"{Path(sys.executable).resolve()}, {libpython[linked]}"


def main() -> int:
    print(f"temporary files in {use_work_dir()}")
    ticks = machine_ticks()
    registry = Registry.load()
    now = datetime.now(UTC)
    workload = generate(N, now, seed=3)
    wire = [registry.encode(EVENT_SCHEMA, event_to_avro(e)) for e in published(workload)[:N]]
    count = len(wire)
    schema = registry.by_id[registry.writer_id(EVENT_SCHEMA)]
    limits = Limits()
    origin = Origin("vigil.events.raw", 0, 0)
    events = [event_from_avro(registry.decode(b, EVENT_SCHEMA)) for b in wire]
    config = load_config(Path("vigil.yaml"), os.environ)

    def enrich_with(event: Event) -> Event:
        return enrich(event, config.catalog, config.agents)

    enriched = sorted((enrich_with(e) for e in events), key=lambda e: e.ts)
    rows = [audit_row(e, origin, now) for e in enriched]  # the hash chain's input

    results = {
        "baseline_fastavro_decode_per_s": _rate(
            lambda: [fastavro.schemaless_reader(io.BytesIO(b[HEADER.size :]), schema, None)
                     for b in wire], count),
        "decode_validate_per_s": _rate(
            lambda: [decode_event(b, registry, limits, now) for b in wire], count),
        "route_per_s": _rate(
            lambda: [route(b, b"k", origin, registry, limits, now) for b in wire], count),
        "route_enriched_per_s": _rate(
            lambda: [route(b, b"k", origin, registry, limits, now, config.policy_for,
                           enrich_with) for b in wire], count),
        "enrich_per_s": _rate(
            lambda: [enrich(e, config.catalog, config.agents) for e in events], count),
        "audit_row_per_s": _rate(lambda: [audit_row(e, origin, now) for e in events], count),
        "ledger_link_per_s": _rate(lambda: link(rows, {}), count),
        "fold_per_s": _rate(lambda: _fold(enriched, Evaluator(config.rules)), count),
        "ledger_write_per_s": _ledger_write_rate(registry, events),
        "ledger_write_handed_per_s": _ledger_write_rate(registry, events, handed=True),
    }  # fmt: skip
    base = results["baseline_fastavro_decode_per_s"]
    print(f"{'benchmark':<34}{'events/s':>14}{'vs baseline':>14}")
    for name, rate in results.items():
        print(f"{name:<34}{rate:>14,.0f}{rate / base:>14.2f}")
    out = {
        "command": "make bench",
        "when": now.isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "interpreter": interpreter(),
        "machine": platform.machine(),
        "events": count,
        "results": {k: round(v) for k, v in results.items()},
        "ratios_vs_baseline": {k: round(v / base, 3) for k, v in results.items()},
        "stages_steal_percent": round(steal_percent(ticks, machine_ticks()), 1),
    }
    redaction = measure_redaction()
    print(
        f"\nredaction corpus: {redaction['records']:,} records, recall {redaction['recall']:.2%}, "
        f"precision {redaction['precision']:.2%}, look-alikes untouched "
        f"{redaction['lookalikes_untouched']:.2%}, "
        f"{redaction['redact_mb_per_s_one_core']:.1f} MB/s on one core "
        f"({redaction['redact_vs_one_regex']:.2f} x one plain email regex over the same text, "
        f"{redaction['baseline_one_email_regex_mb_per_s']:.1f} MB/s)"
    )
    for name, slow in redaction["slow_texts"].items():
        print(f"  made to be slow, {name}: {slow['mb_per_s']:.1f} MB/s at 1 MiB "
              f"({slow['vs_corpus']:.2f} x the corpus), {slow['growth_vs_linear']:.2f} x linear "
              "growth to 4 MiB")  # fmt: skip
    out["redaction"] = redaction
    gateway = measure_gateway()
    print(
        f"\ngateway: {gateway['gateway_spans_per_s']:,.0f} spans/s at saturation "
        f"({gateway['clients_at_saturation']} clients, {gateway['spans_per_request']} spans a "
        f"request), {gateway['ratio_vs_baseline']:.2f} x the direct-produce baseline "
        f"({gateway['baseline_direct_produce_per_s']:,.0f}/s); over OTLP/gRPC "
        f"{gateway['grpc_spans_per_s']:,.0f} spans/s "
        f"({gateway['grpc_ratio_vs_baseline']:.2f} x); at "
        f"{gateway['offered_spans_per_s']:,} spans/s offered: p50 "
        f"{gateway['latency_p50_ms']:.1f} ms, p99 {gateway['latency_p99_ms']:.1f} ms"
    )
    out["gateway"] = {k: round(v, 3) for k, v in gateway.items()}
    e2e = measure_e2e()
    print(
        f"\nend to end: {e2e['e2e_events_per_s']:,.0f} events/s through one worker (after a "
        f"warm-up drain at {e2e['warmup_drain_events_per_s']:,.0f}), "
        f"{e2e['ratio_vs_baseline']:.2f} x the raw-copy baseline "
        f"({e2e['baseline_events_per_s']:,.0f}/s); freshness at "
        f"{e2e['freshness_offered_events_per_s']:,.0f} events/s: p50 "
        f"{e2e['freshness_p50_ms']:,.0f} ms, p99 {e2e['freshness_p99_ms']:,.0f} ms (p99 "
        f"{e2e['freshness_warmup_p99_ms']:,.0f} ms in the {e2e['freshness_warmup_seconds']:.0f}s "
        "warm-up before); worker RSS "
        f"over the {e2e['soak_seconds']:.0f}s soak {e2e['soak_rss_start_mb']:,.0f} -> "
        f"{e2e['soak_rss_mid_mb']:,.0f} (half-way) -> {e2e['soak_rss_end_mb']:,.0f} MB; after a "
        f"{e2e['stall_seconds']:.0f}s stall of the worker, p99 "
        f"{e2e['stall_freshness_p99_ms_from_30s_after']:,.0f} ms from 30 s on; a "
        f"do-nothing Faust agent takes {e2e['faust_do_nothing_agent_events_per_s']:,.0f} events/s "
        f"({e2e['faust_stock_do_nothing_agent_events_per_s']:,.0f} on Faust's own consumer), "
        f"the same stages without Faust's delivery "
        f"{e2e['hot_path_without_faust_events_per_s']:,.0f} events/s; the worker split in two "
        f"processes (--role store, --role validate) {e2e['e2e_split_roles_events_per_s']:,.0f} "
        f"events/s; CPU per event, one process: "
        + ", ".join(f"{k} {v:.0f} us" for k, v in e2e["cpu_us_per_event"].items())
        + "; split: "
        + ", ".join(f"{k} {v:.0f} us" for k, v in e2e["split_roles_cpu_us_per_event"].items())
    )
    out["e2e"] = {k: _rounded(v) for k, v in e2e.items()}
    path = Path(__file__).resolve().parent / "results.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return write_table()


if __name__ == "__main__":
    sys.exit(main())
