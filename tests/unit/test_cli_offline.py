"""The offline stage runners: JSON lines in, results out, no services."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli import build_parser
from tests.conftest import EXAMPLES, ROOT


def _run(
    args: list[str], stdin: str, tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "VIGIL_HOME": str(tmp_path), **(env or {})},
        timeout=60,
    )


def test_redact_keeps_order_and_keys_and_summarises_on_stderr(tmp_path: Path) -> None:
    lines = [
        {
            "event_id": "e1",
            "kind": "interaction",
            "ts": "2026-11-20T10:00:00Z",
            "tenant_id": "acme",
            "agent_id": "bot",
            "provider": "openai",
            "model": "gpt-4o",
            "output_text": "reach me at jane@acme.example",
            "attributes": {"ip": "10.1.2.3", "cc bob@acme.example": "yes"},
        },
        {"free": "form", "secret": "token ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"},
        {
            "event_id": "e2",
            "kind": "cost",
            "ts": "2026-11-20T10:00:00Z",
            "tenant_id": "acme",
            "agent_id": "bot",
            "amount": 2,
            "description": "ticket T-1234 at 14:03:07, version 3.11.7",
        },
    ]
    out = _run(["redact"], "\n".join(json.dumps(x) for x in lines) + "\n", tmp_path)
    assert out.returncode == 0, out.stderr
    got = [json.loads(x) for x in out.stdout.splitlines()]
    assert [list(g) for g in got] == [list(x) for x in lines]
    assert got[0]["output_text"] == "reach me at [EMAIL]" and got[0]["attributes"] == {
        "ip": "[IPV4]",
        "cc [EMAIL]": "yes",  # an event's attribute keys, as the worker redacts them
    }
    assert got[1]["secret"] == "token [GITHUB_TOKEN]"
    assert got[2] == lines[2]
    assert "email=2" in out.stderr and "github_token=1" in out.stderr and "3 line(s)" in out.stderr


def test_redact_uses_the_tenant_policy_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(
        "tenants: {acme: {redaction: strict}}\n"
        "redaction: {strict: {actions: {email: pseudonymize}, key_env: ACME_KEY}}\n"
    )
    line = json.dumps({"note": "jane@acme.example"})
    env = {"ACME_KEY": "a-very-long-test-key-123"}
    a = _run(["redact", "--config", "policy.yaml", "--tenant", "acme"], line, tmp_path, env)
    b = _run(["redact", "--config", "policy.yaml", "--tenant", "acme"], line, tmp_path, env)
    other = _run(["redact", "--config", "policy.yaml", "--tenant", "globex"], line, tmp_path, env)
    assert a.stdout == b.stdout and json.loads(a.stdout)["note"].startswith("[EMAIL:")
    assert json.loads(other.stdout)["note"] == "[EMAIL]"
    assert other.stderr.startswith(  # a tenant it does not list: checked against the default
        f"vigil redact: tenant 'globex' is not in {tmp_path / 'policy.yaml'} (its tenants: acme): "
        "redacting with the default policy, as the worker does for a tenant it does not list\n"
    )
    assert "is not in" not in a.stderr
    missing_key = _run(["redact", "--config", "policy.yaml"], line, tmp_path)
    assert missing_key.returncode == 2 and "ACME_KEY" in missing_key.stderr


def test_redact_stops_at_a_text_a_custom_pattern_runs_out_of_time_on(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(
        "redaction: {default: {custom: [{name: corp_handle, pattern: '[a-z]+@corp'}]}}\n"
    )
    lines = [json.dumps({"note": "bob@corp"}), json.dumps({"note": "a" * 200_000 + "@corq"
                                                           ", bob@corp"})]  # fmt: skip
    out = _run(["redact", "--config", "policy.yaml"], "\n".join(lines) + "\n", tmp_path)
    assert out.returncode == 2
    assert json.loads(out.stdout) == {"note": "[CORP_HANDLE]"}  # the line before it, done
    assert "line 2: redaction_timeout: the custom pattern 'corp_handle' ran past" in out.stderr
    assert "aaaa" not in out.stderr


def test_validate_passes_examples_and_names_rejections(tmp_path: Path) -> None:
    good = [p.read_text().replace("\n", " ") for p in EXAMPLES]
    bad = json.dumps(
        {
            "event_id": "x",
            "kind": "interaction",
            "ts": "2026-11-20T10:00:00Z",
            "tenant_id": "",
            "agent_id": "a",
            "provider": "p",
            "model": "m",
        }
    )
    # the examples carry fixed dates; widen the accepted age so this test does not expire
    out = _run(
        ["validate"],
        "\n".join([*good, bad, "{not json"]) + "\n",
        tmp_path,
        {"VIGIL_MAX_EVENT_AGE_DAYS": "36500"},
    )
    assert out.returncode == 1
    assert len(out.stdout.splitlines()) == len(good)
    assert f"line {len(good) + 1}: missing_tenant" in out.stderr and "bad_json" in out.stderr


def test_enrich_prices_events_and_names_unknown_models(tmp_path: Path) -> None:
    (tmp_path / "vigil.yaml").write_text(
        f"agents: {{acme/support-bot: {{owner: jane@acme.example, team: support}}}}\n"
        f"prices: {{catalog: {Path(__file__).resolve().parents[2] / 'prices' / 'default.yaml'}, "
        "aliases: {acme-gpt4o-prod: gpt-4o}}\n"
    )
    base = {
        "kind": "interaction",
        "ts": "2025-07-01T10:00:00Z",
        "tenant_id": "acme",
        "agent_id": "support-bot",
        "provider": "azure.ai.openai",
        "input_tokens": 1000,
        "output_tokens": 100,
    }
    lines = [
        {**base, "event_id": "a", "model": "acme-gpt4o-prod"},
        {**base, "event_id": "b", "model": "home-grown-llm"},
    ]
    out = _run(
        ["enrich", "--config", "vigil.yaml"], "\n".join(json.dumps(x) for x in lines), tmp_path
    )
    assert out.returncode == 0, out.stderr
    got = [json.loads(x) for x in out.stdout.splitlines()]
    assert (got[0]["cost_usd"], got[0]["cost_status"], got[0]["team"]) == (
        "0.003500000",
        "priced",
        "support",
    )
    assert (got[1]["cost_usd"], got[1]["cost_status"]) == (None, "unknown_model")
    assert "home-grown-llm (1 events)" in out.stderr


def test_enrich_names_a_cost_the_ledger_cannot_hold_and_stops(tmp_path: Path) -> None:
    lines = [
        {"event_id": "c1", "kind": "cost", "ts": "2026-11-20T10:00:00Z", "tenant_id": "acme",
         "agent_id": "bot", "amount": 12.5},
        {"event_id": "c2", "kind": "cost", "ts": "2026-11-20T10:00:00Z", "tenant_id": "acme",
         "agent_id": "bot", "amount": 1e30},
    ]  # fmt: skip
    out = _run(["enrich"], "\n".join(json.dumps(x) for x in lines), tmp_path)
    assert out.returncode == 2
    assert [json.loads(x)["cost_usd"] for x in out.stdout.splitlines()] == ["12.500000000"]
    assert "line 2: amount: 1e+30 is not below 1,000,000,000" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_lone_surrogate_is_rejected_by_validate_and_written_back_by_redact_and_enrich(
    tmp_path: Path,
) -> None:
    event = {"event_id": "e1", "kind": "interaction", "ts": "2026-11-20T10:00:00Z",
             "tenant_id": "acme", "agent_id": "bot", "provider": "openai",
             "model": "gpt-\ud800"}  # fmt: skip
    line = json.dumps(event) + "\n"  # JSON may escape what UTF-8 cannot hold
    checked = _run(["validate"], line, tmp_path)
    assert checked.returncode == 1 and checked.stdout == ""
    assert "line 1: unencodable: the event does not fit the event schema" in checked.stderr
    for command in ("redact", "enrich"):
        done = _run([command], line, tmp_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["model"] == "gpt-\ud800"  # the same string back


def test_kafka_acls_prints_what_each_principal_may_do(tmp_path: Path) -> None:
    done = _run(["kafka", "acls", "--worker", "User:w", "--gateway", "User:g", "--producer",
                 "User:p", "--producer", "User:q"], "", tmp_path, {"VIGIL_TOPIC_PREFIX": "x",
                 "VIGIL_CONSUMER_GROUP": "grp"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "User:w may READ topic x.events.raw",
        "User:w may CREATE topic x.events.raw",
        "User:w may READ topic x.events.clean",
        "User:w may WRITE topic x.events.clean",
        "User:w may CREATE topic x.events.clean",
        "User:w may READ topic x.events.dlq",
        "User:w may WRITE topic x.events.dlq",
        "User:w may CREATE topic x.events.dlq",
        "User:w may WRITE topic x.rollups",
        "User:w may CREATE topic x.rollups",
        "User:w may WRITE topic x.alerts",
        "User:w may CREATE topic x.alerts",
        "User:w may READ group grp*",
        "User:g may WRITE topic x.events.raw",
        "User:g may WRITE topic x.events.dlq",
        "User:p may WRITE topic x.events.raw",
        "User:q may WRITE topic x.events.raw",
    ]


def test_kafka_acls_names_a_principal_it_cannot_read(tmp_path: Path) -> None:
    done = _run(["kafka", "acls", "--producer", "agent"], "", tmp_path)
    assert done.returncode == 2 and not done.stdout
    assert "--producer: expected a principal as User:name, got 'agent'" in done.stderr
    done = _run(["kafka", "acls"], "", tmp_path)
    assert done.returncode == 2 and "name a principal with --worker" in done.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["demo", "--events", "-5"], "argument --events: expected a whole number from 1 to "),
        (["dlq", "list", "--limit", "0"], "argument --limit: expected a whole number"),
        # past 64 bits: ClickHouse's own INVALID_LIMIT_EXPRESSION, once the store was opened
        (["alerts", "list", "--limit", "1" + "0" * 20], "from 1 to 9223372036854775807, got"),
        (["alerts", "list", "--limit", "ten"], "argument --limit: expected a whole number"),
        (["dlq", "replay", "--page-size", "0"], "argument --page-size: expected a whole number"),
        (["cost", "project", "--agent", "a", "--units", "-1"], "argument --units: expected"),
        (["check", "--timeout", "nan"], "argument --timeout: expected seconds, more than 0"),
        (["spool", "send", "f", "--timeout", "0"], "argument --timeout: expected seconds"),
        (["gateway", "--port", "70000"], "argument --port: expected a port from 1 to 65535"),
        (["gateway", "--grpc-port", "0"], "argument --grpc-port: expected a port from 1 to"),
        # said before Kafka is asked
        (
            ["gateway", "--port", "4400", "--grpc-port", "4400"],
            "OTLP/HTTP and OTLP/gRPC receivers were both given port 4400: give gRPC another",
        ),
    ],
)
def test_a_count_or_a_wait_that_means_nothing_is_refused(
    args: list[str], said: str, tmp_path: Path
) -> None:
    """Before, the demo ran with no events, a negative --limit reached ClickHouse's parser."""
    done = _run(args, "", tmp_path)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not (tmp_path / "clickhouse").exists()  # nothing started


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["alerts", "backtest", "--since", "today"], "--since: 'today' is not a date (YYYY-MM-DD)"),
        (["alerts", "backtest", "--since", "2026-12-01", "--until", "soon"],
         "--until: 'soon' is not a date (YYYY-MM-DD)"),
        (["alerts", "backtest", "--since", "2026-12-02", "--until", "2026-12-01"],
         "--until: 2026-12-01 00:00 UTC is not after --since"),
        (["alerts", "list", "--since", "today"], "--since: 'today' is not a date (YYYY-MM-DD)"),
        (["cost", "report", "--since", "today"], "--since: 'today' is not a date (YYYY-MM-DD)"),
    ],
)  # fmt: skip
def test_a_date_that_is_not_one_is_named_with_its_option(
    args: list[str], said: str, tmp_path: Path
) -> None:
    """The backtest's dates were argparse's ``type``, which said only "invalid parse_date
    value: 'today'" (and "invalid <lambda> value" for --until)."""
    done = _run(args, "", tmp_path)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert "invalid" not in done.stderr
    assert not (tmp_path / "clickhouse").exists()  # nothing started


