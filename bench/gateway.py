"""The OTLP gateway on the local stack: spans/s of one gateway process at saturation over
OTLP/HTTP and over OTLP/gRPC, and request latency (p50/p99) at a fixed offered load, against a
baseline measured in the same run: the same events produced straight to Kafka by one
confluent-kafka producer (acks=all).

A local KRaft broker and one ``vigil gateway`` process are started for the run and stopped.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from confluent_kafka import Producer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from pipeline.codec import EVENT_SCHEMA, Registry
from pipeline.devkafka import LocalKafka, fetch_jars
from pipeline.events import event_to_avro
from pipeline.logs import RDKAFKA_LOGGER
from pipeline.otel_mapping import span_to_event
from pipeline.otlp import spans_from_protobuf
from pipeline.otlp_grpc import SERVICES
from pipeline.services import GatewayProcess, free_port
from pipeline.settings import Settings
from pipeline.topics import ensure_topics

SPANS_PER_REQUEST = 100
KEY = "bench-key-0123456789abcdef"
SATURATION_SECONDS = 8.0
CLIENTS = 8
OFFERED_REQUESTS_PER_S = 10  # x 100 spans: 1,000 spans/s


def _request(batch: int) -> bytes:
    request = ExportTraceServiceRequest()
    resource = request.resource_spans.add()
    resource.resource.attributes.add(key="service.name").value.string_value = "bench-agent"
    spans = resource.scope_spans.add()
    now = time.time_ns()
    for i in range(SPANS_PER_REQUEST):
        n = batch * SPANS_PER_REQUEST + i
        span = spans.spans.add(
            trace_id=(n + 1).to_bytes(16, "big"), span_id=(n + 1).to_bytes(8, "big"),
            name="chat gpt-4o", start_time_unix_nano=now - 10**9, end_time_unix_nano=now,
        )  # fmt: skip
        for key, value in (
            ("gen_ai.provider.name", "openai"),
            ("gen_ai.request.model", "gpt-4o"),
            ("gen_ai.input.messages", "Summarise the attached contract in three bullets."),
        ):
            span.attributes.add(key=key).value.string_value = value
        span.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = 900 + i
        span.attributes.add(key="gen_ai.usage.output_tokens").value.int_value = 120
    return request.SerializeToString()


class _Client:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, body: bytes) -> tuple[int, float]:
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/traces", body, {
            "Content-Type": "application/x-protobuf", "Authorization": f"Bearer {KEY}",
        })  # fmt: skip
        reply = self.conn.getresponse()
        reply.read()
        return reply.status, time.perf_counter() - t0


class _GrpcClient:
    """As an OTLP/gRPC exporter calls: one channel, the key in each call's metadata."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.export: grpc.UnaryUnaryMultiCallable[bytes, bytes]
        self.export = self.channel.unary_unary(f"/{SERVICES['traces']}/Export")

    def post(self, body: bytes) -> tuple[int, float]:
        """The HTTP status OTLP/HTTP would have answered (200 for OK), and the seconds."""
        t0 = time.perf_counter()
        try:
            self.export(body, metadata=(("authorization", f"Bearer {KEY}"),), timeout=30)
        except grpc.RpcError:
            return 0, time.perf_counter() - t0
        return 200, time.perf_counter() - t0


def _saturate(client: type[_Client | _GrpcClient], port: int, bodies: list[bytes]) -> float:
    """Spans/s answered 200 (OK) with CLIENTS connections posting back to back."""
    done = [0] * CLIENTS
    stop = time.monotonic() + SATURATION_SECONDS

    def run(c: int) -> None:
        poster = client(port)
        i = c
        while time.monotonic() < stop:
            status, _ = poster.post(bodies[i % len(bodies)])
            done[c] += SPANS_PER_REQUEST if status == 200 else 0
            i += CLIENTS

    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(run, range(CLIENTS)))
    return sum(done) / (time.monotonic() - t0)


