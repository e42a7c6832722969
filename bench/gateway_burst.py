"""A burst of large exports at one gateway: its peak resident memory, and how long until every
span was taken, with ``VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT`` at its default (64 MiB) and, as the
baseline measured in the same run, so large that it never refuses or waits (the gateway before
the limit). Each client sends one body of nearly ``VIGIL_GATEWAY_MAX_BYTES`` all at once and,
when answered 503 (UNAVAILABLE over gRPC), sends it again after its Retry-After, as exporters
do.

    python -m bench.gateway_burst [CLIENTS] [http|grpc]

A local KRaft broker is started for the run; one ``vigil gateway`` process for each setting.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench.gateway import KEY, local_stack
from pipeline.otlp_grpc import RETRY_INFO, SERVICES
from pipeline.services import GatewayProcess, free_port
from pipeline.settings import Settings

SPANS = 1_000  # a body's
TEXT = 7_000  # characters of prompt a span carries: a body of ~7.2 MB
CLIENTS = 48
UNBOUNDED = str(8 << 30)


def _body(client: int) -> bytes:
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add()
    now = time.time_ns()
    prompt = ("Summarise the attached contract in three bullets. " * (TEXT // 50 + 1))[:TEXT]
    for i in range(SPANS):
        n = client * SPANS + i + 1
        span = spans.spans.add(trace_id=n.to_bytes(16, "big"), span_id=n.to_bytes(8, "big"),
                               name="chat", start_time_unix_nano=now - 10**9,
                               end_time_unix_nano=now)  # fmt: skip
        for key, value in (("gen_ai.provider.name", "openai"), ("gen_ai.request.model", "gpt-4o"),
                           ("gen_ai.input.messages", prompt)):  # fmt: skip
            span.attributes.add(key=key).value.string_value = value
        span.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = 900
    return request.SerializeToString()


def _send(port: int, body: bytes, answers: list[int]) -> None:
    """POST ``body`` until it is answered 200, each answer's status in ``answers``."""
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            connection.request("POST", "/v1/traces", body, {
                "Content-Type": "application/x-protobuf", "Authorization": f"Bearer {KEY}",
            })  # fmt: skip
            reply = connection.getresponse()
            reply.read()
            answers.append(reply.status)
            if reply.status == 200:
                return
            time.sleep(float(reply.getheader("Retry-After") or 1))
        finally:
            connection.close()


def _send_grpc(port: int, body: bytes, answers: list[int]) -> None:
    """The same over OTLP/gRPC, a channel of its own, as an exporter calls; 200 for OK, 503 for
    UNAVAILABLE (then waiting the RetryInfo's seconds)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        export: grpc.UnaryUnaryMultiCallable[bytes, bytes]
        export = channel.unary_unary(f"/{SERVICES['traces']}/Export")
        while True:
            try:
                export(body, metadata=(("authorization", f"Bearer {KEY}"),), timeout=120)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                answers.append(503)
                said = {m.key: m.value for m in err.trailing_metadata() or ()}
                wait = RetryInfo.FromString(bytes(said[RETRY_INFO])).retry_delay.seconds
                time.sleep(wait)
                continue
            answers.append(200)
            return


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def _burst(env: dict[str, str], limit: str, clients: int, over: str) -> dict[str, Any]:
    env = {**env, "VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT": limit}
    gateway = GatewayProcess(Settings.from_env(env), free_port(), env, grpc_port=free_port())
    gateway.start()
    assert gateway.proc is not None and gateway.grpc_port is not None
    send, port = (_send, gateway.port) if over == "http" else (_send_grpc, gateway.grpc_port)
    try:
        bodies = [_body(c) for c in range(clients)]
        answers: list[int] = []
        threads = [threading.Thread(target=send, args=(port, b, answers)) for b in bodies]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        peak = _peak_rss(gateway.proc.pid)
    finally:
        gateway.stop()
    return {
        "peak_rss_mb": round(peak / 1e6),
        "seconds_until_all_taken": round(seconds, 2),
        "spans_per_s": round(clients * SPANS / seconds),
        "answered_503": answers.count(503),
        "answered_200": answers.count(200),
        "body_mb": round(len(bodies[0]) / 1e6, 2),
    }


def measure(clients: int = CLIENTS, over: str = "http") -> dict[str, Any]:
    print(f"gateway burst: {clients} clients over {over}, a local broker ...", flush=True)
    # every body fits the producer queue: memory is the only limit
    with local_stack("burst", VIGIL_GATEWAY_MAX_QUEUE="100000") as (_settings, env):
        results = {}
        for name, limit in (("unbounded", UNBOUNDED), ("default_64_mib", str(64 << 20)),
                            ("unbounded_again", UNBOUNDED)):  # fmt: skip
            results[name] = _burst(env, limit, clients, over)
            print(f"  {name}: {results[name]}", flush=True)
    return {"clients": clients, "over": over, "spans_per_body": SPANS, **results}


if __name__ == "__main__":
    measure(int(sys.argv[1]) if len(sys.argv) > 1 else CLIENTS,
            sys.argv[2] if len(sys.argv) > 2 else "http")  # fmt: skip
