"""``vigil alerts backtest --since``: the rules tried on the ledger's own events, as the worker's
evaluators took them when they were stored, on the real engine."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.alerting import CAUGHT_UP_COLUMNS, CAUGHT_UP_TABLE
from pipeline.cli import build_parser
from pipeline.codec import Registry
from pipeline.events import Cost, Enrichment, Eval, Event
from pipeline.owner import OwnerServer
from pipeline.rows import Origin
from pipeline.settings import ConfigError, Settings
from pipeline.sink import LedgerSink, Message
from pipeline.store import connect, migrate
from pipeline.validate import clean_key
from tests.conftest import ROOT
from tests.demo_store import fill

pytestmark = pytest.mark.integration


def _backtest(home: Path, *options: str) -> int:
    args = build_parser().parse_args(["alerts", "backtest", *options])
    settings = Settings.from_env(
        {"VIGIL_HOME": str(home), "VIGIL_CONFIG": str(ROOT / "vigil.yaml")}
    )
    return int(args.func(args, settings))


def test_the_ledgers_events_fire_the_alerts_their_evaluation_fired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = connect(f"chdb://{tmp_path / 'clickhouse'}")
    migrate(store)
    now = fill(store)  # the demo's workload, its alerts evaluated by vigil.yaml's rules
    raised = store.query_rows(
        "SELECT kind, toUnixTimestamp64Milli(fired_at), message FROM vigil.alerts ORDER BY 2, 1"
    )
    stored = int(store.query_rows("SELECT count() FROM vigil.audit_log")[0][0])
    assert {kind for kind, _, _ in raised} >= {"budget_threshold", "drift"}
    expected = sorted((kind, _iso(ms), message) for kind, ms, message in raised)
    since = f"{now - timedelta(days=1):%Y-%m-%d}"

    # beside a worker that owns the store (through its endpoint), and on the store itself
    owner = OwnerServer(store, tmp_path).start()
    try:
        assert _backtest(tmp_path, "--since", since) == 0
    finally:
        owner.close()
    store.close()
    assert _backtest(tmp_path, "--since", since) == 0
    out, err = capsys.readouterr()
    fired = [json.loads(line) for line in out.splitlines()]
    assert sorted((a["kind"], a["fired_at"], a["message"]) for a in fired) == sorted(2 * expected)
    assert err.count(f"{len(raised)} alert(s) from {stored:,} events") == 2

    # another tenant's events alone fire none of acme's; nor do events stored before the first
    assert _backtest(tmp_path, "--since", since, "--tenant", "globex") == 0
    assert "acme" not in capsys.readouterr().out
    first = min(ms for _, ms, _ in raised)
    until = _iso(first - 60_000)
    assert _backtest(tmp_path, "--since", since, "--until", until) == 0
    out, err = capsys.readouterr()
    assert all(json.loads(line)["fired_at"] < until for line in out.splitlines())
    assert len(out.splitlines()) < len(raised)


def test_the_ledgers_backtest_is_told_of_the_caught_up_times_the_workers_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Five poor scores of acme's bot in a half-hour window, and nothing of acme after them:
    the worker judged the window once its lag samples showed every event sent before a time past
    its end and the grace (vigil.yaml's five minutes) evaluated, and stored that time in
    ``vigil.caught_up``; so does the backtest of the ledger, before the events stored after that
    time (globex's spend past half its month's budget); without that time, or with a span that
    ends before it, the window stays open."""
    store = connect(f"chdb://{tmp_path / 'clickhouse'}")
    migrate(store)
    now = datetime.now(UTC)
    end = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    scores = [
        Event(event_id=f"q-{m}", kind="eval", ts=end - timedelta(minutes=m), tenant_id="acme",
              agent_id="bot", body=Eval("faithfulness", 0.3),
              enrichment=Enrichment("stored", None))
        for m in range(10, 5, -1)
    ]  # fmt: skip
    registry = Registry.load()
    messages = [
        Message(Origin("vigil.events.clean", 0, i), clean_key(e), registry.encode_event(e))
        for i, e in enumerate(scores)
    ]
    assert LedgerSink(store, registry, clock=lambda: end).write(messages).inserted == 5
    sampled = end + timedelta(minutes=6)
    spent = sampled + timedelta(minutes=1)
    spend = Event(event_id="c-0", kind="cost", ts=spent, tenant_id="globex", agent_id="bot",
                  body=Cost(2600.0), enrichment=Enrichment("non_token", "2600.00"))  # fmt: skip
    message = Message(
        Origin("vigil.events.clean", 1, 0), clean_key(spend), registry.encode_event(spend)
    )
    assert LedgerSink(store, registry, clock=lambda: spent).write([message]).inserted == 1
    since = f"{end - timedelta(days=1):%Y-%m-%d}"

    def alerts(*options: str) -> list[tuple[str, str]]:
        assert _backtest(tmp_path, "--since", since, *options) == 0
        out = capsys.readouterr().out
        return [(a["kind"], a["fired_at"]) for a in map(json.loads, out.splitlines())]

    assert alerts() == [("budget_threshold", spent.isoformat())]
    group = Settings.from_env({"VIGIL_HOME": str(tmp_path)}).consumer_group
    shown = [(sampled + timedelta(seconds=30), group, sampled)]  # by the sample after it
    store.insert(CAUGHT_UP_TABLE, shown, CAUGHT_UP_COLUMNS, "caught-up")
    store.close()
    assert alerts() == [
        ("eval_regression", end.isoformat()),
        ("budget_threshold", spent.isoformat()),
    ]
    assert alerts("--until", f"{sampled:%Y-%m-%d %H:%M}") == []


@pytest.mark.parametrize(
    "options, message",
    [
        ([], "give --events FILE or --since DATE"),
        (["--events", "x.jsonl", "--since", "2026-11-01"], "give --events FILE or --since DATE"),
        (["--events", "x.jsonl", "--tenant", "acme"], "give them with --since"),
        (["--since", "2026-11-02", "--until", "2026-11-01"], "--until: 2026-11-01 00:00 UTC is"),
    ],
)
def test_the_backtests_options_name_what_is_wrong(
    tmp_path: Path, options: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _backtest(tmp_path, *options)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()
