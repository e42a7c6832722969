"""The gateway's OTLP/gRPC receiver (port 4317): what OpenTelemetry SDKs and Collectors send
by default where OTLP/HTTP is not set.

    opentelemetry.proto.collector.trace.v1.TraceService/Export  ->  Gateway.accept
    opentelemetry.proto.collector.logs.v1.LogsService/Export

The same gateway answers both: the tenant from the API key (the key header, lower-cased, in
the call's metadata), the same mapping, checks, rate limits and DLQ, and a reply only once
the broker holds every accepted event. What OTLP/HTTP answers with a status, this answers
with its gRPC code (``CODES``); a 429 or 503 carries when to retry as ``google.rpc.RetryInfo``,
which OTLP exporters wait for. Messages are read as bytes (no generated stubs), gzip or
deflate undone by gRPC, and refused above ``VIGIL_GATEWAY_MAX_BYTES`` by gRPC itself.

A call's message is read only once ``VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT`` has room for the
largest one (``ROOM_WAIT``): the methods are taken as streams of requests, which gRPC calls
before it reads a message (a unary handler is called with it read whole), and a message not
asked for is held back by HTTP/2's flow control, in the client.

The port also answers gRPC's health checking protocol (``grpc.health.v1.Health``), as load
balancers and Kubernetes' gRPC probes ask it, with no API key: the service "" is the
gateway alive (``/healthz``), each OTLP service it ready, Kafka answering (``/readyz``),
asked at each Check and every ``HEALTH_EVERY`` seconds for the Watch streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health

from pipeline.certs import Loaded, ServedCertificate
from pipeline.gateway import NO_METRICS, ROOM_WAIT, Answer, Gateway
from pipeline.otel_mapping import LogView, SpanView
from pipeline.otlp import OtlpError, logs_from_protobuf, response, spans_from_protobuf
from pipeline.settings import ConfigError

log = logging.getLogger("vigil.gateway")

# OTLP metrics, which Vigil does not keep: answered UNIMPLEMENTED saying so (``NO_METRICS``)
METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"
SERVICES = {
    "traces": "opentelemetry.proto.collector.trace.v1.TraceService",
    "logs": "opentelemetry.proto.collector.logs.v1.LogsService",
}
# the OTLP specification's codes for what OTLP/HTTP answers with these statuses; exporters
# retry UNAVAILABLE, and RESOURCE_EXHAUSTED when it carries RetryInfo (a message over the size
# limit, refused by gRPC itself, carries none: the specification says not to retry it)
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
RETRY_INFO = "google.rpc.retryinfo-bin"
NO_MESSAGE = Answer(400, "the call carried no message")
HEALTH_EVERY = 10.0  # seconds between the receiver's own asking of Kafka (``Health.follow``)
Context = grpc.aio.ServicerContext[bytes, bytes]
HealthRequest = health_pb2.HealthCheckRequest
HealthResponse = health_pb2.HealthCheckResponse
HealthContext = grpc.aio.ServicerContext[HealthRequest, HealthResponse]


def _ms(seconds: float) -> int:
    """``seconds`` as a gRPC option's milliseconds, which are a C int: 24.8 days at most."""
    return min(int(seconds * 1000), 2**31 - 1)


def _path(signal: str) -> str:
    """The method's path, as the gateway's metrics and dead letters name where a call came."""
    return f"/{SERVICES[signal]}/Export"


def _views(signal: str, body: bytes) -> Sequence[SpanView | LogView]:
    return spans_from_protobuf(body) if signal == "traces" else logs_from_protobuf(body)


