"""dashboards/prometheus/vigil-rules.yaml: checked and unit-tested by Prometheus's promtool
(each rule firing on the series of vigil-rules.test.yaml when it should, with the labels and
text an on-call gets), and every metric, label and label value its expressions name is one the
worker's and the gateway's /metrics export, as the code writes them (a renamed metric or label
would leave a rule that never fires, and promtool's series would not see it)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from pipeline.alerting import Notifier
from pipeline.certs import expiry_family
from pipeline.gateway import Metrics
from pipeline.health import WorkerStatus
from pipeline.progress import Progress
from pipeline.worker import RETRIED
from tests.conftest import ROOT, prometheus_binary

RULES = ROOT / "dashboards" / "prometheus" / "vigil-rules.yaml"
RULE_TESTS = RULES.with_name("vigil-rules.test.yaml")
# what PromQL the rules and the processes dashboard may call, and its words that are neither
# metrics nor functions
FUNCTIONS = {"rate", "increase", "deriv", "time", "sum", "max", "min", "avg", "count", "abs",
             "histogram_quantile"}  # fmt: skip
AGGREGATIONS = {"sum", "max", "min", "avg", "count"}
KEYWORDS = {"by", "without", "and", "or", "unless", "on", "ignoring", "bool"}
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus as it scrapes
# labels whose values the code names in full, each exported from the start
CLOSED_LABELS = {"count", "outcome", "what"}
NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"


def _exported() -> dict[str, dict[str, set[str]]]:
    """Each metric the worker and the gateway export -> its labels -> the values seen, every
    optional family of the worker's included."""
    status = WorkerStatus(Progress(), RETRIED)
    now = datetime.now(UTC)
    status.lag = [(now, "g", "vigil.events.clean", 0, 10, 13, 3)]
    notifier = Notifier([], record=lambda *a, **k: None)
    status.notified = notifier.counts
    status.owed = lambda: {"oncall": 2}
    status.renewals = lambda: 0
    status.late = lambda: {("eval", "acme"): 1}
    status.caught_up = now
    status.kafka_certificates = {"VIGIL_KAFKA_SSL_CA_LOCATION": now}
    gateway = Metrics.empty()
    gateway.observe("/v1/traces", 200, 0.01)
    certificates = expiry_family("vigil_gateway", {"VIGIL_KAFKA_SSL_CA_LOCATION": now}, None)
    text = status.metrics() + gateway.text(0, certificates=certificates)
    exported: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            exported[line.split()[2]]  # a family with no sample yet is still exported
        elif line and not line.startswith("#"):
            sample = re.match(rf"({NAME})(?:\{{(.*)\}})? ", line)
            assert sample, line
            labels = exported[sample[1]]
            for key, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', sample[2] or ""):
                labels[key].add(value)
    return exported


# and what Prometheus makes of each scrape: whether it answered
EXPORTED = {**_exported(), "up": {label: set() for label in SCRAPE_LABELS}}
DOCUMENT: dict[str, Any] = yaml.safe_load(RULES.read_text())
ALERTS = [rule for group in DOCUMENT["groups"] for rule in group["rules"]]


def _parts(expr: str) -> tuple[dict[str, list[tuple[str, str]]], list[list[str]], set[str]]:
    """The metrics ``expr`` reads with their matchers' (label, value), its aggregations' label
    lists (``by``), and the functions it calls."""
    text = re.sub(r"\[\w+\]", "", expr)  # range selectors
    groupings = [
        [label.strip() for label in listed.split(",")]
        for listed in re.findall(r"\bby\s*\(([^)]*)\)", text)
    ]
    text = re.sub(r"\bby\s*\([^)]*\)", " ", text)
    metrics: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, matchers in re.findall(rf"({NAME})\s*\{{([^}}]*)\}}", text):
        metrics[name] += re.findall(r'(\w+)\s*=\s*"([^"]*)"', matchers)
    text = re.sub(r"\{[^}]*\}", " ", text)
    called = set()
    for name, call in re.findall(rf"({NAME})\s*(\()?", text):
        if name in KEYWORDS:  # `or (...)` is no call
            continue
        if call:
            called.add(name)
        else:
            metrics[name]  # a metric without matchers
    return metrics, groupings, called


def test_the_rules_are_in_prometheus_rule_format() -> None:
    assert [group["name"] for group in DOCUMENT["groups"]] == [
        "vigil-processes", "vigil-worker", "vigil-gateway"
    ]  # fmt: skip
    names = [rule["alert"] for rule in ALERTS]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"Vigil[A-Za-z]+", n) for n in names)
    for rule in ALERTS:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smhd]", rule.get("for", "0s")), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


