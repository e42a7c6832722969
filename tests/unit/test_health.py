"""The worker's HTTP endpoint (``pipeline.health``): probes that follow its event loop, and
metrics that follow its counts and lag."""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.certs import ServedCertificate, expiries
from pipeline.health import HealthServer, WorkerStatus
from pipeline.progress import Progress
from pipeline.prometheus import scraper_allowed
from pipeline.services import free_port
from pipeline.settings import ConfigError, ServerTLS, Settings
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


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    """A self-signed certificate for 127.0.0.1 and its key."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=folder, check=True, capture_output=True)  # fmt: skip
    return ServerTLS(folder / "cert.pem", folder / "key.pem")


def test_with_a_certificate_it_serves_https_and_a_silent_client_holds_nothing_up(
    certificate: ServerTLS, loop: asyncio.AbstractEventLoop, capsys: pytest.CaptureFixture[str]
) -> None:
    status = WorkerStatus(Progress())
    status.loop = loop
    port = free_port()
    server = HealthServer(status, ("127.0.0.1", port), token="scrape-s3cret",
                          tls=certificate.context()).start()  # fmt: skip
    trusted = ssl.create_default_context(cafile=certificate.cert)
    try:
        assert server.url == f"https://127.0.0.1:{port}"
        # a client that connects and never begins its handshake
        with socket.create_connection(("127.0.0.1", port)):
            assert _get(f"{server.url}/healthz", context=trusted) == (200, "ok\n")
            scraped = _get(f"{server.url}/metrics", {"Authorization": "Bearer scrape-s3cret"},
                           context=trusted)  # fmt: skip
            assert scraped[0] == 200 and "vigil_worker_ready 1" in scraped[1]
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
            _get(f"http://127.0.0.1:{port}/healthz")  # plain HTTP gets no answer
        with pytest.raises(urllib.error.URLError) as untrusted:
            _get(f"{server.url}/healthz", context=ssl.create_default_context())
        assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
        assert _get(f"{server.url}/readyz", context=trusted) == (200, "ready\n")
    finally:
        server.close()
    assert "Traceback" not in capsys.readouterr().err  # failed connections are no news


def test_the_worker_endpoints_certificate_is_read_at_start(certificate: ServerTLS) -> None:
    env = {"VIGIL_WORKER_TLS_CERT_LOCATION": str(certificate.cert),
           "VIGIL_WORKER_TLS_KEY_LOCATION": str(certificate.key)}  # fmt: skip
    assert Settings.from_env(env).worker_tls == certificate
    assert Settings.from_env({}).worker_tls is None
    with pytest.raises(ConfigError, match="VIGIL_WORKER_TLS_CERT_LOCATION is set without its"):
        Settings.from_env({"VIGIL_WORKER_TLS_CERT_LOCATION": str(certificate.cert)})
    with pytest.raises(ConfigError, match=r"VIGIL_WORKER_TLS_KEY_LOCATION .*: not a PEM"):
        Settings.from_env({**env, "VIGIL_WORKER_TLS_KEY_LOCATION": str(certificate.cert)})


def _made(folder: Path, name: str, days: int, key_of: Path | None = None) -> Path:
    """A folder ``name`` holding tls.crt (CN=``name``, valid ``days``) and tls.key, as a mounted
    Kubernetes secret holds them; given ``key_of``, tls.key is that folder's key instead."""
    made = folder / name
    made.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    "tls.key", "-out", "tls.crt", "-days", str(days), "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=made, check=True, capture_output=True)  # fmt: skip
    if key_of is not None:
        (made / "tls.key").write_bytes((key_of / "tls.key").read_bytes())
    return made


def _mounted(live: Path, folder: Path) -> None:
    """Point link ``live`` at ``folder`` at once, as Kubernetes swaps a secret's files."""
    swap = live.with_name("swap")
    swap.symlink_to(folder)
    os.replace(swap, live)


def _presented(port: int) -> str:
    """The common name of the certificate a server on 127.0.0.1:``port`` presents."""
    trusting = ssl.create_default_context()
    trusting.check_hostname, trusting.verify_mode = False, ssl.CERT_NONE
    with trusting.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    text = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject"],
                          input=der, check=True, capture_output=True).stdout.decode()  # fmt: skip
    return text.strip().rpartition("=")[2].strip()


