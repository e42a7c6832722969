"""The worker's own HTTP endpoint (``VIGIL_WORKER_HTTP_ADDRESS``), for an orchestrator's probes
and a Prometheus scraper:

    GET /healthz   200 while the worker's event loop answers within LOOP_DEADLINE_SECONDS
                   (or while it is still starting), 503 once it does not: a worker stuck in a
                   call that holds its loop is alive to the kernel and dead to its partitions
    GET /readyz    200 once its agents have started, 503 before (and when /healthz is 503)
    GET /metrics   what it has done since it started (the progress line's counts, and the
                   failed attempts it retried), the lag of its groups at the last sample (a
                   store worker samples every VIGIL_LAG_SAMPLE_SECONDS) and the latest time
                   they showed caught up, its alerts' webhook posts and what they still owe, the
                   samples its alert rules left out as late, whether it is ready, its resident
                   memory; only to the bearer of VIGIL_METRICS_TOKEN when
                   that is set

It runs on a thread of its own, not on the event loop it watches, and binds before the worker
starts, so an address in use is named at start. With a certificate (``VIGIL_WORKER_TLS_*``) it
serves HTTPS, so the metrics token does not cross the network in the clear.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.certs import ServedCertificate, expiry_family
from pipeline.progress import COUNTS, Progress
from pipeline.prometheus import SCRAPER_REFUSED, Sample, family, scraper_allowed

log = logging.getLogger("vigil.health")
# How long the event loop may take to run a no-op before /healthz says it is stuck
LOOP_DEADLINE_SECONDS = 5.0


class WorkerStatus:
    """What the endpoint reports, kept up by the worker: ``progress`` (its counts), ``retried``
    (failed attempts it retried, by what failed), ``loop`` (set when its agents start),
    ``lag`` (the rows of the last lag sample, LAG_COLUMNS), ``notified`` (the webhook
    posts by outcome, where the worker posts alerts) and ``owed`` (what each route still owes,
    where it sweeps).
    The loop is stuck once it takes ``loop_deadline`` seconds to run a no-op."""

    def __init__(
        self,
        progress: Progress,
        retried: Mapping[str, int] | None = None,
        loop_deadline: float = LOOP_DEADLINE_SECONDS,
    ) -> None:
        self.progress = progress
        self.retried = retried if retried is not None else {}
        self.loop_deadline = loop_deadline
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lag: Sequence[tuple[Any, ...]] = ()
        # the latest time before which the lag samples showed every event evaluated (``CaughtUp``)
        self.caught_up: datetime | None = None
        # alerts posted to webhooks and given up on (``Notifier``), where the worker posts them
        self.notified: Callable[[], Mapping[str, int]] | None = None
        # alerts each webhook route still owes, where this worker sweeps (``Notifier.sweep``)
        self.owed: Callable[[], Mapping[str, int]] | None = None
        # how often its Kafka producer was replaced (``RenewingProducer``)
        self.renewals: Callable[[], int] | None = None
        # drift samples and eval scores left out as late, by rule and tenant (``HeldAlerts``)
        self.late: Callable[[], Mapping[tuple[str, str], int]] | None = None
        # the certificate the endpoint serves, where it serves HTTPS, and when those its Kafka
        # clients loaded at start expire (``kafka_expiries``)
        self.certificate: ServedCertificate | None = None
        self.kafka_certificates: Mapping[str, datetime] = {}

    def loop_answers(self) -> bool | None:
        """Whether the event loop ran a no-op within ``loop_deadline`` seconds; None before it
        started."""
        loop = self.loop
        if loop is None:
            return None
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(self.loop_deadline)
        except (FutureTimeout, RuntimeError):  # RuntimeError: the loop is closed
            return False
        return True

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics``."""
        totals = self.progress.totals()
        counts: list[Sample] = [
            ({"count": name.replace(" ", "_")}, totals[name]) for name in COUNTS
        ]
        lag: list[Sample] = [
            ({"group": group, "topic": topic, "partition": str(partition)}, behind)
            for _, group, topic, partition, _, _, behind in self.lag
        ]
        out = [
            *family("vigil_worker_events_total", "counter",
                    "What the worker's stages did with events since it started, as its "
                    "progress line counts them.", counts),
            *family("vigil_worker_retries_total", "counter",
                    "Failed attempts the worker retried (ClickHouse inserts, Kafka publishes, "
                    "the alert state's rebuild), by what failed.",
                    [({"what": what}, n) for what, n in sorted(dict(self.retried).items())]),
            *family("vigil_worker_ready", "gauge", "1 once the worker's agents have started.",
                    [({}, int(self.loop is not None))]),
            *family("vigil_worker_consumer_lag", "gauge",
                    "Messages of each partition its groups have not committed, at the last "
                    "sample.", lag),
        ]  # fmt: skip
        if self.notified is not None:
            outcomes = self.notified()
            out += family("vigil_worker_alert_webhooks_total", "counter",
                          "Alerts posted to webhooks: delivered, failed (every attempt of a post; "
                          "posted again at the next sweep) or given up on (their delivery "
                          "window passed). They are stored either way.",
                          [({"outcome": k}, v) for k, v in outcomes.items()])  # fmt: skip
        owed = self.owed() if self.owed is not None else {}
        if owed:
            out += family("vigil_worker_alert_pages_owed", "gauge",
                          "Alerts each webhook route had not got at the last sweep (on the worker "
                          "that sweeps: the holder of clean partition 0).",
                          [({"route": route}, n) for route, n in sorted(owed.items())])  # fmt: skip
        if self.caught_up is not None:
            out += family("vigil_worker_caught_up_timestamp_seconds", "gauge",
                          "The latest time (Unix) before which the lag samples showed every "
                          "event sent evaluated: the clock quiet tenants' drift and eval windows "
                          "are judged by.", [({}, self.caught_up.timestamp())])  # fmt: skip
        if self.late is not None:
            out += family("vigil_worker_alert_samples_late_total", "counter",
                          "Drift samples and eval scores left out of their window because it had "
                          "been judged when they were stored (their tenant's other events, or the "
                          "pipeline's clock once caught up, more than alerts.window_grace ahead), "
                          "by rule and tenant.",
                          [({"rule": rule, "tenant": tenant}, n)
                           for (rule, tenant), n in sorted(self.late().items())])  # fmt: skip
        if self.renewals is not None:
            out += family("vigil_worker_kafka_producer_renewals_total", "counter",
                          "Times the worker's Kafka producer was replaced because it knew no "
                          "broker while a new client reached the cluster (librdkafka#5301).",
                          [({}, self.renewals())])  # fmt: skip
        out += expiry_family("vigil_worker", self.kafka_certificates, self.certificate)
        rss = _resident_bytes()
        if rss is not None:
            out += family("vigil_worker_resident_memory_bytes", "gauge",
                          "The worker process's resident memory.", [({}, rss)])  # fmt: skip
        return "\n".join(out) + "\n"


