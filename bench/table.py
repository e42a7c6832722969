"""The latest run's table in docs/benchmarks.md, written from bench/results.json.

``make bench`` writes it at its end; ``python -m bench.table`` writes it again from the
results.json there is (after the docs were edited by hand, say). The table goes between two
markers, and nothing else in the file is touched: the analysis around it is written by hand.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
DOCS = ROOT / "docs" / "benchmarks.md"
START = "<!-- make bench: the latest run, written by bench/table.py -->"
END = "<!-- make bench: end of the latest run -->"

# issue 9's targets
E2E_TARGET = 20_000
RATIO_TARGET = 0.5
FRESHNESS_P99_TARGET_MS = 2_000
REDACTION_TARGET_MB_S = 30
# RSS is flat when the mean of the soak's last 100 s is within this of its second 100 s (the
# first holds the warm-up's climb: docs/benchmarks.md, "RSS over 30 minutes")
RSS_LEVEL = 0.05
RSS_SAMPLE_SECONDS = 10  # bench.e2e samples the worker's RSS this often

_STAGES = {
    "baseline_fastavro_decode_per_s": "baseline: plain fastavro decode",
    "decode_validate_per_s": "decode + validate (`decode_event`)",
    "route_per_s": "`route`: decode, validate, redact, re-encode",
    "route_enriched_per_s": "`route` as the worker runs it, enriched",
    "enrich_per_s": "enrich (price, owner)",
    "audit_row_per_s": "event -> audit_log row (`audit_row`)",
    "ledger_link_per_s": "hash chain (`ledger.link`)",
    "fold_per_s": "fold: rollups and every alert evaluator",
    "ledger_write_per_s": "ledger write into embedded ClickHouse (`LedgerSink.write`)",
    "ledger_write_handed_per_s": "the same, each event handed over by validate",
}


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def rss_means(samples: Sequence[float]) -> list[float]:
    """The soak's RSS samples averaged over each whole 100 s (a last sample or few, past the
    last whole 100 s, are left out)."""
    per = 100 // RSS_SAMPLE_SECONDS
    whole = len(samples) - len(samples) % per
    return [statistics.fmean(samples[i : i + per]) for i in range(0, whole, per)]


def rss_level(means: Sequence[float]) -> tuple[float, bool]:
    """The change from the soak's second 100 s to its last (whole) 100 s, and whether that is
    level (within RSS_LEVEL). Too short a soak to tell is not level."""
    if len(means) < 3:
        return 0.0, False
    change = means[-1] / means[1] - 1
    return change, abs(change) <= RSS_LEVEL


def render(results: Mapping[str, Any]) -> str:
    """The Markdown of one run's results (a results.json), between the markers."""
    e2e = results["e2e"]
    stages = results["results"]
    redaction = results["redaction"]
    gateway = results["gateway"]
    means = rss_means(e2e["soak_rss_samples_mb"])
    change, level = rss_level(means)
    rate = e2e["e2e_events_per_s"]
    ratio = e2e["ratio_vs_baseline"]
    p99 = e2e["freshness_p99_ms"]
    mb_s = redaction["redact_mb_per_s_one_core"]
    cpu = ", ".join(f"{k} {v:.0f} µs" for k, v in e2e["cpu_us_per_event"].items())
    split_cpu = ", ".join(f"{k} {v:.0f} µs" for k, v in e2e["split_roles_cpu_us_per_event"].items())
    lines = [
        START,
        f"### The latest run: {results['when']} (`{results['command']}`, Python "
        f"{results['python']}"
        + (f" ({results['interpreter']})" if "interpreter" in results else "")
        + f", {results['machine']})",
        "",
        "Written by `make bench` from `bench/results.json` as it ends; the runs before it, and "
        "what their figures mean, are in the sections below.",
        "",
        "| target (issue 9) | this run | met |",
        "| --- | --- | --- |",
        f"| `e2e_events_per_s` ≥ {E2E_TARGET:,}, one worker process | {rate:,.0f} (its warm-up "
        f"drain {e2e['warmup_drain_events_per_s']:,.0f}; split in two processes "
        f"{e2e['e2e_split_roles_events_per_s']:,.0f}) | {_yes(rate >= E2E_TARGET)} |",
        f"| `ratio_vs_baseline` ≥ {RATIO_TARGET} | {ratio:.3f} (the raw copy "
        f"{e2e['baseline_events_per_s']:,.0f}/s) | {_yes(ratio >= RATIO_TARGET)} |",
        f"| `freshness_p99_ms` ≤ {FRESHNESS_P99_TARGET_MS:,} at half the drain's rate | "
        f"{p99:,.0f} (p50 {e2e['freshness_p50_ms']:,.0f}, at "
        f"{e2e['freshness_offered_events_per_s']:,.0f} events/s offered for "
        f"{e2e['soak_seconds']:,.0f} s) | {_yes(p99 <= FRESHNESS_P99_TARGET_MS)} |",
        f"| worker RSS flat over the soak (the last 100 s within {RSS_LEVEL:.0%} of the second) "
        f"| means per 100 s {', '.join(f'{m:,.0f}' for m in means)} MB ({change:+.1%}); peak "
        f"with the drain {e2e['worker_peak_rss_mb']:,.0f} MB | {_yes(level)} |",
        f"| redaction ≥ {REDACTION_TARGET_MB_S} MB/s on one core | {mb_s:.1f} MB/s "
        f"({redaction['redact_vs_one_regex']:.2f}x one email regex over the same text); recall "
        f"{redaction['recall']:.2%}, precision {redaction['precision']:.2%} | "
        f"{_yes(mb_s >= REDACTION_TARGET_MB_S)} |",
        "",
        f"CPU per event stored, one process: {cpu}; split: {split_cpu}. The hypervisor stole "
        f"{results['stages_steal_percent']}% of the machine during the stages, "
        f"{e2e['drain_steal_percent']}% during the drain. A do-nothing Faust agent took "
        f"{e2e['faust_do_nothing_agent_events_per_s']:,.0f} events/s. After a "
        f"{e2e['stall_seconds']:.0f} s stall of the worker, p99 "
        f"{e2e['stall_freshness_p99_ms_from_30s_after']:,.0f} ms from 30 s on.",
        "",
        f"| stage ({results['events']:,} events, best of 3) | events/s | vs baseline | µs/event |",
        "| --- | ---: | ---: | ---: |",
    ]
    ratios = results["ratios_vs_baseline"]
    for name, rate_of in stages.items():
        label = _STAGES.get(name, f"`{name}`")
        lines.append(f"| {label} | {rate_of:,} | {ratios[name]:.2f} | {1e6 / rate_of:.1f} |")
    lines += [
        "",
        f"The OTLP gateway: {gateway['gateway_spans_per_s']:,.0f} spans/s at saturation, "
        f"{gateway['ratio_vs_baseline']:.2f}x a direct produce "
        f"({gateway['baseline_direct_produce_per_s']:,.0f}/s)"
        # runs before the gRPC receiver measured none
        + (
            f"; over OTLP/gRPC {gateway['grpc_spans_per_s']:,.0f} spans/s "
            f"({gateway['grpc_ratio_vs_baseline']:.2f}x)"
            if "grpc_spans_per_s" in gateway
            else ""
        )
        + f"; p99 {gateway['latency_p99_ms']:.1f} ms at {gateway['offered_spans_per_s']:,} "
        "spans/s offered (over HTTP).",
        END,
    ]
    return "\n".join(lines)


