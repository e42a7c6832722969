"""vigil.yaml: errors name the path; keys come from the environment only."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.check import OK, WARN, _policy
from pipeline.config import key_digest, load_config, parse_config
from pipeline.detectors import Detector, Prefilter, find
from pipeline.prices import Catalog
from pipeline.redact import scrub_bytes
from pipeline.settings import ConfigError, Settings, load_yaml


def test_no_file_means_the_safe_default() -> None:
    config = load_config(None, {})
    policy = config.policy_for("anyone")
    assert policy.action("email") == "mask" and policy.action("aws_access_key") == "mask"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tenantz": {}}, "unknown section 'tenantz'"),
        (
            {"redaction": {"p": {"actions": {"emial": "mask"}}}},
            "redaction.p.actions.emial: unknown type",
        ),
        (
            {"redaction": {"p": {"actions": {"email": "hide"}}}},
            "redaction.p.actions.email: 'hide' is not one of",
        ),
        ({"redaction": {"p": {"default_action": "nothing"}}}, "redaction.p.default_action"),
        ({"redaction": {"p": {"scan_ids": ["actor.name"]}}}, "redaction.p.scan_ids: actor.name"),
        (
            {"redaction": {"p": {"custom": [{"name": "x1", "pattern": "("}]}}},
            "redaction.p.custom[0].pattern",
        ),
        # what Python compiles but the prefilter cannot scan: an error now, not a failure to
        # redact (each event of the tenant to the DLQ) at the first event
        (
            {
                "redaction": {
                    "p": {
                        "custom": [
                            {"name": "x1", "pattern": "EMP-\\d+"},
                            {"name": "x2", "pattern": "[0-9]*"},
                        ]
                    }
                }
            },
            "redaction.p.custom[1].pattern: it matches where there is nothing",
        ),
        (
            {"redaction": {"p": {"custom": [{"name": "x1", "pattern": "(?=id)"}]}}},
            "redaction.p.custom[0].pattern: it matches where there is nothing",
        ),
        (
            {"redaction": {"p": {"custom": [{"name": "x1", "pattern": r"(\w+)-\1"}]}}},
            "redaction.p.custom[0].pattern: Back-references are unsupported",
        ),
        ({"redaction": {"p": {"colour": 1}}}, "redaction.p.colour: unknown setting"),
        (
            {"tenants": {"acme": {"redaction": "missing"}}},
            "tenants.acme.redaction: no policy named 'missing'",
        ),
        (
            {"redaction": {"p": {"actions": {"email": "pseudonymize"}, "key_env": "ACME_KEY"}}},
            "ACME_KEY",
        ),
        ({"tenants": {"acme": {"retention_days": "1y"}}}, "tenants.acme.retention_days"),
        ({"tenants": {"acme": {"retention_days": 0}}}, "tenants.acme.retention_days"),
        ({"tenants": {"acme": {"retension_days": 3}}}, "tenants.acme.retension_days: unknown"),
        ({"legal_hold": {"units": ["T-1001"]}}, "legal_hold.units[0]: expected tenant/"),
        ({"legal_hold": {"people": []}}, "legal_hold.people: unknown setting"),
        # a string where a list goes was read letter by letter: `tenants: acme` held the
        # tenants a, c, m and e, and acme's rows were left to their retention
        ({"legal_hold": {"tenants": "acme"}}, "legal_hold.tenants: expected a list, got str"),
        ({"legal_hold": {"units": "acme/t:1"}}, "legal_hold.units: expected a list, got str"),
        ({"redaction": {"p": {"scan_ids": "unit.id"}}}, "redaction.p.scan_ids: expected a list"),
        # each of these two was a TypeError or a UnicodeEncodeError out of load
        ({"redaction": {"p": {"scan_ids": [["unit.id"]]}}}, "scan_ids: expected a list of field"),
        (
            {"redaction": {"p": {"custom": [{"name": "emp", "pattern": "EMP-\ud800"}]}}},
            "redaction.p.custom[0].pattern: not a valid regular expression ('utf-8' codec",
        ),
        ({"tenants": {"a": {"api_key_sha256": "ab"}}}, "tenants.a.api_key_sha256: expected a list"),
        (
            {"tenants": {"acme": {"api_keys_env": ["ACME_KEYS"]}}},
            "tenants.acme.api_keys_env: expected the name of an environment variable",
        ),
        # the alert rules: a misspelt setting is named rather than left at its default, and a
        # value that would make a rule judge nothing (or crash the worker) is refused
        ({"drift": [{"metric": "x", "treshold": 0.1}]}, "drift[0].treshold: unknown setting"),
        ({"evals": [{"metric": "f", "min_score": 0.5, "min_sample": 3}]}, "evals[0].min_sample"),
        ({"budgets": [{"scope": {"tenant": "a"}, "limit_usd": 5, "warn": 1}]}, "budgets[0].warn"),
        ({"alerts": {"cooldwon": "1h"}}, "alerts.cooldwon: unknown setting"),
        ({"alerts": {"routes": [{"webhook": "https://h", "fromat": "slack"}]}}, "routes[0].fromat"),
        ({"drift": [{"metric": "x", "window": "0m"}]}, "drift[0].window: expected a duration"),
        ({"evals": [{"metric": "f", "min_score": 1, "window": "0h"}]}, "evals[0].window"),
        ({"drift": [{"metric": "x", "threshold": 0}]}, "drift[0].threshold: must be positive"),
        ({"drift": [{"metric": "x", "min_samples": 2.5}]}, "drift[0].min_samples: expected a"),
        ({"evals": [{"metric": "f", "min_score": 1, "max_drop": -1}]}, "evals[0].max_drop"),
        ({"drift": [{"metric": "x", "agent": ["a", "b"]}]}, "drift[0].agent: expected a name"),
        ({"budgets": [{"scope": {"tenant": "a", "team": ["t"]}, "limit_usd": 1}]}, "scope.team"),
        ({"drift": [{"metric": "x", "baseline": 5}]}, "drift[0].baseline: expected {window"),
        ({"drift": {"metric": "x"}}, "drift: expected a list, got dict"),
        ({"alerts": ["x"]}, "alerts: expected a mapping, got list"),
        (
            {"alerts": {"routes": [{"webhook": "https://h", "match": "critical"}]}},
            "match: expected a",
        ),
        ({"alerts": {"routes": {"webhook": "https://h"}}}, "alerts.routes: expected a list"),
        (
            {"alerts": {"routes": [{"webhook": "https://h", "match": {"severity": "urgent"}}]}},
            "alerts.routes[0].match.severity: expected one of warning, critical, got 'urgent'",
        ),
        (
            {"alerts": {"routes": [{"webhook": "https://h", "match": {"kind": "budget"}}]}},
            "alerts.routes[0].match.kind: expected one of budget_threshold",
        ),
    ],
)
def test_errors_name_what_is_wrong_and_where(data: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as info:
        parse_config(data, {})
    assert message in str(info.value)


def test_groups_and_keys_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "vigil.yaml"
    path.write_text(
        "tenants:\n  acme: {redaction: strict}\n"
        "redaction:\n  strict:\n    actions: {pii: pseudonymize, secrets: drop}\n    key_env: ACME_KEY\n"
        "budgets:\n  - {scope: {tenant: acme}, period: month, limit_usd: 5000}\n"
    )
    config = load_config(path, {"ACME_KEY": "0123456789abcdef0123"})
    strict = config.policy_for("acme")
    assert strict.action("email") == "pseudonymize" and strict.action("jwt") == "drop"
    assert strict.key == b"0123456789abcdef0123" and "0123456789abcdef" not in repr(strict)
    assert config.policy_for("globex").name == "default"


def test_a_name_is_read_as_written_where_yaml_would_read_a_boolean_or_a_number(
    tmp_path: Path,
) -> None:
    """YAML 1.1 reads an unquoted off, no or yes as a boolean and 007 as a number: the tenant
    off was 'False' (its events stored, and its API key answered, as tenant 'False'), the
    tenant 007 was '7', the team no 'False'. Booleans are true and false alone (YAML 1.2's):
    a yes where one belongs is refused by name rather than read."""
    path = tmp_path / "vigil.yaml"
    path.write_text(
        "tenants:\n"
        "  off: {api_keys_env: OFF_KEYS, disabled: true}\n"
        "  no: {redaction: strict}\n"
        "  007: {api_keys_env: BOND_KEYS, retention_days: 30}\n"
        "  3.10: {api_keys_env: PY_KEYS}\n"
        "redaction:\n  strict:\n    actions: {pii: drop}\n"
        "agents:\n  no/on: {owner: off@no.example, team: no, unit: on}\n"
    )
    env = {"OFF_KEYS": "off-key-0123456789", "BOND_KEYS": "bond-key-0123456789",
           "PY_KEYS": "py-key-0123456789"}  # fmt: skip
    config = load_config(path, env)
    assert config.disabled_tenants == {"off"}
    assert sorted(config.api_keys.values()) == ["007", "3.10", "off"]
    assert config.policy_for("no").name == "strict"
    assert config.retention.days == {"007": 30}
    assert (config.agents["no/on"].team, config.agents["no/on"].unit) == ("no", "on")
    assert load_yaml("a: true\nb: False\nc: 0x10\n", "x.yaml", "policy") == {
        "a": True, "b": False, "c": 16
    }  # fmt: skip
    path.write_text("tenants:\n  acme: {disabled: yes}\n")
    with pytest.raises(ConfigError, match=r"tenants\.acme\.disabled: expected true or false"):
        load_config(path, {})


def test_a_key_given_twice_is_refused_where_yaml_would_keep_the_last(tmp_path: Path) -> None:
    """PyYAML keeps a repeated key's last value: the first ``tenants`` section's tenants (and
    their gateway keys), an agent's first owner, a price entry's first price were dropped
    unsaid."""
    path = tmp_path / "vigil.yaml"
    path.write_text("tenants:\n  acme: {redaction: default}\nagents: {}\ntenants:\n  b: {}\n")
    with pytest.raises(
        ConfigError,
        match=r"vigil.yaml: line 4: 'tenants' is given twice in one mapping \(first on line 1\)",
    ):
        load_config(path, {})
    path.write_text("agents:\n  acme/bot: {owner: a@x}\n  acme/bot: {owner: b@x}\n")
    with pytest.raises(ConfigError, match=r"line 3: 'acme/bot' is given twice .*line 2"):
        load_config(path, {})
    catalog = tmp_path / "prices.yaml"
    catalog.write_text(
        "version: v1\nmodels:\n  - {provider: openai, model: gpt-x, effective_from: 2025-01-01,\n"
        "     input: 5.00, output: 15.00,\n     input: 2.50}\n"
    )
    with pytest.raises(ConfigError, match=r"prices.yaml: line 5: 'input' is given twice"):
        Catalog.load(catalog)
    catalog.write_text(  # twice on one line
        "version: v1\nmodels:\n  - {provider: openai, model: gpt-x, effective_from: 2025-01-01,"
        " input: 5.00, output: 15.00, input: 2.50}\n"
    )
    with pytest.raises(ConfigError, match=r"line 3: 'input' is given twice .*first on line 3"):
        Catalog.load(catalog)
    # a key named as written, not as YAML reads it (a date, a number)
    with pytest.raises(ConfigError, match=r"x.yaml: line 3: '2026-01-01' is given twice"):
        load_yaml("since:\n  2026-01-01: 1\n  2026-01-01: 2\n", "x.yaml", "policy")
    with pytest.raises(ConfigError, match=r"line 2: '16' is given twice"):
        load_yaml("{16: a,\n '16': b}", "x.yaml", "policy")
    # a merge key (<<) still gives values to override, and keys alike in two mappings are fine
    path.write_text(
        "agents:\n  acme/a: &owned {owner: a@x, team: t}\n  acme/b: {<<: *owned, owner: b@x}\n"
    )
    agents = load_config(path, {}).agents
    assert (agents["acme/b"].owner, agents["acme/b"].team) == ("b@x", "t")
    assert agents["acme/a"].owner == "a@x"


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "nope.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML") as invalid:
        load_config(bad, {})
    # the marks name the file, not the text it was read into, and quote none of it
    assert f'in "{bad}", line 1, column 10' in str(invalid.value)
    assert "<unicode string>" not in str(invalid.value) and "unclosed" not in str(invalid.value)
    secret = "https://hooks.slack.com/services/T0/B0/s3cr3t"
    bad.write_text(f"alerts:\n  routes:\n    - {{webhook: {secret}, format: [slack}}\n")
    with pytest.raises(ConfigError, match="not valid YAML") as invalid:
        load_config(bad, {})
    assert f'in "{bad}", line 3, column 72' in str(invalid.value)
    assert "s3cr3t" not in str(invalid.value)
    # each of these was a traceback: IsADirectoryError, UnicodeDecodeError
    with pytest.raises(ConfigError, match=r"cannot read the configuration file \(Is a directory"):
        load_config(tmp_path, {})
    bad.write_bytes(b"tenants:\n  acme: {retention_days: 3\xff}\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: the configuration file is not UTF-8 text \(line 2\)"
    ):
        load_config(bad, {})
    catalog = tmp_path / "catalog.yaml"
    catalog.write_bytes(b"version: '1'\nmodels: []  # caf\xe9\n")
    with pytest.raises(
        ConfigError, match=r"catalog.yaml: the price catalog is not UTF-8 text \(line 2\)"
    ):
        load_config(_yaml(tmp_path, f"prices: {{catalog: {catalog}}}\n"), {})
    with pytest.raises(ConfigError, match="no such price catalog"):
        load_config(_yaml(tmp_path, f"prices: {{catalog: {tmp_path / 'nope.yaml'}}}\n"), {})


def test_retention_and_legal_hold() -> None:
    config = parse_config(
        {
            "tenants": {"acme": {"retention_days": 30}, "globex": {"retention_days": 365}},
            "legal_hold": {"tenants": ["globex"], "units": ["acme/ticket:T-1001"]},
        },
        {},
    )
    r = config.retention
    assert r.days == {"acme": 30, "globex": 365}
    assert r.held_units == {("acme", "ticket", "T-1001")}
    now = datetime(2026, 12, 31, tzinfo=UTC)
    assert r.month_expired("acme", 202611, now)  # November ended 30 days before
    assert not r.month_expired("acme", 202611, now - timedelta(days=1))
    assert not r.month_expired("globex", 202301, now)  # held
    assert not r.month_expired("initech", 202001, now)  # no retention: kept for ever
    assert r.month_expired("acme", 202512, datetime(2026, 1, 31, tzinfo=UTC))  # December wraps
    ttl = r.ttl_statement()
    assert "multiIf(tenant_id = 'acme', 30, tenant_id = 'globex', 365, 0)" in ttl
    assert "tenant_id NOT IN ('globex')" in ttl and "('acme', 'ticket', 'T-1001')" in ttl
    # dead letters: globex is held, and so is acme, which has a unit on hold: none expire
    assert r.tenant_ttl_statement("dlq") == "ALTER TABLE vigil.dlq REMOVE TTL"
    r = dataclasses.replace(r, days={**r.days, "initech": 7})
    assert r.tenant_ttl_statement("dlq") == (
        "ALTER TABLE vigil.dlq MODIFY TTL toDateTime(received_at) + toIntervalDay(multiIf("
        "tenant_hint = 'initech', 7, 0)) DELETE WHERE tenant_hint IN ('initech')"
    )
    # alerts: with the ledger's month they fired in
    assert r.tenant_ttl_statement("alerts") == (
        "ALTER TABLE vigil.alerts MODIFY TTL toStartOfMonth(fired_at) + toIntervalMonth(1) + "
        "toIntervalDay(multiIf(tenant_id = 'initech', 7, 0)) DELETE WHERE tenant_id IN ('initech')"
    )


def test_gateway_keys_and_webhook_urls_never_show_in_reprs() -> None:
    config = parse_config(
        {
            "tenants": {"acme": {"api_keys_env": "ACME_KEYS"}},
            "alerts": {"routes": [{"webhook": "https://hooks.example/services/SECRET-PATH"}]},
        },
        {"ACME_KEYS": "key-ONE-0123456789, key-TWO-0123456789"},
    )
    assert len(config.api_keys) == 2 and set(config.api_keys.values()) == {"acme"}
    text = repr(config) + repr(config.routes)
    assert "SECRET-PATH" not in text and "key-ONE" not in text and "key-TWO" not in text
    with pytest.raises(ConfigError, match="also a key of tenant 'acme'"):
        parse_config(
            {"tenants": {"acme": {"api_keys_env": "K"}, "globex": {"api_keys_env": "K"}}},
            {"K": "same-key-0123456789"},
        )


def test_a_webhook_route_is_named_in_the_deliveries_table_by_its_name_or_a_digest() -> None:
    slack = "https://hooks.slack.com/services/T0/B0/SECRET"
    routes = parse_config({"alerts": {"routes": [
        {"webhook": slack, "format": "slack"},
        {"webhook": "https://ops.example/vigil", "name": "ops.json"},
    ]}}, {}).routes  # fmt: skip
    assert routes[1].key == "ops.json"
    digest = routes[0].key
    assert digest.startswith("webhook-") and "SECRET" not in digest and "slack" not in digest
    # the same webhook in another format, or for other alerts, is another route
    other = parse_config({"alerts": {"routes": [
        {"webhook": slack}, {"webhook": slack, "format": "slack", "match": {"severity": "critical"}},
    ]}}, {}).routes  # fmt: skip
    assert len({digest, *(r.key for r in other)}) == 3
    with pytest.raises(ConfigError, match=r"alerts.routes\[1\]: a second route named 'a'"):
        parse_config({"alerts": {"routes": [{"webhook": "http://a/1", "name": "a"},
                                            {"webhook": "http://a/2", "name": "a"}]}}, {})  # fmt: skip
    with pytest.raises(ConfigError, match=r"alerts.routes\[1\]: a second route named 'webhook-"):
        parse_config({"alerts": {"routes": [{"webhook": slack}, {"webhook": slack}]}}, {})
    with pytest.raises(ConfigError, match=r"alerts.routes\[0\].name: expected letters"):
        parse_config({"alerts": {"routes": [{"webhook": slack, "name": "on call"}]}}, {})


def test_a_tenants_keys_may_be_in_a_file_read_with_the_policy(tmp_path: Path) -> None:
    """A mounted secret, one key a line, its path relative to vigil.yaml's folder; a file that
    cannot be read is named, never a key of it."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "acme").write_text("# rotated 2026-12-07\n\n  key-new  \nkey-old\n")
    path = tmp_path / "vigil.yaml"
    path.write_text("tenants:\n  acme: {api_keys_file: keys/acme, api_keys_env: ACME_KEYS}\n")
    config = load_config(path, {"ACME_KEYS": "key-env"})
    assert config.api_keys == {key_digest(k): "acme" for k in ("key-new", "key-old", "key-env")}
    assert config.keys_unset == {}
    (tmp_path / "keys" / "acme").write_text("# all revoked\n")  # as SIGHUP reads it then
    assert load_config(path, {"ACME_KEYS": "key-env"}).api_keys == {key_digest("key-env"): "acme"}
    (tmp_path / "keys" / "acme").unlink()
    with pytest.raises(ConfigError) as missing:
        load_config(path, {})
    assert str(missing.value) == (
        f"tenants.acme.api_keys_file: cannot read {tmp_path / 'keys' / 'acme'}: "
        "No such file or directory"
    )
    with pytest.raises(ConfigError, match=r"tenants.acme.api_keys_file: expected the path"):
        parse_config({"tenants": {"acme": {"api_keys_file": ["a"]}}}, {})
    (tmp_path / "shared").write_text("key-x\n")
    with pytest.raises(ConfigError, match=r"tenants.globex: an API key is also a key of tenant"):
        parse_config({"tenants": {"acme": {"api_keys_file": str(tmp_path / "shared")},
                                  "globex": {"api_keys_file": str(tmp_path / "shared")}}}, {})  # fmt: skip


def test_a_tenant_whose_key_variable_holds_no_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "vigil.yaml"
    path.write_text("tenants:\n  acme: {api_keys_env: ACME_KEYS}\n"
                    "  globex: {api_keys_env: GLOBEX_KEYS}\n")  # fmt: skip
    config = load_config(path, {"ACME_KEYS": "k1", "GLOBEX_KEYS": " , "})
    assert config.keys_unset == {"globex": "GLOBEX_KEYS"}
    assert set(config.api_keys.values()) == {"acme"}
    assert load_config(path, {"ACME_KEYS": "k1", "GLOBEX_KEYS": "k2"}).keys_unset == {}
    settings = Settings.from_env({"VIGIL_CONFIG": str(path)})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ACME_KEYS", "k1")
        env.delenv("GLOBEX_KEYS", raising=False)
        finding = _policy(settings, "gateway", load_config(path, os.environ))
        assert finding.status == WARN
        assert "no key in GLOBEX_KEYS (tenants.globex.api_keys_env)" in finding.detail
        worker = _policy(settings, "worker", load_config(path, os.environ))
        assert worker.status == OK  # the worker takes no keys


def test_a_custom_pattern_that_may_backtrack_for_hours_is_named(tmp_path: Path) -> None:
    # (a+)+b took 0.4 s over 22 characters and four times more for each two more: one event
    # of a few dozen would hold the worker's validation, and every event behind it, for hours
    path = tmp_path / "vigil.yaml"
    path.write_text(
        "redaction:\n"
        "  strict:\n"
        "    custom:\n"
        "      - {name: codes, pattern: '(a+)+b'}\n"
        "      - {name: bounded, pattern: '(a+){1,5}b'}\n"
        "      - {name: ticket, pattern: 'TICKET-(\\d{3}-)+\\d+'}\n"
        "      - {name: words, pattern: '(\\w+\\s?)+!'}\n"
        "tenants:\n  acme: {redaction: strict}\n"
    )
    config = load_config(path, {})
    assert config.slow_patterns() == [
        "redaction.strict.custom[0] (codes: '(a+)+b')",
        "redaction.strict.custom[3] (words: '(\\\\w+\\\\s?)+!')",
    ]
    settings = Settings.from_env({"VIGIL_CONFIG": str(path)})
    worker = _policy(settings, "worker", config)
    assert worker.status == WARN and "redaction.strict.custom[0] (codes:" in worker.detail
    assert worker.detail.endswith("bound its outer repeat ({1,20}), or let the repeated part "
                                  "match a stretch of text one way only ((a+)+ is a+)")  # fmt: skip
    assert "custom[" not in _policy(settings, "gateway", config).detail  # it redacts nothing
    assert load_config(None, {}).slow_patterns() == []  # the shipped detectors: none


def _yaml(folder: Path, text: str) -> Path:
    path = folder / "vigil.yaml"
    path.write_text(text)
    return path


def test_compile_patterns_compiles_every_policys_prefilter_and_the_scrubs() -> None:
    config = parse_config(
        {"redaction": {"p": {"custom": [{"name": "employee_id", "pattern": r"EMP-\d{6}"}]}},
         "tenants": {"acme": {"redaction": "p"}}},
        {},
    )  # fmt: skip
    policies = [*config.policies.values(), config.scrub]
    assert not any("prefilter" in vars(p) for p in policies if p.custom)  # not at parse
    config.compile_patterns()
    assert all("prefilter" in vars(p) for p in policies)
    assert config.scrub.prefilter.detectors[0].type == "employee_id"


def test_each_policys_custom_patterns_are_compiled_once_for_every_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vigil.yaml's check of a policy's patterns, the policy's prefilter and the dead letters'
    share one compiled database: start-up with ten policies of twenty patterns took 9 s, 5 of
    them compiling the same patterns again."""
    compiled: list[tuple[str, ...]] = []
    compile_ = Prefilter.__init__

    def counted(self: Prefilter, detectors: Sequence[Detector]) -> None:
        compiled.append(tuple(detector.type for detector in detectors))
        compile_(self, detectors)

    monkeypatch.setattr(Prefilter, "__init__", counted)
    tag = uuid.uuid4().hex[:8]  # patterns no other test compiled (they are compiled once a run)
    config = parse_config(
        {"redaction": {"a": {"custom": [{"name": "employee", "pattern": f"EMP{tag}-\\d{{6}}"}]},
                       "b": {"custom": [{"name": "badge", "pattern": f"BDG{tag}-\\d{{4}}"},
                                        {"name": "desk", "pattern": f"DSK{tag}-\\d{{3}}"}]},
                       "c": {"custom": [{"name": "employee", "pattern": f"EMP{tag}-\\d{{6}}"}]}},
         "tenants": {"acme": {"redaction": "a"}, "globex": {"redaction": "b"},
                     "initech": {"redaction": "c"}}},
        {},
    )  # fmt: skip
    config.compile_patterns()
    assert sorted(types for types in compiled if "employee" in types or "badge" in types) == [
        ("badge", "desk"),
        ("employee",),  # a and c hold the same patterns: one database
    ]
    # and each finds what it did: the policies' own, and every one of them in a dead letter
    letter = f"EMP{tag}-123456 BDG{tag}-7788 DSK{tag}-123 a@b.example".encode()
    assert (
        scrub_bytes(letter, config.scrub)
        == b"*" * 18 + b" " + b"*" * 16 + b" " + b"*" * 15 + b" " + b"*" * 11
    )
    assert [f.type for f in find(letter.decode(), config.policy_for("globex").prefilter)] == [
        "badge",
        "desk",
        "email",
    ]


def test_patterns_the_prefilter_takes_alone_but_not_together_are_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hyperscan

    def too_large(detectors: tuple[Detector, ...]) -> Prefilter:
        raise hyperscan.error("Pattern too large.")

    monkeypatch.setattr("pipeline.detectors.custom_prefilter", too_large)
    with pytest.raises(ConfigError) as refused:
        parse_config({"redaction": {"p": {"custom": [{"name": "x1", "pattern": "EMP-\\d+"}]}}}, {})
    assert str(refused.value) == (
        "redaction.p.custom: Pattern too large (patterns are scanned with Hyperscan first)"
    )