def _resident_bytes() -> int | None:
    """This process's resident set size, where /proc says it (Linux)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HealthServer:
    """``status`` served on ``address`` from a daemon thread. Binds at construction: raises
    OSError (the address is in use, or not this host's)."""

    def __init__(
        self,
        status: WorkerStatus,
        address: tuple[str, int],
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``token``: what a scraper of ``/metrics`` must show (``Authorization: Bearer``); the
        probes stay open to the orchestrator. ``tls``: serve HTTPS with it."""
        self._address = address
        self._scheme = "http" if tls is None else "https"
        self._server = _Server(address, status, token, tls)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="vigil-health", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._address
        return f"{self._scheme}://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health and metrics on %s (/healthz, /readyz, /metrics)", self.url)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        status: WorkerStatus,
        token: str | None,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.status = status
        self.token = token
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        if tls is not None:
            # the handshake on the connection's own thread (_Handler.setup), not in accept():
            # a client that connects and says nothing would hold every probe up
            self.socket = tls.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)  # fmt: skip

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (a client speaking plain HTTP to HTTPS, or one that went
        quiet): a line at DEBUG, not a traceback on stderr."""
        log.debug("connection from %s failed: %r", client_address[0], sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30  # seconds a connection may stay silent, its handshake included

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a probe every few seconds is not news

    def do_GET(self) -> None:
        status = self.server.status
        if self.path == "/metrics":
            if scraper_allowed(self.headers.get("Authorization"), self.server.token):
                self._reply(200, status.metrics(), "text/plain; version=0.0.4")
            else:
                self._reply(401, SCRAPER_REFUSED)
            return
        if self.path not in ("/healthz", "/readyz"):
            self._reply(404, "not found: /healthz, /readyz, /metrics\n")
            return
        answers = status.loop_answers()
        if answers is False:
            self._reply(503, f"the event loop did not answer within {status.loop_deadline:g}s\n")
        elif answers:
            self._reply(200, "ok\n" if self.path == "/healthz" else "ready\n")
        else:  # starting: alive, not ready
            self._reply(200 if self.path == "/healthz" else 503, "starting\n")

    def _reply(self, code: int, text: str, content_type: str = "text/plain") -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