def test_an_anchor_file_that_cannot_be_read_is_named_with_its_option(tmp_path: Path) -> None:
    """It said "/x.json: [Errno 2] No such file or directory: '/x.json'"."""
    missing, text = tmp_path / "missing.json", tmp_path / "notes.txt"
    text.write_text("heads kept in the ticket\n")
    done = _run(["audit", "verify", "--anchor", str(missing)], "", tmp_path)
    assert done.returncode == 2 and done.stderr == (
        f"vigil: error: --anchor {missing}: cannot read it (No such file or directory)\n"
    )
    done = _run(["audit", "verify", "--anchor", str(text)], "", tmp_path)
    assert done.returncode == 2 and done.stderr == (
        f"vigil: error: --anchor {text}: not an anchor file (Expecting value: line 1 column 1 "
        "(char 0))\n"
    )
    assert not (tmp_path / "clickhouse").exists()  # read before the store


def test_reading_a_store_that_is_not_there_says_what_makes_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for args in (["dlq", "list"], ["audit", "verify"], ["sql", "SELECT 1"]):
        done = _run(args, "", tmp_path, {"VIGIL_HOME": str(home)})
        assert done.returncode == 2, done.stderr
        assert f"no Vigil store at {home}/clickhouse yet: `vigil worker`" in done.stderr
    assert not home.exists()  # a reader makes no empty store
    (home / "clickhouse").mkdir(parents=True)  # a store the worker never migrated
    done = _run(["alerts", "list"], "", tmp_path, {"VIGIL_HOME": str(home)})
    assert done.returncode == 2
    assert "has no vigil database: `vigil worker` makes it" in done.stderr, done.stderr
    assert _run(["sql", "SELECT 40 + 2", "--format", "TSV"], "", tmp_path,
                {"VIGIL_HOME": str(home)}).stdout == "42\n"  # fmt: skip


