"""``vigil gateway``: an OTLP receiver, so any OpenTelemetry SDK or Collector can send.

    POST /v1/traces, /v1/logs   protobuf or JSON, gzip or not  ->  vigil.events.raw
    GET  /healthz, /readyz, /metrics
    OTLP/gRPC's Export calls, on a port of their own (``pipeline.otlp_grpc``)

The tenant comes from the API key, never from the payload; a payload that claims another
tenant is stored under the key's tenant, the claim kept in ``attributes["vigil.claimed_tenant"]``.
Spans and log events go through the same mapping as the exporter (``pipeline.otel_mapping``)
and the same checks as the worker; what fails them is answered as OTLP ``partial_success`` and
kept in the DLQ with its reason. A 200 is sent only once every accepted event is acknowledged
by the broker (acks=all, idempotent producer), so nothing answered with 200 is lost; when the
broker is down or the queue full the answer is 503 or 429 with Retry-After, and the client's
retry is harmless because event ids are derived from trace and span ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from pipeline.acls import prepare as prepare_kafka
from pipeline.certs import ServedCertificate, expiry_family, kafka_expiries, say_expiring
from pipeline.check import sizes_at_start
from pipeline.codec import DEAD_LETTER_SCHEMA, Registry
from pipeline.config import Config, key_digest, load_config
from pipeline.dlq import MAX_KEPT_PAYLOAD, dead_letter, kept_payload
from pipeline.events import Event, InvalidEvent
from pipeline.otel_mapping import LogView, SpanView, log_to_event, span_to_event
from pipeline.otlp import (
    OtlpError,
    logs_from_json,
    logs_from_protobuf,
    response,
    spans_from_json,
    spans_from_protobuf,
)
from pipeline.producer import KafkaSender, Unavailable
from pipeline.prometheus import SCRAPER_REFUSED, Sample, family, lines, scraper_allowed
from pipeline.ratelimit import TokenBuckets, retry_after
from pipeline.rows import Origin
from pipeline.settings import ConfigError, Settings
from pipeline.topics import batch_bytes, event_bytes, message_bytes_again
from pipeline.validate import check_event

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("vigil.gateway")
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# the Content-Encodings aiohttp undoes as it reads (zstd through backports.zstd, which
# clickhouse-connect brings); any other reached the handler still encoded, and was answered
# "not protobuf" (a Collector set to snappy or lz4 was told its data was malformed)
ENCODINGS = ("gzip", "deflate", "zstd", "identity")
# what OTLP metrics are answered (404 over HTTP, UNIMPLEMENTED over gRPC): auto-instrumentation
# (opentelemetry-instrument) exports metrics by default wherever OTEL_EXPORTER_OTLP_ENDPOINT points
NO_METRICS = (
    "Vigil's gateway takes OTLP traces and logs, not metrics: set OTEL_METRICS_EXPORTER=none, "
    "or OTEL_EXPORTER_OTLP_METRICS_ENDPOINT to a collector that keeps them"
)
RETRY_QUEUE_FULL = "1"
RETRY_BROKER_DOWN = "5"
RETRY_BUSY = "1"
# how long a request waits for room among the bytes held (``Held``) before it is answered 503
# (retry in a second), its body not yet read: held back meanwhile by TCP's or HTTP/2's flow
# control, in the client. The requests held are answered as the broker takes them, so room
# mostly comes within it; in a long burst, a request is told to come back instead
ROOM_WAIT = 1.0


@dataclass
class Metrics:
    requests: Counter[tuple[str, int]]
    accepted: Counter[str]
    rejected: Counter[tuple[str, str]]
    buckets: list[int]
    limited: Counter[str]  # requests refused by tenant, over its rate limit
    by_tenant: Counter[str]  # spans and records taken (valid or not) by tenant
    latency_sum: float = 0.0
    latency_count: int = 0
    # SIGHUP's readings of vigil.yaml by outcome (read, refused), and when the policy served was
    # read (Unix time: at start, or the last reading)
    policy_reads: Counter[str] = field(default_factory=Counter)
    policy_read_at: float = field(default_factory=time.time)
    # spans that are not GenAI and log records of other events, by signal: not Vigil's to keep
    ignored: Counter[str] = field(default_factory=Counter)
    busy: int = 0  # requests refused (503) because the requests held were at their limit

    @classmethod
    def empty(cls) -> Metrics:
        return cls(Counter(), Counter(), Counter(), [0] * len(LATENCY_BUCKETS), Counter(),
                   Counter())  # fmt: skip

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] += 1
        self.latency_sum += seconds
        self.latency_count += 1
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1

    def text(
        self,
        queue_depth: int,
        tenants: bool = True,
        renewals: int = 0,
        certificates: Sequence[str] = (),
        held: int = 0,
        waiting: int = 0,
    ) -> str:
        """Prometheus text exposition format; without the series labelled by tenant unless
        ``tenants`` (they name the gateway's tenants to whoever reads them). ``renewals``: how
        often the producer was replaced (``RenewingProducer``); ``certificates``: the lines of
        ``certs.expiry_family``; ``held``: the bytes of requests held now (``Held``), ``waiting``:
        the requests waiting for room among them."""
        latency = [({"le": str(b)}, n) for b, n in zip(LATENCY_BUCKETS, self.buckets, strict=True)]
        latency.append(({"le": "+Inf"}, self.latency_count))
        rejected = [({"signal": s, "reason": r}, n) for (s, r), n in sorted(self.rejected.items())]
        requests = [({"path": p, "code": str(c)}, n) for (p, c), n in sorted(self.requests.items())]
        out = [
            *_family("requests_total", "counter", "OTLP requests by path and HTTP status.",
                     requests),
            *_family("spans_accepted_total", "counter", "Spans and log events published.",
                     [({"signal": s}, n) for s, n in sorted(self.accepted.items())]),
            *_family("spans_rejected_total", "counter", "Spans and log events rejected, by reason.",
                     rejected),
            *_family("spans_ignored_total", "counter",
                     "Spans that are not GenAI and log records of other events, answered and "
                     "not kept (not Vigil's to keep).",
                     [({"signal": s}, self.ignored[s]) for s in ("traces", "logs")]),
            *(_family("tenant_events_total", "counter",
                      "Spans and log events taken (published, or kept in the DLQ), by tenant: "
                      "what its rate_limit is measured against.",
                      [({"tenant": t}, n) for t, n in sorted(self.by_tenant.items())])
              + _family("rate_limited_total", "counter",
                        "Requests refused (429) because their tenant is over its rate limit.",
                        [({"tenant": t}, n) for t, n in sorted(self.limited.items())])
              if tenants else []),
            *_family("request_seconds", "histogram", "Time to answer an export request.", []),
            *lines("vigil_gateway_request_seconds_bucket", latency),
            f"vigil_gateway_request_seconds_sum {self.latency_sum:.6f}",
            f"vigil_gateway_request_seconds_count {self.latency_count}",
            *_family("producer_queue_depth", "gauge", "Messages waiting for the broker.",
                     [({}, queue_depth)]),
            *_family("request_bytes_held", "gauge",
                     "Bytes of export requests held now, from a body's first byte to its "
                     "answer (at most VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT).", [({}, held)]),
            *_family("requests_waiting", "gauge",
                     "Requests waiting for room among the bytes held, their bodies not yet read "
                     "(a gRPC call needs room for VIGIL_GATEWAY_MAX_BYTES).", [({}, waiting)]),
            *_family("busy_total", "counter",
                     "Requests refused (503, UNAVAILABLE over gRPC) because the requests held "
                     "were at VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT.", [({}, self.busy)]),
            *_family("producer_renewals_total", "counter",
                     "Times the producer was replaced because it knew no broker while a new "
                     "client reached the cluster (librdkafka#5301).", [({}, renewals)]),
            *_family("policy_reads_total", "counter",
                     "Times SIGHUP read vigil.yaml again: read (answered by from then on) or "
                     "refused (it did not read: the policy before kept, the error logged).",
                     [({"outcome": k}, self.policy_reads[k]) for k in ("read", "refused")]),
            *_family("policy_read_timestamp_seconds", "gauge",
                     "When the policy the gateway answers by was read (Unix time): at its start, "
                     "or by the last SIGHUP that read it.", [({}, self.policy_read_at)]),
            *certificates,
        ]  # fmt: skip
        return "\n".join(out) + "\n"


def _family(name: str, kind: str, help_text: str, samples: Sequence[Sample]) -> list[str]:
    return family(f"vigil_gateway_{name}", kind, help_text, samples)


@dataclass(frozen=True)
class Answer:
    """What an export request is answered, as an HTTP status; the gRPC receiver says the same
    in gRPC's codes (``pipeline.otlp_grpc``). ``retry_after``: seconds, for a 429 or 503;
    ``rejected``: how many of a 200's records went to the DLQ, ``message`` saying why."""

    status: int
    message: str = ""
    retry_after: str | None = None
    rejected: int = 0


def _error(status: int, message: str, retry_after: str | None = None) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after else None
    body = json.dumps({"code": status, "message": message})
    return web.Response(status=status, text=body, content_type=JSON, headers=headers)


def _reply(answer: Answer) -> web.Response:
    return _error(answer.status, answer.message, answer.retry_after)


class Held:
    """The bytes of export requests a gateway holds at once, at most ``limit``
    (``VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT``): each request's from the first byte of its body
    read (a gRPC call's from before its message is read, room for the largest) until it is
    answered, as what it decodes to is held that long.
    Without a bound, a burst of clients (every SDK flushing its queue once a gateway is back)
    had the gateway read all their bodies at once, each up to VIGIL_GATEWAY_MAX_BYTES and
    several times that decoded: its memory grew with the clients (docs/benchmarks.md, "A burst
    of large exports"). ``waiting``: requests waiting for room (``Share.take_waiting``), each
    for ``ROOM_WAIT`` at most. Called on the event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.now = 0
        self.waiting = 0
        self._freed = asyncio.Event()  # set, and replaced, each time bytes are given back

    @contextlib.contextmanager
    def request(self) -> Iterator[Share]:
        """A request's share (``Share``); everything it took is given back at the end."""
        share = Share(self)
        try:
            yield share
        finally:
            share.keep(0)

    def give_back(self, size: int) -> None:
        self.now -= size
        if size:
            self._freed.set()  # whoever waits looks again
            self._freed = asyncio.Event()

    async def freed(self) -> None:
        """Until some request gives bytes back."""
        await self._freed.wait()


class Share:
    """One request's bytes in ``Held``."""

    def __init__(self, held: Held) -> None:
        self.held = held
        self.taken = 0

    def take(self, size: int) -> bool:
        """``size`` bytes more, or False (nothing taken) if they would go over the limit."""
        held = self.held
        if held.now + size > held.limit:
            return False
        held.now += size
        self.taken += size
        return True

    async def take_waiting(self, size: int, seconds: float) -> bool:
        """``take(size)``, waiting up to ``seconds`` for other requests to give back enough."""
        if self.take(size):  # most requests: room at once, nothing to wait for
            return True
        held = self.held
        held.waiting += 1
        try:
            async with asyncio.timeout(seconds):
                while not self.take(size):
                    await held.freed()
        except TimeoutError:
            return False
        finally:
            held.waiting -= 1
        return True

    def keep(self, size: int) -> None:
        """Give back what was taken beyond ``size`` bytes."""
        if self.taken > size:
            self.held.give_back(self.taken - size)
            self.taken = size


def _describe(view: SpanView | LogView) -> bytes:
    """What a rejected span or log record looked like, for its dead letter (scrubbed there)."""
    return json.dumps(asdict(view), default=str, sort_keys=True).encode()


class Gateway:
    def __init__(
        self,
        settings: Settings,
        config: Config,
        registry: Registry,
        sender: KafkaSender,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """Events up to the payload limit, and dead letters of MAX_KEPT_PAYLOAD, until ``sized``
        says what the topics take."""
        self.settings = settings
        self.max_event_bytes = settings.limits.max_payload_bytes
        self.keep = MAX_KEPT_PAYLOAD
        self.config = config
        self.registry = registry
        self.sender = sender
        self.metrics = Metrics.empty()
        self.certificate: ServedCertificate | None = None  # what it serves over TLS, if it does
        # when the certificates its Kafka producer loaded at start expire (``kafka_expiries``)
        self.kafka_certificates: Mapping[str, datetime] = {}
        self.limiter = TokenBuckets(config.rate_limits)
        self._clock = clock
        self._header = settings.gateway.key_header
        self._max = settings.gateway.max_request_bytes
        self.held = Held(settings.gateway.max_bytes_in_flight)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max + 1)
        app.router.add_post("/v1/traces", self.traces)
        app.router.add_post("/v1/logs", self.logs)
        app.router.add_post("/v1/metrics", self.no_metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    # --- probes ----------------------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _request: web.Request) -> web.Response:
        if await self.kafka_answers():
            return web.Response(text="ready\n")
        topic = self.settings.topics.raw
        return _error(503, f"Kafka at {self.settings.bootstrap} does not answer for {topic}")

    async def kafka_answers(self) -> bool:
        """Whether the broker answers for the raw topic now (/readyz, gRPC's health check)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.sender.probe, self.settings.topics.raw, 2.0)

    async def metrics_page(self, request: web.Request) -> web.Response:
        """The metrics; with VIGIL_METRICS_TOKEN set, only to its bearer, and then with the
        series that name tenants (the gateway's port is its clients', each a tenant)."""
        token = self.settings.metrics_token
        if not scraper_allowed(request.headers.get("Authorization"), token):
            return web.Response(status=401, text=SCRAPER_REFUSED,
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        certificates = expiry_family("vigil_gateway", self.kafka_certificates, self.certificate)
        text = self.metrics.text(
            self.sender.queue_depth,
            tenants=token is not None,
            renewals=self.sender.renewed,
            certificates=certificates,
            held=self.held.now,
            waiting=self.held.waiting,
        )
        return web.Response(text=text, content_type="text/plain")

    # --- export ----------------------------------------------------------------------

    async def traces(self, request: web.Request) -> web.Response:
        return await self._timed(request, "traces")

    async def logs(self, request: web.Request) -> web.Response:
        return await self._timed(request, "logs")

    async def no_metrics(self, request: web.Request) -> web.Response:
        """OTLP metrics, which Vigil does not keep: 404, as a collector without a metrics
        pipeline answers, saying what to do in the error the SDK logs at each export."""
        self.metrics.requests[(request.path, 404)] += 1  # not an export: not in its latency
        return _error(404, NO_METRICS)

    async def _timed(self, request: web.Request, signal: str) -> web.Response:
        started = time.perf_counter()
        reply = await self._export(request, signal)
        self.metrics.observe(request.path, reply.status, time.perf_counter() - started)
        return reply

    def busy(self) -> Answer:
        """The answer to a request that the requests held leave no room for."""
        self.metrics.busy += 1
        limit = self.held.limit
        return Answer(503, f"the gateway holds {self.held.now} bytes of requests, its limit is "
                           f"{limit} (VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT); retry later",
                      RETRY_BUSY)  # fmt: skip

    async def _body(self, request: web.Request, share: Share) -> bytes | web.Response:
        declared = request.content_length or 0
        if declared > self._max:
            return _error(413, f"request body of {declared} bytes is over the "
                               f"{self._max}-byte limit")  # fmt: skip
        # the size it says is taken before a byte is read: a body refused half-read was read
        # for nothing, and bodies each half-read could hold the room none of them finish in
        if not await share.take_waiting(declared, ROOM_WAIT):
            return _reply(self.busy())
        chunks = []
        size = 0
        seconds = self.settings.gateway.body_timeout
        try:
            # a client that stops sending mid-body held its connection until TCP gave up
            async with asyncio.timeout(seconds):
                # aiohttp undoes Content-Encoding (gzip, deflate, zstd) as it streams, so the
                # limit holds for the decompressed size too
                async for chunk in request.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > self._max:
                        return _error(413, f"request body is over the {self._max}-byte limit "
                                           "(after decompression)")  # fmt: skip
                    # beyond its Content-Length: a chunked or compressed body
                    if size > declared and not share.take(min(len(chunk), size - declared)):
                        return _reply(self.busy())
                    chunks.append(chunk)
        except TimeoutError:
            return _error(408, f"the request's body did not arrive within {seconds:g} s "
                               f"({size} bytes did)")  # fmt: skip
        except (HttpProcessingError, RequestPayloadError, ValueError) as exc:
            return _error(400, f"the body does not decode as its Content-Encoding says ({exc})")
        return b"".join(chunks)

    async def _export(self, request: web.Request, signal: str) -> web.Response:
        tenant = self.tenant_of(request.headers.get(self._header, ""))
        if isinstance(tenant, Answer):
            return _reply(tenant)
        content_type = request.content_type
        if content_type not in (PROTOBUF, JSON):
            return _error(415, f"Content-Type {content_type!r}: send {PROTOBUF} or {JSON}")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ENCODINGS:
            return _error(415, f"Content-Encoding {encoding!r} is not one this gateway reads: "
                               "send gzip, deflate, zstd or none")  # fmt: skip
        with self.held.request() as share:
            body = await self._body(request, share)
            if isinstance(body, web.Response):
                return body
            return await self._answer(body, tenant, signal, request.path, content_type == JSON)

    async def _answer(
        self, body: bytes, tenant: str, signal: str, path: str, as_json: bool
    ) -> web.Response:
        try:
            views: Sequence[SpanView | LogView]
            if signal == "traces":
                views = spans_from_json(body) if as_json else spans_from_protobuf(body)
            else:
                views = logs_from_json(body) if as_json else logs_from_protobuf(body)
        except OtlpError as exc:
            return _error(400, f"{path}: {exc}")
        answer = await self.accept(views, tenant, signal, path)
        if answer.status != 200:
            return _reply(answer)
        reply = response(signal, answer.rejected, answer.message, as_json=as_json)
        return web.Response(body=reply, content_type=JSON if as_json else PROTOBUF)

    def reload(self, config: Config) -> None:
        """Answer from the next request by ``config`` (vigil.yaml read again): its tenants' keys,
        disabled tenants, rate limits and the dead letters' scrubbing."""
        self.config = config
        self.limiter = self.limiter.with_limits(config.rate_limits)
        self.metrics.policy_reads["read"] += 1
        self.metrics.policy_read_at = time.time()

    def tenant_of(self, said: str) -> str | Answer:
        """The tenant whose API key ``said`` (the key header's value) holds, or why none."""
        raw = said.strip()
        if self._header.lower() == "authorization":
            scheme, _, key = raw.partition(" ")
            key = key.strip() if scheme.lower() == "bearer" else ""
        else:
            key = raw
        if not key:
            how = "Authorization: Bearer <key>" if self._header.lower() == "authorization" else (
                f"{self._header}: <key>"
            )  # fmt: skip
            return Answer(401, f"missing API key: send {how}")
        tenant = self.config.api_keys.get(key_digest(key))
        if tenant is None:
            return Answer(401, "unknown API key")
        if tenant in self.config.disabled_tenants:
            return Answer(403, f"tenant {tenant!r} is disabled")
        return tenant

    async def accept(
        self, views: Sequence[SpanView | LogView], tenant: str, signal: str, path: str
    ) -> Answer:
        """Publish a request's valid events and keep the rest in the DLQ, answering 200 once
        the broker has them all; 503 or 429 (with when to retry) when it cannot take them now,
        and then nothing of the request counts against the tenant's rate."""
        good, bad = self._map(views, tenant, signal)
        if not await self.sender.available(self.settings.topics.raw):
            return Answer(503, "Kafka is unreachable; retry later", RETRY_BROKER_DOWN)
        if self.sender.queue_depth + len(good) + len(bad) > self.settings.gateway.max_queue:
            return Answer(429, "the gateway's queue to Kafka is full; retry later",
                          RETRY_QUEUE_FULL)  # fmt: skip
        wait = self.limiter.take(tenant, len(views))
        if wait:
            limit = self.limiter.limits[tenant]
            self.metrics.limited[tenant] += 1
            return Answer(429, f"tenant {tenant!r} is over its rate limit of "
                               f"{limit.events_per_second:g} events/s (burst {limit.burst:g}): "
                               f"this request's {len(views)} fit in {wait:.1f} s",
                          retry_after(wait))  # fmt: skip
        records = good + [self._dead_letter(view, why, tenant, path) for view, why in bad]
        try:
            await self.sender.send(records, self.settings.gateway.delivery_timeout)
        except Unavailable as exc:
            self.limiter.give_back(tenant, len(views))
            if exc.too_large:  # the retry is mapped by the limits as they are now
                topics = self.settings.topics
                self.sized(await asyncio.to_thread(message_bytes_again, self.settings,
                                                   [topics.raw, topics.dlq]))  # fmt: skip
            return Answer(503, f"Kafka did not take the events: {exc}", RETRY_BROKER_DOWN)
        self.metrics.accepted[signal] += len(good)
        self.metrics.by_tenant[tenant] += len(views)
        for _view, why in bad:
            self.metrics.rejected[(signal, why.code)] += 1
        if not bad:
            return Answer(200)
        first = f"{bad[0][1].code}: {bad[0][1].reason}"
        message = f"{len(bad)} of {len(views)} rejected, kept in the DLQ; first: {first}"
        return Answer(200, message, rejected=len(bad))

    def _map(
        self, views: Sequence[SpanView | LogView], tenant: str, signal: str
    ) -> tuple[list[tuple[str, bytes, bytes]], list[tuple[SpanView | LogView, InvalidEvent]]]:
        """The raw topic's records of the views that are valid events, and the rest with why."""
        now = self._clock()
        good: list[tuple[str, bytes, bytes]] = []
        bad: list[tuple[SpanView | LogView, InvalidEvent]] = []
        for view in views:
            try:
                if isinstance(view, SpanView):
                    event = span_to_event(view, tenant_id=tenant)
                else:
                    event = log_to_event(view, tenant_id=tenant)
                if event is None:  # not a GenAI span or a Vigil log event: not Vigil's to keep
                    self.metrics.ignored[signal] += 1
                    continue
                good.append(self._record(check_event(event, self.settings.limits, now)))
            except InvalidEvent as exc:
                bad.append((view, exc))
            except Exception as exc:  # a record the mapping did not foresee: not the request's
                # its kind only: a message may quote what the record holds
                log.error("a %s record could not be mapped (%s); kept in the DLQ", signal,
                          type(exc).__name__)  # fmt: skip
                why = f"the record could not be mapped to an event ({type(exc).__name__})"
                bad.append((view, InvalidEvent("mapping_failed", why)))
        return good, bad

    def sized(self, said: Mapping[str, int]) -> None:
        """Size the events and dead letters this publishes by the raw topic's and the DLQ's
        max.message.bytes (``said``; Kafka's default where not said): an event over raw's is a
        dead letter (``oversized``), and a dead letter keeps what the DLQ takes
        (``dlq.kept_payload``)."""
        topics = self.settings.topics
        raw = event_bytes(topics.raw, said)
        self.max_event_bytes = min(self.settings.limits.max_payload_bytes, raw)
        self.keep = kept_payload(said.get(topics.dlq))

    def _record(self, event: Event) -> tuple[str, bytes, bytes]:
        """Raises InvalidEvent for an event the schema cannot hold (a lone surrogate in a
        string, which OTLP/JSON can carry) or larger than the pipeline takes."""
        key = f"{event.tenant_id}/{event.agent_id}".encode()
        value = self.registry.encode_checked(event)
        if len(value) > self.max_event_bytes:
            # sent, the worker refused it; past raw's limit, the request was a 503 at each retry
            why = f"the event is {len(value):,} bytes encoded, more than the limit of "
            raise InvalidEvent("oversized", f"{why}{self.max_event_bytes:,}")
        return self.settings.topics.raw, key, value

    def _dead_letter(
        self, view: SpanView | LogView, exc: InvalidEvent, tenant: str, path: str
    ) -> tuple[str, bytes, bytes]:
        payload = _describe(view)
        # a stable id per rejected record, so a retried request is stored once
        offset = int(hashlib.sha256(tenant.encode() + payload).hexdigest()[:15], 16)
        key = f"{tenant}/gateway".encode()
        letter = dead_letter(payload, key, Origin(f"gateway:{path}", 0, offset), exc,
                             stage="gateway", received_at=self._clock(),
                             keep=self.keep, scrub_with=self.config.scrub)  # fmt: skip
        return self.settings.topics.dlq, key, self.registry.encode(DEAD_LETTER_SCHEMA, letter)


def run_gateway(
    settings: Settings,
    config: Config,
    host: str,
    port: int,
    grpc_port: int | None = 4317,
    *,
    hangups: list[int],
) -> None:
    """Serve OTLP/HTTP on port, and OTLP/gRPC on grpc_port unless it is None, until
    SIGINT/SIGTERM, then deliver what is queued (for up to the delivery timeout). Blocks.
    Raises TopicError when Kafka cannot be reached at start, AclError when the gateway's
    principal lacks an ACL it needs, ConfigError when a port cannot be had. The topics it
    writes (raw, the DLQ) are created if missing; the worker creates the rest (the gateway's
    ACLs need not let it see them). ``hangups``: the SIGHUPs kept since the process began
    (``cli.hangups_kept``): the policy was read for the start, so one means it is read again
    once the gateway serves."""
    if grpc_port == port:  # gRPC bound it first, and HTTP was then told it was taken
        raise ConfigError(
            f"the gateway's OTLP/HTTP and OTLP/gRPC receivers were both given port {port}: "
            "give gRPC another with --grpc-port, or start the gateway with --no-grpc"
        )
    certificate, tls, grpc_tls = None, None, None
    if settings.gateway.tls is not None:  # HTTPS and gRPC serve each renewal of it, unrestarted
        certificate = ServedCertificate(settings.gateway.tls, "VIGIL_GATEWAY_TLS_CERT_LOCATION")
        tls = certificate.context()
    if grpc_port is not None and certificate is not None:
        from pipeline.otlp_grpc import credentials  # it imports this module

        grpc_tls = credentials(certificate)  # here: an encrypted key is said before Kafka is asked
    say_expiring(settings, "gateway")
    config.compile_patterns()
    prepare_kafka(settings, "gateway")
    sizes = sizes_at_start(settings, "gateway")  # raw and the DLQ, the topics it writes
    sender = KafkaSender(settings.kafka, {"batch.size": batch_bytes(sizes.values())})
    gateway = Gateway(settings, config, Registry.load(), sender)
    gateway.sized(sizes)
    gateway.certificate = certificate
    gateway.kafka_certificates = kafka_expiries(settings)
    tenants = _say_keys(config)
    app = gateway.app()
    app.on_startup.append(_read_again_at_sighup(gateway, settings.config_path, hangups))
    served = "OTLP/HTTP: /v1/traces, /v1/logs"
    if grpc_port is not None:
        app.cleanup_ctx.append(_grpc(gateway, host, grpc_port, grpc_tls))
        served += f"; OTLP/gRPC on port {grpc_port}"
    scheme = "http" if tls is None else "https"
    print(f"vigil gateway on {scheme}://{host}:{port} ({served}), {tenants} tenant(s) with "
          f"keys, publishing to {settings.topics.raw} at {settings.bootstrap}",
          flush=True)  # fmt: skip
    try:
        web.run_app(app, host=host, port=port, ssl_context=tls, print=None, access_log=None)
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
        raise ConfigError(
            f"the gateway cannot listen on {host}:{port}: the port is taken, or the address is "
            "not this machine's; give it another with --port or --host"
        ) from None
    finally:
        # every request was answered before this (aiohttp waits for them): what is still queued
        # was answered 503 and will be sent again, so waiting past the delivery timeout that
        # answer was given after helps no client, and outlasts an orchestrator's grace period
        # when the broker does not answer (it took 30 s)
        left = sender.close(settings.gateway.delivery_timeout)
        if left:
            log.error("%d message(s) were still undelivered at shutdown (answered 503 to their "
                      "clients, who send them again)", left)  # fmt: skip


def _say_keys(config: Config) -> int:
    """Warn of tenants without keys, at start and as vigil.yaml is read again; how many tenants
    have keys."""
    tenants = len(set(config.api_keys.values()))
    if not tenants:
        log.warning("no tenant has an API key (tenants.<t>.api_keys_env in vigil.yaml): "
                    "every export will be refused with 401")  # fmt: skip
    for tenant, variable in sorted(config.keys_unset.items()):
        log.warning("tenants.%s.api_keys_env: %s holds no key in this environment: the keys "
                    "it would hold are refused with 401", tenant, variable)  # fmt: skip
    return tenants


def _read_again_at_sighup(
    gateway: Gateway, path: Path | None, early: list[int]
) -> Callable[[web.Application], Awaitable[None]]:
    """From the gateway's start on, SIGHUP reads vigil.yaml (``path``) again, off the event
    loop, and the gateway answers by it from then on (``Gateway.reload``); a policy that does
    not read is said at ERROR, and the one before kept. ``early``: the SIGHUPs before (as
    ``cli.hangups_kept`` keeps them): the policy is read again once if there was one."""
    reading = asyncio.Lock()  # one read at a time: two signals read the file twice, in order
    pending: set[asyncio.Task[None]] = set()

    async def read_again() -> None:
        async with reading:
            if path is None:
                log.warning("SIGHUP: there is no policy file to read again (VIGIL_CONFIG was "
                            "unset and ./vigil.yaml absent at start)")  # fmt: skip
                return
            try:
                config = await asyncio.to_thread(_policy_at, path)
            except ConfigError as exc:
                log.error("SIGHUP: %s; the gateway goes on with the policy it read before", exc)
                gateway.metrics.policy_reads["refused"] += 1
                return
            gateway.reload(config)
            tenants = _say_keys(config)
            print(f"vigil gateway read {path} again: {tenants} tenant(s) with keys", flush=True)

    def signalled() -> None:
        task = asyncio.get_running_loop().create_task(read_again())
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def install(_app: web.Application) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, signalled)
        if early:  # the policy may have changed after it was read for the start
            signalled()

    return install


def _policy_at(path: Path) -> Config:
    """vigil.yaml read and checked as at start, its prefilters compiled (about a second)."""
    config = load_config(path, os.environ)
    config.compile_patterns()
    return config


def _grpc(
    gateway: Gateway, host: str, port: int, tls: grpc.ServerCredentials | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The OTLP/gRPC receiver, started with the HTTP one in its event loop, and stopped after
    it: health Watch streams are told NOT_SERVING, calls in flight are given the delivery
    timeout to be answered."""

    async def serving(_app: web.Application) -> AsyncIterator[None]:
        from pipeline.otlp_grpc import serve  # it imports this module

        receiver = await serve(gateway, host, port, tls)
        yield
        await receiver.stop(gateway.settings.gateway.delivery_timeout)

    return serving