def test_a_renewed_certificate_is_served_from_the_next_connection_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """cert-manager renews a mounted secret's files in place: the endpoint presents the new
    certificate once it has looked at them again (at most every second, as a client connects)
    and /metrics says when it expires. Files that do not load together (a key of another
    certificate, as between certbot's swap of one and of the other) leave the one served as
    it is, said once they have stayed so 10 s; fixed, they are served."""
    old, new = _made(tmp_path, "old", 1), _made(tmp_path, "new", 90)
    mismatched = _made(tmp_path, "mismatched", 90, key_of=old)
    fixed = _made(tmp_path, "fixed", 60)
    live = tmp_path / "live"
    live.symlink_to(old)
    now = [0.0]
    served = ServedCertificate(ServerTLS(live / "tls.crt", live / "tls.key"),
                               "VIGIL_WORKER_TLS_CERT_LOCATION", clock=lambda: now[0])  # fmt: skip
    status = WorkerStatus(Progress())
    status.certificate = served
    port = free_port()
    server = HealthServer(status, ("127.0.0.1", port), tls=served.context()).start()
    trusting = ssl.create_default_context(cafile=old / "tls.crt")
    trusting.load_verify_locations(new / "tls.crt")

    def expiry() -> float:
        text = _get(f"{server.url}/metrics", context=trusting)[1]
        name = 'vigil_worker_certificate_expiry_timestamp_seconds{variable="VIGIL_WORKER_TLS_'
        found = re.search(rf"^{re.escape(name)}CERT_LOCATION\"}} (\S+)$", text, re.M)
        assert found, text
        return float(found[1])

    try:
        assert _presented(port) == "old"
        assert expiry() == min(expiries(old / "tls.crt")).timestamp()
        _mounted(live, new)
        assert _presented(port) == "old"  # looked at no more than once a second
        now[0] += 1.5
        with caplog.at_level(logging.INFO, "vigil.certs"):
            assert _presented(port) == "new"
            assert expiry() == min(expiries(new / "tls.crt")).timestamp()
            assert _get(f"{server.url}/healthz", context=trusting)[0] == 200
            until = f"{min(expiries(new / 'tls.crt')):%Y-%m-%d %H:%M} UTC"
            was = f"{min(expiries(old / 'tls.crt')):%Y-%m-%d %H:%M} UTC"
            said = f"serving the renewed certificate {live / 'tls.crt'}, until {until}"
            assert [r.getMessage() for r in caplog.records] == [
                f"VIGIL_WORKER_TLS_CERT_LOCATION: {said}; the one before until {was}"
            ]
            caplog.clear()

            _mounted(live, mismatched)
            for step in (1.5, 1.5, 10.0, 1.5):
                now[0] += step
                assert _presented(port) == "new"
            said = (
                f"{live / 'tls.crt'} and {live / 'tls.key'} changed but do not load (key values "
                f"mismatch): still serving the certificate loaded before, until {until}"
            )
            assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
                (logging.ERROR, f"VIGIL_WORKER_TLS_CERT_LOCATION: {said}")  # once, after 10 s
            ]
            _mounted(live, fixed)
            now[0] += 1.5
            assert _presented(port) == "fixed"
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
        # a character past ASCII made compare_digest raise: the connection dropped, no answer
        assert _get(url, {"Authorization": "Bearer scrap\u00e9-s3cret"}) == (401, said)
        status_code, text = _get(url, {"Authorization": "Bearer scrape-s3cret"})
        assert status_code == 200 and "vigil_worker_ready 0" in text
        assert _get(f"{server.url}/healthz") == (200, "starting\n")  # the probes stay open
    finally:
        server.close()
    assert "scrape-s3cret" not in repr(Settings.from_env({"VIGIL_METRICS_TOKEN": "scrape-s3cret"}))


def test_a_token_or_header_past_ascii_is_compared_not_raised() -> None:
    assert scraper_allowed("Bearer t\u00f6ken", "t\u00f6ken")
    assert not scraper_allowed("Bearer t\u00f6ken", "token")
    assert not scraper_allowed("Bearer token", "t\u00f6ken")
    assert not scraper_allowed("Bearer \udce9", "token")  # a byte no UTF-8, as a surrogate


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
    status.renewals = lambda: 2
    status.late = lambda: {("eval", "acme"): 5, ("drift", "globex"): 1}
    assert "vigil_worker_caught_up_timestamp_seconds" not in status.metrics()  # none found yet
    status.caught_up = datetime(2026, 12, 7, tzinfo=UTC)
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
        "vigil_worker_kafka_producer_renewals_total 2",
        "# TYPE vigil_worker_caught_up_timestamp_seconds gauge",
        "vigil_worker_caught_up_timestamp_seconds 1796601600.0",
        "# TYPE vigil_worker_alert_samples_late_total counter",
        'vigil_worker_alert_samples_late_total{rule="eval",tenant="acme"} 5',
        'vigil_worker_alert_samples_late_total{rule="drift",tenant="globex"} 1',
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