class Receiver:
    """The Export methods of OTLP's trace and logs services, answered by ``gateway``."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._key = gateway.settings.gateway.key_header.lower()  # as gRPC's metadata has it
        self._max = gateway.settings.gateway.max_request_bytes

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def service(signal: str) -> grpc.GenericRpcHandler:
            async def export(_messages: AsyncIterator[bytes], context: Context) -> bytes:
                return await self.export(signal, context)

            # a stream of requests (which exporters' unary calls are on the wire), so that the
            # handler runs before the message is read; no (de)serializers: bytes each way
            method: grpc.RpcMethodHandler[bytes, bytes]
            method = grpc.stream_unary_rpc_method_handler(export)
            return grpc.method_handlers_generic_handler(SERVICES[signal], {"Export": method})

        async def no_metrics(_messages: AsyncIterator[bytes], context: Context) -> bytes:
            self.gateway.metrics.requests[(f"/{METRICS_SERVICE}/Export", 404)] += 1
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_METRICS)  # its message unread

        refused: grpc.RpcMethodHandler[bytes, bytes]
        refused = grpc.stream_unary_rpc_method_handler(no_metrics)
        metrics = grpc.method_handlers_generic_handler(METRICS_SERVICE, {"Export": refused})
        return [*(service(signal) for signal in SERVICES), metrics]

    async def export(self, signal: str, context: Context) -> bytes:
        started = time.perf_counter()
        answer = await self._answer(signal, context)
        status = answer.status
        try:
            if status != 200:
                trailers: tuple[tuple[str, str | bytes], ...] = ()
                if answer.retry_after is not None:
                    wait = Duration(seconds=int(answer.retry_after))
                    trailers = ((RETRY_INFO, RetryInfo(retry_delay=wait).SerializeToString()),)
                code = CODES.get(status, grpc.StatusCode.INTERNAL)
                await context.abort(code, answer.message, trailing_metadata=trailers)
        except grpc.aio.AbortError:
            raise
        except Exception:
            # the call was over before its answer: gRPC ended it, for a message over
            # grpc.max_receive_message_length (RESOURCE_EXHAUSTED), and gave the handler none
            if answer is not NO_MESSAGE:
                raise
            status = 413
        finally:
            self.gateway.metrics.observe(_path(signal), status, time.perf_counter() - started)
        return response(signal, answer.rejected, answer.message, as_json=False)

    async def _answer(self, signal: str, context: Context) -> Answer:
        said = ""
        for key, value in context.invocation_metadata() or ():
            if key == self._key and isinstance(value, str):
                said = value
        tenant = self.gateway.tenant_of(said)
        if isinstance(tenant, Answer):
            return tenant  # its message never read
        with self.gateway.held.request() as share:
            # the message's size is not known until it is read: room for the largest is taken
            # (a few calls being read fill it, soon), and what it did not need given back once
            # it is
            if not await share.take_waiting(self._max, ROOM_WAIT):
                return self.gateway.busy()
            seconds = self.gateway.settings.gateway.body_timeout
            try:
                async with asyncio.timeout(seconds):
                    body = await context.read()
                    # the end of the stream, which comes with an exporter's one message (gRPC
                    # refused a second to a unary handler, which this no longer is)
                    more = await context.read() if isinstance(body, bytes) else None
            except TimeoutError:
                return Answer(408, f"the call's message did not arrive within {seconds:g} s")
            if not isinstance(body, bytes):  # grpc.aio.EOF: gRPC refused it, or none was sent
                return NO_MESSAGE
            if isinstance(more, bytes):
                return Answer(400, "the call carried more than one message: Export takes one")
            share.keep(len(body))
            try:
                views = _views(signal, body)
            except OtlpError as exc:
                return Answer(400, f"{_path(signal)}: {exc}")
            return await self.gateway.accept(views, tenant, signal, _path(signal))


class Health(health.HealthServicer):
    """gRPC's health checking protocol for the receiver: "" is SERVING while the gateway
    runs, each OTLP service SERVING while Kafka answers for the raw topic (asked at each
    Check, as ``/readyz`` asks it, and by ``follow``) and NOT_SERVING while it does not; Watch
    streams are told each change either finds, and NOT_SERVING for all once the gateway stops.
    Another service is NOT_FOUND."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway

    async def Check(self, request: HealthRequest, context: HealthContext) -> HealthResponse:
        if request.service in SERVICES.values():
            await self._ask_kafka()
        answer: HealthResponse = await super().Check(request, context)
        return answer

    async def follow(self, every: float) -> None:
        """Ask Kafka every ``every`` seconds, until cancelled: a client that only Watches (gRPC's
        client-side health checking) heard of Kafka's state only when someone else Checked."""
        while True:
            await asyncio.sleep(every)
            try:
                await self._ask_kafka()
            except Exception:  # the next look may find it; Checks still ask
                log.exception("the gRPC health check could not ask Kafka")

    async def _ask_kafka(self) -> None:
        ready = await self.gateway.kafka_answers()
        status = HealthResponse.SERVING if ready else HealthResponse.NOT_SERVING
        for service in SERVICES.values():  # Watch streams hear of a change
            await self.set(service, status)