def _fixed_load(port: int, bodies: list[bytes]) -> list[float]:
    """Latencies of requests sent at OFFERED_REQUESTS_PER_S for SATURATION_SECONDS."""
    latencies: list[float] = []
    lock = threading.Lock()
    interval = 1.0 / OFFERED_REQUESTS_PER_S
    clients = [_Client(port) for _ in range(4)]
    free = list(clients)

    def one(body: bytes) -> None:
        with lock:
            client = free.pop()
        try:
            status, seconds = client.post(body)
        finally:
            with lock:
                free.append(client)
        if status == 200:
            with lock:
                latencies.append(seconds)

    with ThreadPoolExecutor(4) as pool:
        start = time.monotonic()
        for n in range(int(SATURATION_SECONDS * OFFERED_REQUESTS_PER_S)):
            time.sleep(max(0.0, start + n * interval - time.monotonic()))
            pool.submit(one, bodies[n % len(bodies)])
    return latencies


def _baseline(bootstrap: str, topic: str, bodies: list[bytes]) -> float:
    """Events/s of mapping the same spans and producing them straight to Kafka (acks=all)."""
    registry = Registry.load()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "acks": "all", "compression.type": "lz4", "linger.ms": 5,
                         "logger": RDKAFKA_LOGGER})  # fmt: skip
    count = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < SATURATION_SECONDS:
        for body in bodies:
            for view in spans_from_protobuf(body):
                event = span_to_event(view, tenant_id="acme")
                assert event is not None
                value = registry.encode(EVENT_SCHEMA, event_to_avro(event))
                while True:
                    try:
                        producer.produce(topic, value, b"acme/bench-agent")
                        break
                    except BufferError:
                        producer.poll(0.05)
                count += 1
            producer.poll(0)
    producer.flush(60)
    return count / (time.monotonic() - t0)


@contextlib.contextmanager
def local_stack(prefix: str, **env_given: str) -> Iterator[tuple[Settings, dict[str, str]]]:
    """A local broker, with Vigil's topics under ``prefix``, in a temporary home whose
    vigil.yaml gives tenant acme the key KEY: the settings and the environment for a gateway on
    it (``env_given`` added). The broker is stopped and the home removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"vigil-{prefix}-") as tmp:
        home = Path(tmp)
        (home / "vigil.yaml").write_text("tenants:\n  acme: {api_keys_env: BENCH_KEYS}\n")
        broker_port = free_port(2)  # the broker's listener and its controller's
        env = {
            **os.environ,
            "VIGIL_HOME": str(home / "home"),
            "VIGIL_CONFIG": str(home / "vigil.yaml"),
            "VIGIL_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
            "VIGIL_TOPIC_PREFIX": prefix,
            "BENCH_KEYS": KEY,
            **env_given,
        }
        settings = Settings.from_env(env)
        broker = LocalKafka(home / "kafka", fetch_jars(settings.cache_dir), broker_port)
        broker.start()
        try:
            ensure_topics(settings)
            yield settings, env
        finally:
            broker.stop()


def measure() -> dict[str, Any]:
    print("gateway benchmark: starting a local broker and one gateway process ...", flush=True)
    with local_stack("bench") as (settings, env):
        gateway = GatewayProcess(settings, free_port(), env, grpc_port=free_port())
        try:
            gateway.start()
            assert gateway.grpc_port is not None
            bodies = [_request(b) for b in range(200)]
            _saturate(_Client, gateway.port, bodies[:10])  # warm up
            spans_per_s = _saturate(_Client, gateway.port, bodies)
            _saturate(_GrpcClient, gateway.grpc_port, bodies[:10])
            grpc_spans_per_s = _saturate(_GrpcClient, gateway.grpc_port, bodies)
            latencies = sorted(_fixed_load(gateway.port, bodies))
            baseline = _baseline(settings.bootstrap, settings.topics.raw + "-baseline", bodies)
        finally:
            gateway.stop()
    return {
        "gateway_spans_per_s": spans_per_s,
        "baseline_direct_produce_per_s": baseline,
        "ratio_vs_baseline": spans_per_s / baseline,
        "grpc_spans_per_s": grpc_spans_per_s,
        "grpc_ratio_vs_baseline": grpc_spans_per_s / baseline,
        "offered_spans_per_s": OFFERED_REQUESTS_PER_S * SPANS_PER_REQUEST,
        "latency_p50_ms": statistics.median(latencies) * 1000,
        "latency_p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "requests_at_fixed_load": len(latencies),
        "spans_per_request": SPANS_PER_REQUEST,
        "clients_at_saturation": CLIENTS,
    }
