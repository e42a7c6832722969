"""dashboards/prometheus/vigil-rules.yaml in a real Prometheus (Debian's, as `make test` unpacks
it) scraping a real worker and gateway: it reads their /metrics, evaluates every rule without
an error, and fires the gateway's alert when a SIGHUP finds vigil.yaml unreadable, which
dashboards/prometheus/alertmanager.yml in a real Alertmanager (built from its source by `make
test`) routes to its receiver, a webhook here; and every query of the processes dashboard
(dashboards/prometheus/processes.json) answers, with data where the panel always has some."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from pipeline.devkafka import ended_with_caller
from pipeline.services import GatewayProcess, WorkerProcess, free_port
from pipeline.settings import Settings
from pipeline.topics import ensure_topics
from tests.conftest import ROOT, http_get, prometheus_binary
from tests.integration.conftest import Webhooks, wait_until

pytestmark = pytest.mark.integration
RULES = ROOT / "dashboards" / "prometheus" / "vigil-rules.yaml"
PROCESSES = RULES.with_name("processes.json")
ALERTMANAGER = RULES.with_name("alertmanager.yml")
KEY = "acme-key-0123456789abcdef"


def _three_spans() -> bytes:
    """An export the gateway accepts one span of, rejects one (negative tokens) and ignores one
    (not GenAI)."""
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add()
    now = time.time_ns()
    for i, tokens in enumerate((12, -5, None), start=1):
        span = spans.spans.add(trace_id=(0x9E0 + i).to_bytes(16, "big"),
                               span_id=i.to_bytes(8, "big"), name="chat",
                               start_time_unix_nano=now - 10**9, end_time_unix_nano=now)  # fmt: skip
        if tokens is not None:
            for key, value in (("gen_ai.provider.name", "openai"),
                               ("gen_ai.request.model", "gpt-4o")):  # fmt: skip
                span.attributes.add(key=key).value.string_value = value
            span.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = tokens
    return request.SerializeToString()


class Served:
    """A server of Prometheus's on 127.0.0.1:``port`` (``command`` given its flags), its
    output in ``name``.log, ready once /-/ready answers 200."""

    def __init__(self, folder: Path, name: str, command: list[str], port: int) -> None:
        self.port = port
        self.log = folder / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(ended_with_caller(command), stdout=out, stderr=out)
        wait_until(self._ready, 60, f"{name} ready", self.said)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.said()
        try:
            return http_get(f"{self.url}/-/ready")[0] == 200
        except OSError:  # not listening yet
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def said(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Alertmanager(Served):
    """dashboards/prometheus/alertmanager.yml in a real Alertmanager, its receiver given a
    webhook (``url``) and its group's first wait shortened to a second; no cluster port."""

    def __init__(self, folder: Path, url: str) -> None:
        config = yaml.safe_load(ALERTMANAGER.read_text())
        assert [r["name"] for r in config["receivers"]] == [config["route"]["receiver"]]
        config["receivers"][0]["webhook_configs"] = [{"url": url}]
        config["route"]["group_wait"] = "1s"
        written = folder / "alertmanager.yml"
        written.write_text(yaml.safe_dump(config))
        port = free_port()
        command = [prometheus_binary("alertmanager"), f"--config.file={written}",
                   f"--storage.path={folder / 'alertmanager'}", "--cluster.listen-address=",
                   f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
        super().__init__(folder, "alertmanager", command, port)


class Prometheus(Served):
    """A Prometheus server on 127.0.0.1 scraping ``targets`` (job -> host:port) each second and
    evaluating the rules as often, sending what fires to ``alertmanager``."""

    def __init__(self, folder: Path, targets: dict[str, str], alertmanager: Served) -> None:
        config = folder / "prometheus.yml"
        config.write_text(json.dumps({  # YAML reads JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "alerting": {"alertmanagers": [
                {"static_configs": [{"targets": [f"127.0.0.1:{alertmanager.port}"]}]}]},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in targets.items()],
        }))  # fmt: skip
        port = free_port()
        command = [prometheus_binary("prometheus"), f"--config.file={config}",
                   f"--storage.tsdb.path={folder / 'data'}",
                   f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
        super().__init__(folder, "prometheus", command, port)

    def api(self, path: str, **query: str) -> Any:
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(query)}")
        assert status == 200, body
        return json.loads(body)["data"]


@pytest.fixture
def services(
    vigil_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[str, GatewayProcess, Path]]:
    """A worker and a gateway, each serving /metrics: the worker's address, the gateway, and
    its vigil.yaml."""
    config = tmp_path / "vigil.yaml"
    config.write_text("tenants:\n  acme: {api_keys_env: ACME_KEYS}\n")
    worker_at = f"127.0.0.1:{free_port()}"
    env = {**vigil_env, "VIGIL_CONFIG": str(config), "ACME_KEYS": KEY,
           "VIGIL_WORKER_HTTP_ADDRESS": worker_at,
           "VIGIL_LAG_SAMPLE_SECONDS": "1"}  # fmt: skip
    settings = Settings.from_env(env)
    ensure_topics(settings)
    worker = WorkerProcess(settings, env)
    gateway = GatewayProcess(settings, free_port(), env, grpc_port=None)
    try:
        worker.start()
        gateway.start()
        yield worker_at, gateway, config
    finally:  # each stopped, whichever did not start or stop
        gateway_stopped, worker_stopped = gateway.stop(), worker.stop()
        assert worker_stopped == 0, worker.tail()
        assert gateway_stopped == 0, gateway.log_path.read_text()[-2000:]