def test_lines_not_utf8_or_nested_too_deeply_are_named_not_a_traceback(tmp_path: Path) -> None:
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000  # past Python's recursion limit
    valid = json.dumps({"event_id": "e1", "kind": "cost", "ts": "2026-11-20T10:00:00Z",
                        "tenant_id": "acme", "agent_id": "bot", "amount": 1.5})  # fmt: skip
    twice = valid.replace('"tenant_id": "acme"', '"tenant_id": "acme", "tenant_id": "globex"')
    # an attribute's key is not named: the worker would redact it
    keyed = valid.replace('"amount"', '"attributes": {"bob@x.io": "1", "bob@x.io": "2"}, "amount"')
    data = f"{deep}\n".encode() + b'{"note": "caf\xe9"}\n' + f"{valid}\n{twice}\n{keyed}\n".encode()
    (tmp_path / "in.jsonl").write_bytes(data)
    checked = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "validate"], input=data, capture_output=True,
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "VIGIL_HOME": str(tmp_path)}, timeout=60,
    )  # fmt: skip
    said = checked.stderr.decode()
    assert checked.returncode == 1 and "Traceback" not in said, said
    assert "line 1: bad_json: nested too deeply to be read" in said
    assert "line 2: bad_utf8: not UTF-8 (at character 13)" in said
    assert "line 4: bad_json: 'tenant_id' is given twice in one object" in said
    assert "line 5: bad_json: a key is given twice in one object" in said
    assert "bob@" not in said
    assert "1 valid, 4 rejected" in said and json.loads(checked.stdout)["event_id"] == "e1"
    for command in (["redact"], ["enrich"]):  # they stop rather than skip a line
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *command], input=data[len(deep) + 1 :],
            capture_output=True, cwd=tmp_path, timeout=60,
            env={"PATH": "/usr/bin:/bin", "VIGIL_HOME": str(tmp_path)},
        )  # fmt: skip
        assert done.returncode == 2 and b"line 1: " in done.stderr and b"not UTF-8" in done.stderr
    backtest = _run(["alerts", "backtest", "--events", "in.jsonl"], "", tmp_path)
    assert backtest.returncode == 0, backtest.stderr
    assert "in.jsonl:1: skipped: nested too deeply" in backtest.stderr
    assert "in.jsonl:2: skipped: not UTF-8" in backtest.stderr
    assert "in.jsonl:4: skipped: 'tenant_id' is given twice" in backtest.stderr
    piped = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "alerts", "backtest", "--events", "-"],
        input=data, capture_output=True, cwd=tmp_path, timeout=60,
        env={"PATH": "/usr/bin:/bin", "VIGIL_HOME": str(tmp_path)},
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert b"stdin:2: skipped: not UTF-8" in piped.stderr
    assert b"0 alert(s) from 1 events; 4 line(s) skipped" in piped.stderr  # as validate: 1 valid
    # read, yet too deep for redact's walk of an object that is not an event
    walked = _run(["redact"], '{"a": "x"}\n' + "[" * 900 + "1" + "]" * 900 + "\n", tmp_path)
    assert walked.returncode == 2 and "Traceback" not in walked.stderr, walked.stderr
    assert "line 2: bad_json: nested too deeply to be redacted" in walked.stderr
    assert walked.stdout == '{"a": "x"}\n'
    missing = _run(["send", "no-such.jsonl"], "", tmp_path)
    assert missing.returncode == 2
    assert "vigil: error: no-such.jsonl: cannot read it (No such file or directory)" in (
        missing.stderr
    )


