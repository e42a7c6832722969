"""The latest run's table that ``make bench`` writes into docs/benchmarks.md (``bench.table``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.table import DOCS, END, START, main, render, replaced, write


def _results(e2e: float = 8_304.0, p99: float = 808.0, rss: list[float] | None = None,
             mb_s: float = 26.4) -> dict[str, Any]:  # fmt: skip
    """A results.json as ``python -m bench`` writes it, with the figures the targets read."""
    stages = {"baseline_fastavro_decode_per_s": 47_910, "fold_per_s": 212_932}
    return {
        "command": "make bench",
        "when": "2026-12-06T08:10:49+00:00",
        "python": "3.11.7",
        "machine": "x86_64",
        "events": 20_000,
        "results": stages,
        "ratios_vs_baseline": {k: v / 47_910 for k, v in stages.items()},
        "stages_steal_percent": 0.0,
        "redaction": {
            "redact_mb_per_s_one_core": mb_s,
            "redact_vs_one_regex": 1.12,
            "recall": 1.0,
            "precision": 1.0,
        },
        "gateway": {
            "gateway_spans_per_s": 12_862.0,
            "ratio_vs_baseline": 0.929,
            "baseline_direct_produce_per_s": 13_852.0,
            "latency_p99_ms": 20.0,
            "offered_spans_per_s": 1_000,
        },
        "e2e": {
            "e2e_events_per_s": e2e,
            "warmup_drain_events_per_s": 7_937.0,
            "e2e_split_roles_events_per_s": 11_625.5,
            "ratio_vs_baseline": e2e / 109_340.6,
            "baseline_events_per_s": 109_340.6,
            "freshness_p50_ms": 383.0,
            "freshness_p99_ms": p99,
            "freshness_offered_events_per_s": e2e / 2,
            "soak_seconds": 600.0,
            "soak_rss_samples_mb": rss if rss is not None else [640.0] * 61,
            "worker_peak_rss_mb": 783.3,
            "cpu_us_per_event": {"worker": 136.25, "broker": 9.65},
            "split_roles_cpu_us_per_event": {"store": 81.35, "validate": 65.5, "broker": 3.8},
            "drain_steal_percent": 0.021,
            "faust_do_nothing_agent_events_per_s": 10_363.0,
            "stall_seconds": 5.0,
            "stall_freshness_p99_ms_from_30s_after": 666.0,
        },
    }


def _met(table: str, target: str) -> str:
    (row,) = [line for line in table.splitlines() if line.startswith(f"| {target}")]
    return row.rsplit("|", 2)[1].strip()


def test_each_target_is_judged_on_the_runs_own_figures() -> None:
    slow = render(_results())
    assert _met(slow, "`e2e_events_per_s`") == "**no**"
    assert "| 8,304 (its warm-up drain 7,937; split in two processes 11,626) |" in slow
    assert _met(slow, "`ratio_vs_baseline`") == "**no**"
    assert _met(slow, "`freshness_p99_ms`") == "yes"
    assert _met(slow, "redaction") == "**no**"
    fast = render(_results(e2e=21_000.0, p99=2_400.0, mb_s=59.5))
    assert _met(fast, "`e2e_events_per_s`") == "yes"
    assert _met(fast, "`freshness_p99_ms`") == "**no**"
    assert _met(fast, "redaction") == "yes"
    assert "| fold: rollups and every alert evaluator | 212,932 | 4.44 | 4.7 |" in fast


def test_the_gateway_line_gives_grpcs_rate_where_the_run_measured_it() -> None:
    results = _results()
    before = render(results)  # a results.json of a run before the gRPC receiver
    assert (
        "The OTLP gateway: 12,862 spans/s at saturation, 0.93x a direct produce (13,852/s); "
        "p99 20.0 ms at 1,000 spans/s offered (over HTTP)."
    ) in before
    results["gateway"] |= {"grpc_spans_per_s": 15_210.4, "grpc_ratio_vs_baseline": 1.098}
    assert "(13,852/s); over OTLP/gRPC 15,210 spans/s (1.10x); p99 20.0 ms" in render(results)


def test_the_heading_names_the_interpreter_where_the_run_said_it() -> None:
    results = _results()  # a results.json of a run before it was said
    assert "(`make bench`, Python 3.11.7, x86_64)\n" in render(results)
    results["interpreter"] = "/usr/bin/python3.11, libpython linked in"
    heading = "(`make bench`, Python 3.11.7 (/usr/bin/python3.11, libpython linked in), x86_64)\n"
    assert heading in render(results)


def test_rss_is_flat_when_the_soaks_last_100_s_are_level_with_its_second() -> None:
    # a climb in the first 100 s, then level: flat; a steady climb of 2 MB each 10 s: not
    warmed = [600.0 + 5 * i for i in range(10)] + [660.0 + (i % 3) for i in range(51)]
    flat = render(_results(rss=warmed))
    assert _met(flat, "worker RSS") == "yes"
    assert "means per 100 s 622, 661, 661, 661, 661, 661 MB (+0.0%)" in flat
    climbing = render(_results(rss=[600.0 + 2 * i for i in range(61)]))
    assert _met(climbing, "worker RSS") == "**no**"
    assert "means per 100 s 609, 629, 649, 669, 689, 709 MB (+12.7%)" in climbing
    assert _met(render(_results(rss=[640.0] * 12)), "worker RSS") == "**no**"  # too short


def test_the_table_goes_between_its_markers_and_nothing_else_changes() -> None:
    docs = "# Benchmarks\n\nCommand: `make bench`.\n\n## Stages\n\nhand-written analysis\n"
    first = replaced(docs, render(_results()))
    assert first.startswith("# Benchmarks\n\nCommand: `make bench`.\n\n" + START)
    assert first.endswith(END + "\n\n## Stages\n\nhand-written analysis\n")
    second = replaced(first, render(_results(e2e=21_000.0)))
    assert second.count(START) == second.count(END) == 1
    assert "| 21,000 (" in second and "| 8,304 (" not in second
    assert second.endswith(END + "\n\n## Stages\n\nhand-written analysis\n")
    assert replaced(second, render(_results())) == first


@pytest.mark.parametrize(
    "broken",
    [f"{START}\nno end", f"no start\n{END}", f"{END}\n{START}", f"{START}\n{END}\n{START}\n{END}"],
)
def test_markers_out_of_place_are_named_not_guessed(broken: str) -> None:
    with pytest.raises(ValueError, match=r"docs/benchmarks\.md: the latest run's table goes"):
        replaced(f"# Benchmarks\n\n{broken}\n", "table")


def test_write_puts_the_results_table_into_the_docs(tmp_path: Path) -> None:
    results, docs = tmp_path / "results.json", tmp_path / "benchmarks.md"
    results.write_text(json.dumps(_results()))
    docs.write_text("# Benchmarks\n\nintro\n\nrest\n")
    assert write(results, docs) == docs
    assert "| `e2e_events_per_s` ≥ 20,000, one worker process | 8,304" in docs.read_text()


def test_the_repositorys_docs_have_one_place_for_the_table() -> None:
    """``make bench`` ends by writing it: markers mended badly would fail the run's last step."""
    text = DOCS.read_text()
    assert text.count(START) == text.count(END) == 1
    assert replaced(text, "table").count("table") >= 1


@pytest.mark.parametrize(
    "results, docs, said",
    [
        (None, "# Benchmarks\n\nintro\n", "results.json does not exist (run `make bench`)"),
        ("{not json", "# Benchmarks\n\nintro\n", "results.json is not JSON: "),
        ('{"e2e": {}}', "# Benchmarks\n\nintro\n", "results.json has no 'results' (written by"),
        (json.dumps(_results()), f"# B\n\n{END}\n{START}\n", "the latest run's table goes"),
    ],
)
def test_a_table_not_written_is_said_why_and_the_docs_are_left_as_they_were(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    results: str | None,
    docs: str,
    said: str,
) -> None:
    results_path, docs_path = tmp_path / "results.json", tmp_path / "benchmarks.md"
    if results is not None:
        results_path.write_text(results)
    docs_path.write_text(docs)
    assert main(results_path, docs_path) == 1
    assert said in capsys.readouterr().err
    assert docs_path.read_text() == docs
    results_path.write_text(json.dumps(_results()))
    docs_path.write_text("# Benchmarks\n\nintro\n")
    assert main(results_path, docs_path) == 0
    assert "| 8,304 (" in docs_path.read_text()
