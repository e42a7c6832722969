"""Stage micro-benchmarks, each printed as events/s and as a ratio against a baseline measured
in the same run (plain fastavro decoding of the same bytes), so machines compare fairly; and
the redaction corpus: recall, precision, look-alikes untouched, MB/s of text on one core; and
the OTLP gateway (spans/s, latency at a fixed load) and the whole pipeline end to end against
a raw-copy baseline, on a local broker.

Writes bench/results.json.
"""

from __future__ import annotations

import io
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import fastavro

from bench.e2e import measure as measure_e2e
from bench.gateway import measure as measure_gateway
from bench.redaction import measure as measure_redaction
from pipeline.codec import EVENT_SCHEMA, HEADER, Registry
from pipeline.events import event_from_avro, event_to_avro
from pipeline.rows import Origin, audit_row
from pipeline.validate import Limits, decode_event, route
from pipeline.workload import generate

N = 20_000


def _rate(fn: Callable[[], object], count: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return count / best


def main() -> int:
    registry = Registry.load()
    now = datetime.now(UTC)
    workload = generate(N, now, seed=3)
    wire = [registry.encode(EVENT_SCHEMA, event_to_avro(e)) for e in workload.events[:N]]
    count = len(wire)
    schema = registry.by_id[registry.writer_id(EVENT_SCHEMA)]
    limits = Limits()
    origin = Origin("vigil.events.raw", 0, 0)
    events = [event_from_avro(registry.decode(b, EVENT_SCHEMA)) for b in wire]

    results = {
        "baseline_fastavro_decode_per_s": _rate(
            lambda: [fastavro.schemaless_reader(io.BytesIO(b[HEADER.size :]), schema, None)
                     for b in wire], count),
        "decode_validate_per_s": _rate(
            lambda: [decode_event(b, registry, limits, now) for b in wire], count),
        "route_per_s": _rate(
            lambda: [route(b, b"k", origin, registry, limits, now) for b in wire], count),
        "audit_row_per_s": _rate(lambda: [audit_row(e, origin, now) for e in events], count),
    }  # fmt: skip
    base = results["baseline_fastavro_decode_per_s"]
    print(f"{'benchmark':<34}{'events/s':>14}{'vs baseline':>14}")
    for name, rate in results.items():
        print(f"{name:<34}{rate:>14,.0f}{rate / base:>14.2f}")
    out = {
        "command": "make bench",
        "when": now.isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "events": count,
        "results": {k: round(v) for k, v in results.items()},
        "ratios_vs_baseline": {k: round(v / base, 3) for k, v in results.items()},
    }
    redaction = measure_redaction()
    print(
        f"\nredaction corpus: {redaction['records']:,} records, recall {redaction['recall']:.2%}, "
        f"precision {redaction['precision']:.2%}, look-alikes untouched "
        f"{redaction['lookalikes_untouched']:.2%}, "
        f"{redaction['redact_mb_per_s_one_core']:.1f} MB/s on one core"
    )
    out["redaction"] = redaction
    gateway = measure_gateway()
    print(
        f"\ngateway: {gateway['gateway_spans_per_s']:,.0f} spans/s at saturation "
        f"({gateway['clients_at_saturation']} clients, {gateway['spans_per_request']} spans a "
        f"request), {gateway['ratio_vs_baseline']:.2f} x the direct-produce baseline "
        f"({gateway['baseline_direct_produce_per_s']:,.0f}/s); at "
        f"{gateway['offered_spans_per_s']:,} spans/s offered: p50 "
        f"{gateway['latency_p50_ms']:.1f} ms, p99 {gateway['latency_p99_ms']:.1f} ms"
    )
    out["gateway"] = {k: round(v, 3) for k, v in gateway.items()}
    e2e = measure_e2e()
    print(
        f"\nend to end: {e2e['e2e_events_per_s']:,.0f} events/s through one worker, "
        f"{e2e['ratio_vs_baseline']:.2f} x the raw-copy baseline "
        f"({e2e['baseline_events_per_s']:,.0f}/s); freshness at "
        f"{e2e['freshness_offered_events_per_s']:,.0f} events/s: p50 "
        f"{e2e['freshness_p50_ms']:,.0f} ms, p99 {e2e['freshness_p99_ms']:,.0f} ms; worker peak "
        f"RSS {e2e['worker_peak_rss_mb']:,.0f} MB"
    )
    out["e2e"] = {k: round(v, 3) for k, v in e2e.items()}
    path = Path(__file__).resolve().parent / "results.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