def test_the_demo_with_policies_that_give_its_gateway_tenant_no_key_stops_at_once(
    tmp_path: Path,
) -> None:
    (tmp_path / "mine.yaml").write_text("tenants:\n  acme: {retention_days: 30}\n")
    done = _run(["demo", "--events", "10"], "", tmp_path,
                {"VIGIL_CONFIG": str(tmp_path / "mine.yaml")})  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert ("mine.yaml: the demo sends initech's spans through the gateway with the key in "
            "VIGIL_DEMO_KEY_INITECH, which this file does not give initech") in done.stderr  # fmt: skip
    assert not (tmp_path / "kafka").exists()  # before any broker was started


def test_an_output_file_that_cannot_be_written_is_named_before_the_work(tmp_path: Path) -> None:
    """It was a FileNotFoundError traceback, after the report had been rendered."""
    for command in (["report"], ["audit", "anchor"]):
        done = _run([*command, "--out", str(tmp_path / "no" / "out")], "", tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert (f"--out {tmp_path}/no/out: cannot write it ({tmp_path}/no is not a folder this "
                "user may write)") in done.stderr  # fmt: skip
        folder = _run([*command, "--out", str(tmp_path)], "", tmp_path)
        assert folder.returncode == 2 and f"--out {tmp_path}: cannot write it (is a folder)" in (
            folder.stderr
        )


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every command and subcommand: its words, its parser and its line in its parent's list."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, listed.get(name)
                yield from _commands(sub, (*path, name))


def test_every_commands_help_says_what_it_does() -> None:
    commands = list(_commands(build_parser()))
    assert len(commands) > 30  # dlq replay, cost report, dev kafka, kafka acls...
    for words, parser, line in commands:
        assert line, f"vigil {' '.join(words)} has no line in its parent's list"
        # -h opens with it, not with the usage alone
        help_text = " ".join(parser.format_help().split())
        assert " ".join(line.split()) in help_text, f"vigil {' '.join(words)} -h"


def test_check_says_a_server_it_cannot_reach_in_its_findings_alone(tmp_path: Path) -> None:
    """Without a broker or a ClickHouse server where the settings point, each is one FAIL line:
    the ClickHouse client's warnings (urllib3 retrying, an 'Unexpected Http Driver Exception')
    were printed, stamped, above the finding that says it."""
    env = {"VIGIL_KAFKA_BOOTSTRAP": "127.0.0.1:1", "VIGIL_CLICKHOUSE_DSN": "http://127.0.0.1:1"}
    run = _run(["check", "--timeout", "1"], "", tmp_path, env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL  clickhouse  cannot open ClickHouse at http://127.0.0.1:1: Connection refused" \
        in run.stdout  # fmt: skip
    assert run.stderr == ""


def test_a_command_says_a_server_it_cannot_reach_in_its_error_alone(tmp_path: Path) -> None:
    """A one-shot command against a ClickHouse server it cannot reach prints its one error: the
    client's warnings (urllib3 retrying, an 'Unexpected Http Driver Exception') were printed,
    stamped, above it. With -v they are shown."""
    env = {"VIGIL_CLICKHOUSE_DSN": "http://127.0.0.1:1"}
    error = "vigil: error: cannot open ClickHouse at http://127.0.0.1:1: Connection refused\n"
    for command in (["sql", "SELECT 1"], ["dlq", "list"], ["cost", "report"]):
        run = _run(command, "", tmp_path, env)
        assert run.returncode == 2, run.stdout + run.stderr
        assert run.stderr == error, command
    verbose = _run(["-v", "sql", "SELECT 1"], "", tmp_path, env)
    assert verbose.stderr.endswith(error)
    assert "WARNING urllib3.connectionpool: Retrying (" in verbose.stderr
    assert "WARNING clickhouse_connect" in verbose.stderr


@pytest.mark.parametrize(
    "command",
    [["demo"], ["check", "--timeout", "1"], ["worker"], ["gateway"], ["migrate"], ["redact"],
     ["enrich"], ["cost", "reprice", "--catalog", str(ROOT / "prices" / "default.yaml")],
     ["audit", "verify"], ["dlq", "replay"], ["report"], ["alerts", "backtest", "--events", "-"],
     ["alerts", "redeliver"]],
    ids=" ".join,
)  # fmt: skip
def test_every_command_that_reads_vigil_yaml_takes_config_over_vigil_config(
    tmp_path: Path, command: list[str]
) -> None:
    """DESIGN's "path via --config / VIGIL_CONFIG": three commands took --config, the worker,
    the gateway and nine others only VIGIL_CONFIG."""
    good = tmp_path / "good.yaml"
    good.write_text("tenants: {acme: {}}\n")
    out = _run([*command, "--config", "missing.yaml"], "", tmp_path, {"VIGIL_CONFIG": str(good)})
    assert out.returncode in (1, 2), out.stdout + out.stderr
    assert f"{tmp_path / 'missing.yaml'}: no such configuration file" in out.stdout + out.stderr


def test_a_commands_config_wins_over_a_missing_vigil_config(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(
        "redaction:\n  default:\n    custom:\n      - {name: ticket, pattern: 'TKT-\\d{4}'}\n"
    )
    env = {"VIGIL_CONFIG": str(tmp_path / "nowhere.yaml")}
    out = _run(["redact", "--config", "policy.yaml"], '{"t": "see TKT-1234"}\n', tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"t": "see [TICKET]"}


def test_every_option_and_argument_says_what_it_takes() -> None:
    """``vigil COMMAND -h`` lists each with a line of its own (21 showed only their name)."""

    def silent(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from silent(sub, f"{path} {name}")
            elif not action.help:
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(silent(build_parser(), "vigil")) == []


def test_version_is_the_installed_packages(tmp_path: Path) -> None:
    from importlib.metadata import version

    out = _run(["--version"], "", tmp_path)
    assert (out.returncode, out.stdout) == (0, f"vigil {version('vigil-pipeline')}\n")
