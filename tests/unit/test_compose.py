"""docker-compose.yml: accepted by `docker compose config` where a Docker client is present, and
shaped as the production stack needs (every long-running service health-checked, data on
named volumes, secrets only from the environment)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
MAKEFILE = ROOT / "Makefile"
ENV = {
    "VIGIL_CLICKHOUSE_PASSWORD": "test-password",
    "VIGIL_CLICKHOUSE_WORKER_PASSWORD": "test-worker",
    "VIGIL_CLICKHOUSE_GRAFANA_PASSWORD": "test-grafana",
    "VIGIL_GRAFANA_ADMIN_PASSWORD": "test-admin",
}


def _compose_command() -> list[str] | None:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(shutil.which("docker") is None, reason="no Docker client on this machine")
def test_docker_compose_config_accepts_the_file() -> None:
    command = _compose_command()
    assert command, "the Docker client is here but no compose: `make test` installs docker-compose"
    run = subprocess.run(
        [*command, "-f", str(COMPOSE), "config"], capture_output=True, text=True,
        env={**os.environ, **ENV}, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    resolved = yaml.safe_load(run.stdout)
    services = resolved["services"]
    assert set(services) == {"kafka", "clickhouse", "migrate", "worker", "gateway", "grafana",
                             "prometheus", "alertmanager"}  # fmt: skip
    # only migrate is the administrator; the worker and Grafana log in as the users it makes
    dsn = {name: s["environment"].get("VIGIL_CLICKHOUSE_DSN", "") for name, s in services.items()
           if name in ("migrate", "worker", "gateway")}  # fmt: skip
    assert dsn == {
        "migrate": "http://vigil_admin:test-password@clickhouse:8123",
        "worker": "http://vigil_worker:test-worker@clickhouse:8123",
        "gateway": "",
    }
    assert services["migrate"]["environment"]["VIGIL_CLICKHOUSE_WORKER_PASSWORD"] == "test-worker"
    grafana = services["grafana"]["environment"]
    assert (grafana["VIGIL_GRAFANA_CH_USER"], grafana["VIGIL_GRAFANA_CH_PASSWORD"]) == (
        "vigil_grafana",
        services["migrate"]["environment"]["VIGIL_CLICKHOUSE_GRAFANA_PASSWORD"],
    )
    # without the secrets it refuses to start rather than run with empty passwords
    bare = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    refused = subprocess.run([*command, "-f", str(COMPOSE), "config"], capture_output=True,
                             text=True, env=bare, cwd=ROOT, timeout=60)  # fmt: skip
    assert refused.returncode != 0 and "VIGIL_CLICKHOUSE_PASSWORD" in refused.stderr


def test_the_stack_is_shaped_for_production() -> None:
    stack = yaml.safe_load(COMPOSE.read_text())
    services = stack["services"]
    for name in ("kafka", "clickhouse", "worker", "gateway", "grafana", "prometheus",
                 "alertmanager"):  # fmt: skip
        assert "healthcheck" in services[name], name
    assert services["migrate"]["command"] == ["migrate"]
    # at INFO, `docker compose logs worker` shows its progress line
    assert services["worker"]["command"] == ["worker", "--loglevel", "INFO"]
    assert (
        services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    )
    # both OTLP ports published, and served: the command is one `vigil gateway` takes
    gateway = build_parser().parse_args(services["gateway"]["command"])
    assert (gateway.host, gateway.port, gateway.grpc_port, gateway.no_grpc) == (
        "0.0.0.0",
        4318,
        4317,
        False,
    )
    assert set(services["gateway"]["ports"]) == {"4318:4318", "4317:4317"}
    assert set(stack["volumes"]) == {"kafka-data", "clickhouse-data", "grafana-data",
                                     "prometheus-data", "alertmanager-data"}  # fmt: skip
    assert (
        "grafana-clickhouse-datasource" in services["grafana"]["environment"]["GF_INSTALL_PLUGINS"]
    )
    mounted = " ".join(services["grafana"]["volumes"])
    for part in ("provisioning/datasources", "provisioning/dashboards", "provisioning/alerting"):
        assert part in mounted

    def secrets(env: dict[str, str]) -> list[str]:
        return [v for k, v in env.items() if "PASSWORD" in k or k.endswith("_KEY")]

    values = secrets(stack["x-vigil-env"]) + secrets(services["clickhouse"]["environment"])
    values += secrets(services["grafana"]["environment"])
    values += secrets(services["migrate"]["environment"])
    assert values and all(str(v).startswith("${") for v in values), values  # all from the env


def test_prometheus_scrapes_the_stacks_worker_and_gateway_with_vigils_rules_and_alerts() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    prometheus = services["prometheus"]
    folder, mounted = prometheus["volumes"][0].split(":")[:2]
    assert (ROOT / folder).resolve() == ROOT / "dashboards" / "prometheus"
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if "config.file" in a)
    config = yaml.safe_load((ROOT / folder / Path(config_file).relative_to(mounted)).read_text())
    assert config["rule_files"] == ["vigil-rules.yaml"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"]
               for job in config["scrape_configs"]}  # fmt: skip
    # where the stack's worker serves /metrics, and the gateway's OTLP/HTTP port (its /metrics)
    worker_port = services["worker"]["environment"]["VIGIL_WORKER_HTTP_ADDRESS"].split(":")[1]
    gateway = build_parser().parse_args(services["gateway"]["command"])
    assert targets == {"vigil-worker": [f"worker:{worker_port}"],
                       "vigil-gateway": [f"gateway:{gateway.port}"]}  # fmt: skip
    # Grafana's datasource for the processes dashboard is this Prometheus
    url = services["grafana"]["environment"]["VIGIL_GRAFANA_PROMETHEUS_URL"]
    assert url == f"http://prometheus:{prometheus['ports'][0].split(':')[1]}"
    # what fires goes to the stack's Alertmanager, which reads alertmanager.yml beside the rules
    alertmanager = services["alertmanager"]
    sent_to = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert sent_to == [f"alertmanager:{alertmanager['ports'][0].split(':')[1]}"]
    folder, mounted = alertmanager["volumes"][0].split(":")[:2]
    config_file = next(a.split("=", 1)[1] for a in alertmanager["command"] if "config.file" in a)
    read = (ROOT / folder / Path(config_file).relative_to(mounted)).resolve()
    assert read == ROOT / "dashboards" / "prometheus" / "alertmanager.yml" and read.exists()
    # the image is the version `make test` builds its tests' Alertmanager from
    version = re.search(r"^ALERTMANAGER_VERSION = (\S+)$", MAKEFILE.read_text(), re.M)
    assert version is not None and alertmanager["image"] == f"prom/alertmanager:{version[1]}"