def credentials(certificate: ServedCertificate) -> grpc.ServerCredentials:
    """The gateway's certificate for gRPC, which reads a key only unencrypted, and each renewal
    of it from the connection after ``certificate`` loads it. Raises ConfigError for an
    encrypted key (``VIGIL_GATEWAY_TLS_KEY_PASSWORD`` is for HTTPS); a renewal with one is said
    at ERROR, and gRPC keeps the key it has."""
    given = certificate.current
    if _encrypted(given):
        raise ConfigError(
            f"VIGIL_GATEWAY_TLS_KEY_LOCATION {certificate.tls.key}: an encrypted key, which the "
            "OTLP/gRPC receiver cannot read (gRPC takes no password); give it the key "
            "unencrypted, readable by this user alone, or start the gateway with --no-grpc"
        )

    def renewed() -> grpc.ServerCertificateConfiguration | None:  # gRPC asks at each connection
        nonlocal given
        certificate.refresh()
        latest = certificate.current
        if latest is given:
            return None
        given = latest
        if _encrypted(latest):
            log.error("VIGIL_GATEWAY_TLS_KEY_LOCATION %s: the renewed key is encrypted, which "
                      "the OTLP/gRPC receiver cannot read: it goes on presenting the "
                      "certificate before it (HTTPS presents the new one)",
                      certificate.tls.key)  # fmt: skip
            return None
        return _configuration(latest)

    # None is "no change", as grpc's docstring says; its type stub does not
    return grpc.dynamic_ssl_server_credentials(_configuration(given), renewed)  # type: ignore[arg-type]


def _encrypted(loaded: Loaded) -> bool:
    # PKCS#8's "BEGIN ENCRYPTED PRIVATE KEY", or "Proc-Type: 4,ENCRYPTED"
    return b"ENCRYPTED" in loaded.key_pem


def _configuration(loaded: Loaded) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(loaded.key_pem, loaded.cert_pem)])


@dataclass(frozen=True)
class Serving:
    """A receiver listening (``serve``), and its health's own asking of Kafka, if any."""

    server: grpc.aio.Server
    health: Health
    following: asyncio.Task[None] | None

    async def stop(self, grace: float | None) -> None:
        """Tell Watch streams NOT_SERVING, then give calls in flight ``grace`` seconds."""
        if self.following is not None:
            self.following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.following
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def serve(
    gateway: Gateway,
    host: str,
    port: int,
    tls: grpc.ServerCredentials | None,
    health_every: float | None = HEALTH_EVERY,
) -> Serving:
    """The receiver and its health checks, listening on host:port in the running event loop,
    over TLS given ``credentials``' (plain without), asking Kafka every ``health_every``
    seconds for the Watch streams (only at Checks given None). Raises ConfigError when the
    port cannot be had."""
    limits = gateway.settings.gateway
    grace = limits.body_timeout + limits.delivery_timeout
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            # an exporter's connection is kept; one gone silent is let go
            ("grpc.keepalive_time_ms", 60_000),
            # but not for ever: a balancer in front spreads connections, not calls, so a client
            # asked for a new one now and then reaches a gateway started since; a call still
            # open then has its message's time to arrive and the broker's to take it (slower
            # is ended, as HTTP's 408 ends a body that does not arrive)
            ("grpc.max_connection_age_ms", _ms(limits.grpc_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(grace)),
            # gRPC binds with SO_REUSEPORT: a second gateway on the port shared its calls
            ("grpc.so_reuseport", 0),
            # a call waiting for room has its message held back by flow control, but gRPC's
            # estimate of the link's bandwidth-delay product grew each stream's window to most of
            # a large message (a burst of 96 calls of 7.2 MB: 932 MB with it, 416 MB without):
            # a fixed window of 1 MiB a stream, a megabyte a round trip for a far exporter
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 1 << 20),
        ]
    )
    server.add_generic_rpc_handlers(Receiver(gateway).handlers())
    checks = Health(gateway)
    for service in SERVICES.values():  # the gateway starts once Kafka answered
        await checks.set(service, HealthResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    # an IPv6 literal in brackets, as gRPC reads it: ":::4317" (--host ::) bound nothing
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if tls is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, tls)
    except RuntimeError:
        raise ConfigError(
            f"the OTLP/gRPC receiver cannot listen on {address}: the port is taken, or the "
            "address is not this machine's; give it another with --grpc-port, or start the "
            "gateway with --no-grpc"
        ) from None
    await server.start()
    following = None
    if health_every is not None:
        following = asyncio.get_running_loop().create_task(checks.follow(health_every))
    return Serving(server, checks, following)
