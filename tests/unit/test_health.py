"""The worker's HTTP endpoint (``pipeline.health``): probes that follow its event loop, and
metrics that follow its counts and lag."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from pipeline.health import HealthServer, WorkerStatus
from pipeline.progress import Progress
from pipeline.services import free_port
from pipeline.settings import ConfigError, Settings
from tests.conftest import http_get as _get


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running on a thread of its own, as the worker's runs Faust."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_probes_follow_the_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    status = WorkerStatus(Progress(), loop_deadline=0.5)
    server = HealthServer(status, ("127.0.0.1", free_port())).start()
    try:
        url = server.url
        assert _get(f"{url}/healthz") == (200, "starting\n")  # alive while it starts
        assert _get(f"{url}/readyz") == (503, "starting\n")
        status.loop = loop  # the agents started
        assert _get(f"{url}/healthz") == (200, "ok\n")
        assert _get(f"{url}/readyz") == (200, "ready\n")
        loop.call_soon_threadsafe(time.sleep, 2)  # a call that holds the loop
        time.sleep(0.1)
        stuck = (503, "the event loop did not answer within 0.5s\n")
        assert _get(f"{url}/healthz") == stuck and _get(f"{url}/readyz") == stuck
        time.sleep(2)
        assert _get(f"{url}/healthz") == (200, "ok\n")  # it answers again
        assert _get(f"{url}/nothing")[0] == 404
    finally:
        server.close()


def test_metrics_only_to_the_bearer_of_the_token_when_one_is_set() -> None:
    status = WorkerStatus(Progress())
    server = HealthServer(status, ("127.0.0.1", free_port()), token="scrape-s3cret").start()
    try:
        url = f"{server.url}/metrics"
        said = "/metrics: send Authorization: Bearer <VIGIL_METRICS_TOKEN>\n"
        assert _get(url) == (401, said)
        assert _get(url, {"Authorization": "Bearer wrong"}) == (401, said)
        assert _get(url, {"Authorization": "Basic scrape-s3cret"})[0] == 401
        status_code, text = _get(url, {"Authorization": "Bearer scrape-s3cret"})
        assert status_code == 200 and "vigil_worker_ready 0" in text
        assert _get(f"{server.url}/healthz") == (200, "starting\n")  # the probes stay open
    finally:
        server.close()
    assert "scrape-s3cret" not in repr(Settings.from_env({"VIGIL_METRICS_TOKEN": "scrape-s3cret"}))


def test_metrics_follow_the_counts_and_the_last_lag_sample() -> None:
    progress = Progress()
    status = WorkerStatus(progress, {"insert": 3, "publish": 0})
    progress.add({"validated": 7, "clean": 5, "to the DLQ": 2, "stored": 5})
    now = datetime.now(UTC)
    status.lag = [(now, "g", "vigil.events.clean", 0, 10, 13, 3),
                  (now, "g-validate", "vigil.events.raw", 1, 4, 4, 0)]  # fmt: skip
    assert "vigil_worker_alert_webhooks_total" not in status.metrics()  # validate: no notifier
    status.notified = lambda: {"delivered": 4, "failed": 1, "given_up": 0}
    status.owed = lambda: {}  # a worker that does not sweep says nothing of it
    assert "vigil_worker_alert_pages_owed" not in status.metrics()
    status.owed = lambda: {"oncall": 2, "webhook-0123456789ab": 0}
    text = status.metrics()
    for line in (
        "# TYPE vigil_worker_events_total counter",
        'vigil_worker_events_total{count="validated"} 7',
        'vigil_worker_events_total{count="to_the_DLQ"} 2',
        'vigil_worker_events_total{count="stored"} 5',
        'vigil_worker_events_total{count="dead_letters_stored"} 0',
        "vigil_worker_ready 0",
        'vigil_worker_alert_webhooks_total{outcome="delivered"} 4',
        'vigil_worker_alert_webhooks_total{outcome="failed"} 1',
        'vigil_worker_alert_webhooks_total{outcome="given_up"} 0',
        'vigil_worker_alert_pages_owed{route="oncall"} 2',
        'vigil_worker_alert_pages_owed{route="webhook-0123456789ab"} 0',
        'vigil_worker_retries_total{what="insert"} 3',
        'vigil_worker_retries_total{what="publish"} 0',
        'vigil_worker_consumer_lag{group="g",topic="vigil.events.clean",partition="0"} 3',
        'vigil_worker_consumer_lag{group="g-validate",topic="vigil.events.raw",partition="1"} 0',
    ):
        assert line in text.splitlines(), line
    resident = next(line for line in text.splitlines() if line.startswith("vigil_worker_res"))
    assert int(resident.split()[1]) > 10_000_000  # this test process's, tens of MB


def test_an_address_is_host_and_port() -> None:
    assert Settings.from_env({}).worker_http is None
    env = {"VIGIL_WORKER_HTTP_ADDRESS": "0.0.0.0:9464"}
    assert Settings.from_env(env).worker_http == ("0.0.0.0", 9464)
    assert Settings.from_env({"VIGIL_WORKER_HTTP_ADDRESS": "[::1]:80"}).worker_http == ("::1", 80)
    for bad in ("9464", "host:", ":9464", "host:http", "host:70000"):
        with pytest.raises(ConfigError, match="VIGIL_WORKER_HTTP_ADDRESS: expected host:port"):
            Settings.from_env({"VIGIL_WORKER_HTTP_ADDRESS": bad})