def test_prometheus_scrapes_vigil_and_fires_its_rules(
    services: tuple[str, GatewayProcess, Path], tmp_path: Path, webhooks: Webhooks
) -> None:
    worker_at, gateway, config = services
    gateway_at = f"127.0.0.1:{gateway.port}"
    alertmanager = Alertmanager(tmp_path, f"{webhooks.url}/oncall")
    try:
        targets = {"vigil-worker": worker_at, "vigil-gateway": gateway_at}
        prometheus = Prometheus(tmp_path, targets, alertmanager)
    except BaseException:
        alertmanager.stop()
        raise
    try:

        def targets_up() -> bool:
            active = prometheus.api("targets")["activeTargets"]
            return len(active) == 2 and all(t["health"] == "up" for t in active)

        # a scrape that does not parse leaves its target down, saying why
        wait_until(targets_up, 60, "both targets scraped",
                   lambda: json.dumps(prometheus.api("targets"))[-2000:])  # fmt: skip

        def value(query: str) -> list[tuple[dict[str, str], float]]:
            found = prometheus.api("query", query=query)["result"]
            return [(r["metric"], float(r["value"][1])) for r in found]

        wait_until(lambda: value("vigil_worker_ready") != [], 30, "the worker's series")
        assert [v for _, v in value("vigil_worker_ready")] == [1.0]
        assert [v for _, v in value("vigil_gateway_busy_total")] == [0.0]

        export = urllib.request.Request(
            f"{gateway.url}/v1/traces", data=_three_spans(), method="POST",
            headers={"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {KEY}"},
        )  # fmt: skip
        with urllib.request.urlopen(export, timeout=30) as reply:
            assert reply.status == 200
        sent = 'vigil_gateway_spans_ignored_total{signal="traces"}'
        wait_until(
            lambda: [v for _, v in value(sent)] == [1.0],
            30,
            "the export scraped",
            lambda: json.dumps(value('{__name__=~"vigil_gateway_spans.*"}')),
        )
        wait_until(lambda: value("vigil_worker_consumer_lag") != [], 30, "a lag sample")
        board = json.loads(PROCESSES.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                # Grafana's $__rate_interval: four scrape intervals at least
                query = target["expr"].replace("$__rate_interval", "10s")
                value(query)  # answers (a query Prometheus refuses fails here)
                if panel["vigil"]["always_has_data"]:  # a rate, once two scrapes had it
                    wait_until(lambda q=query: value(q) != [], 15, f"{panel['title']}: {query}")

        config.write_text("tenants: [\n")  # a policy that does not read
        assert gateway.proc is not None
        os.kill(gateway.proc.pid, signal.SIGHUP)

        def alerts() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = prometheus.api("alerts")["alerts"]
            return found

        def refused_fires() -> bool:
            return any(a["labels"]["alertname"] == "VigilGatewayPolicyRefused"
                       and a["state"] == "firing" for a in alerts())  # fmt: skip

        wait_until(refused_fires, 60, "VigilGatewayPolicyRefused firing",
                   lambda: json.dumps(alerts()) + prometheus.said())  # fmt: skip
        fired = [a for a in alerts() if a["labels"]["alertname"] == "VigilGatewayPolicyRefused"]
        assert fired[0]["labels"] == {"alertname": "VigilGatewayPolicyRefused",
                                      "instance": gateway_at, "severity": "warning"}  # fmt: skip
        assert gateway_at in fired[0]["annotations"]["description"]
        # nothing else is wrong with this pipeline, and no rule failed to evaluate
        assert {a["labels"]["alertname"] for a in alerts()} == {"VigilGatewayPolicyRefused"}
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == 14 and all(r["health"] == "ok" for r in rules), rules

        # Alertmanager is sent it, and its receiver pages with it, grouped as it routes
        wait_until(lambda: webhooks.to("/oncall") != [], 60, "the alert delivered",
                   lambda: alertmanager.said() + prometheus.said())  # fmt: skip
        page = webhooks.to("/oncall")[0]
        assert (page["receiver"], page["status"]) == ("oncall", "firing")
        assert page["groupLabels"] == {"alertname": "VigilGatewayPolicyRefused",
                                       "instance": gateway_at}  # fmt: skip
        assert [a["labels"] for a in page["alerts"]] == [fired[0]["labels"]]
        assert gateway_at in page["alerts"][0]["annotations"]["description"]
    finally:
        prometheus.stop()
        alertmanager.stop()