def replaced(text: str, table: str, where: str = "docs/benchmarks.md") -> str:
    """``text`` with ``table`` between its markers; where it has none, after its first
    paragraph under the title. ValueError, naming ``where``, for markers out of place."""
    starts, ends = text.count(START), text.count(END)
    if starts == ends == 0:
        head, sep, rest = text.partition("\n\n")
        after, sep2, tail = rest.partition("\n\n")
        if not sep2:
            return f"{text.rstrip()}\n\n{table}\n"
        return f"{head}{sep}{after}\n\n{table}\n\n{tail}"
    if starts != 1 or ends != 1 or text.index(START) > text.index(END):
        raise ValueError(
            f"{where}: the latest run's table goes between one line {START!r} and one line "
            f"{END!r} after it; the file has {starts} and {ends} of them, in that order or not: "
            "mend them by hand"
        )
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    return before + table + after


def write(results_path: Path = RESULTS, docs_path: Path = DOCS) -> Path:
    """Write the table of ``results_path`` into ``docs_path``."""
    results = json.loads(results_path.read_text())
    docs_path.write_text(replaced(docs_path.read_text(), render(results), str(docs_path)))
    return docs_path


def main(results_path: Path = RESULTS, docs_path: Path = DOCS) -> int:
    """``write``, saying what it wrote; 1, and why on stderr, where it could not (the docs
    are then as they were)."""
    try:
        print(f"wrote the latest run's table into {write(results_path, docs_path)}")
        return 0
    except FileNotFoundError as exc:
        why = f"{exc.filename} does not exist (run `make bench`)"
    except json.JSONDecodeError as exc:
        why = f"{results_path} is not JSON: {exc}"
    except KeyError as exc:
        why = f"{results_path} has no {exc} (written by an older `make bench`?)"
    except ValueError as exc:  # markers out of place
        why = str(exc)
    print(f"bench.table: {why}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