@pytest.mark.parametrize("rule", ALERTS, ids=[rule["alert"] for rule in ALERTS])
def test_each_rule_reads_what_vigil_exports(rule: dict[str, Any]) -> None:
    metrics, groupings, called = _parts(rule["expr"])
    assert metrics and called <= FUNCTIONS, (metrics, called)
    for name, matchers in metrics.items():
        assert name in EXPORTED, f"{rule['alert']}: no process exports {name}"
        for label, value in matchers:
            assert label in EXPORTED[name], f"{rule['alert']}: {name} has no label {label}"
            if label in CLOSED_LABELS:
                assert value in EXPORTED[name][label], f"{rule['alert']}: {name}{{{label}={value}}}"
    labels = set().union(*(EXPORTED[name] for name in metrics)) | SCRAPE_LABELS
    for listed in groupings:
        assert set(listed) <= labels, f"{rule['alert']}: by ({', '.join(listed)})"
    # a label the annotations name is one the expression's result keeps
    said = set(re.findall(r"\$labels\.(\w+)", " ".join(rule["annotations"].values())))
    if called & AGGREGATIONS:
        kept = set.intersection(*(set(listed) for listed in groupings)) if groupings else set()
    else:
        kept = labels
    assert said <= kept, f"{rule['alert']}: {said - kept} is not in its result"


def test_a_metric_renamed_in_a_rule_is_caught() -> None:
    """The check above can fail: a name no process exports, and a label value none has."""
    metrics, _, _ = _parts('rate(vigil_worker_event_total{count="validated"}[5m])')
    assert "vigil_worker_event_total" not in EXPORTED and "vigil_worker_event_total" in metrics
    metrics, _, _ = _parts('rate(vigil_worker_events_total{count="to_DLQ"}[5m])')
    assert ("count", "to_DLQ") in metrics["vigil_worker_events_total"]
    assert "to_DLQ" not in EXPORTED["vigil_worker_events_total"]["count"]


def test_promtool_checks_the_rules_and_each_fires_as_its_test_says() -> None:
    promtool = prometheus_binary("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout, checked.stdout
    # the stack's configuration (docker-compose.yml), with the rules it names
    config = RULES.with_name("prometheus.yml")
    checked = subprocess.run([promtool, "check", "config", str(config)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout, checked.stdout
    tested = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # every rule is shown firing, and silent, by some test
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    names = {rule["alert"] for rule in ALERTS}
    assert fired == names and silent == names, (names - fired, names - silent)


def test_alertmanager_reads_its_configuration_and_routes_every_vigil_alert() -> None:
    """dashboards/prometheus/alertmanager.yml, the stack's: amtool (the version compose runs)
    reads it, and routes each rule's alert, with its labels, to its receiver; its matchers name
    severities the rules give. (tests/integration/test_prometheus.py has a real Alertmanager
    page with what a real Prometheus fires.)"""
    amtool = prometheus_binary("amtool")
    config = RULES.with_name("alertmanager.yml")
    checked = subprocess.run([amtool, "check-config", str(config)],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
    document = yaml.safe_load(config.read_text())
    for rule in ALERTS:
        labels = {"alertname": rule["alert"], **rule["labels"], "instance": "worker:9464"}
        routed = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={config}",
             *(f"{k}={v}" for k, v in labels.items())],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert routed.stdout.strip() == "oncall", (rule["alert"], routed.stdout + routed.stderr)
    matchers = [*document["route"]["routes"][0]["matchers"]]
    for inhibit in document["inhibit_rules"]:
        matchers += inhibit["source_matchers"] + inhibit["target_matchers"]
    named = {m.split("=", 1)[1].strip('"') for m in matchers if m.startswith("severity=")}
    assert named and named <= {rule["labels"]["severity"] for rule in ALERTS}, named


def _build() -> Any:
    """dashboards/build.py, the script that writes the dashboards."""
    spec = importlib.util.spec_from_file_location(
        "dashboards_build", ROOT / "dashboards" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROCESSES = ROOT / "dashboards" / "prometheus" / "processes.json"


def test_the_processes_dashboard_is_what_build_writes_and_reads_what_vigil_exports() -> None:
    board = json.loads(PROCESSES.read_text())
    assert board == _build().processes(), "run python dashboards/build.py"
    targets = [(panel, target) for panel in board["panels"] for target in panel["targets"]]
    assert len(board["panels"]) == 10 and len(targets) == 15
    for panel, target in targets:
        assert (
            panel["datasource"]
            == target["datasource"]
            == {"type": "prometheus", "uid": "vigil-prometheus"}
        )
        metrics, groupings, called = _parts(target["expr"].replace("$__rate_interval", "1m"))
        assert metrics and called <= FUNCTIONS, (panel["title"], called)
        for name in metrics:
            assert name in EXPORTED, f"{panel['title']}: no process exports {name}"
        labels = set().union(*(EXPORTED[name] for name in metrics)) | SCRAPE_LABELS
        for listed in groupings:
            assert set(listed) <= labels, f"{panel['title']}: by ({', '.join(listed)})"
        # the legend names only labels the query's result keeps
        legend = set(re.findall(r"\{\{(\w+)\}\}", target["legendFormat"]))
        kept = set.intersection(*(set(g) for g in groupings)) if groupings else labels
        assert legend <= kept, f"{panel['title']}: {legend - kept}"
