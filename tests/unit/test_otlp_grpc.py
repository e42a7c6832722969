"""The gateway's OTLP/gRPC receiver answering what it refuses before Kafka is asked (no key, a
disabled tenant, bytes that are not OTLP), on the addresses a gateway may be given, and its
health checks. What it publishes, and its health as the real broker stops and starts, is
tested in tests/integration/test_gateway.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from google.rpc.error_details_pb2 import RetryInfo
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeline.codec import Registry
from pipeline.config import load_config
from pipeline.gateway import Gateway
from pipeline.otlp_grpc import RETRY_INFO, ROOM_WAIT, SERVICES, Serving, _ms, serve
from pipeline.services import free_port
from pipeline.settings import ConfigError, Settings

ON = "on-key-0123456789abcdef"
OFF = "off-key-0123456789abcdef"


class Answers:
    """Stands in for the gateway's sender where only its ``probe`` is asked: Kafka answers
    as ``said`` says, in turn."""

    def __init__(self, *said: bool) -> None:
        self.said = list(said)
        self.asked: list[str] = []

    def probe(self, topic: str, timeout: float = 2.0) -> bool:
        self.asked.append(topic)
        return self.said.pop(0)


def _gateway(
    tmp_path: Path, sender: Answers | None = None, env: dict[str, str] | None = None
) -> Gateway:
    config = tmp_path / "vigil.yaml"
    config.write_text("tenants:\n  acme: {api_keys_env: ON_KEYS}\n"
                      "  gone: {api_keys_env: OFF_KEYS, disabled: true}\n")  # fmt: skip
    env = {"VIGIL_CONFIG": str(config), "ON_KEYS": ON, "OFF_KEYS": OFF, **(env or {})}
    settings = Settings.from_env(env)
    # without a sender (the refusals' tests) every call is answered before Kafka would be
    # asked, and one that got that far would fail on None
    return Gateway(settings, load_config(config, env), Registry.load(), sender)  # type: ignore[arg-type]


async def _calls(gateway: Gateway, host: str, target: str) -> list[tuple[grpc.StatusCode, str]]:
    port = free_port()
    server = await serve(gateway, host, port, None)
    said = []
    try:
        async with grpc.aio.insecure_channel(target.format(port=port)) as channel:
            export: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
            export = channel.unary_unary(f"/{SERVICES['traces']}/Export")
            for key, body in ((None, b""), (OFF, b""), (ON, b"\x0a\xff\xff")):
                metadata = () if key is None else (("authorization", f"Bearer {key}"),)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await export(body, metadata=metadata, timeout=10)
                said.append((refused.value.code(), refused.value.details() or ""))
    finally:
        await server.stop(None)
    return said


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_checks_say_alive_and_ready_as_kafka_answers(tmp_path: Path) -> None:
    """The service "" is the gateway alive, asking nothing; an OTLP service is ready while
    Kafka answers for the raw topic, asked at each check; a Watch stream hears each change a
    check finds, and NOT_SERVING as the gateway stops."""
    kafka = Answers(False, True)
    gateway = _gateway(tmp_path, kafka)
    traces = SERVICES["traces"]

    async def checks() -> tuple[list[int], list[int], grpc.StatusCode]:
        port = free_port()
        serving = await serve(gateway, "127.0.0.1", port, None, health_every=None)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def check(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return (await stub.Check(request, timeout=10)).status

            watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICES["logs"]))
            heard = [(await watch.read()).status]
            said = [await check(""), await check(traces)]
            heard.append((await watch.read()).status)
            said += [await check(traces), await check("")]
            heard.append((await watch.read()).status)
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await check("vigil.NoSuchService")
            stopping = asyncio.create_task(serving.stop(5))
            heard.append((await watch.read()).status)
            await stopping
        return said, heard, unknown.value.code()

    said, heard, unknown = asyncio.run(checks())
    assert said == [SERVING, NOT_SERVING, SERVING, SERVING]
    assert heard == [SERVING, NOT_SERVING, SERVING, NOT_SERVING]
    assert unknown == grpc.StatusCode.NOT_FOUND
    assert kafka.asked == [gateway.settings.topics.raw] * 2 and not kafka.said


class Flapping(Answers):
    """Answers, then as it said last for as long as it is asked."""

    def probe(self, topic: str, timeout: float = 2.0) -> bool:
        self.asked.append(topic)
        return self.said.pop(0) if len(self.said) > 1 else self.said[0]


def test_a_watch_stream_hears_kafkas_state_with_no_check_asked(tmp_path: Path) -> None:
    """gRPC's client-side health checking only Watches: with nobody Checking, it heard SERVING
    for good while Kafka was gone. The receiver asks Kafka itself every ``health_every``."""
    kafka = Flapping(True, False, False, True)
    gateway = _gateway(tmp_path, kafka)

    async def watched() -> list[int]:
        port = free_port()
        serving = await serve(gateway, "127.0.0.1", port, None, health_every=0.2)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICES["traces"]))
                return [(await asyncio.wait_for(watch.read(), 10)).status for _ in range(3)]
        finally:
            await serving.stop(None)

    heard = asyncio.run(watched())
    assert heard == [SERVING, NOT_SERVING, SERVING]  # each change once, none repeated
    assert len(kafka.asked) >= 4


@pytest.mark.parametrize(
    ("host", "target"),
    [("127.0.0.1", "127.0.0.1:{port}"), ("::1", "[::1]:{port}"), ("[::1]", "[::1]:{port}")],
)
def test_refusals_are_otlps_codes_on_ipv4_and_ipv6(tmp_path: Path, host: str, target: str) -> None:
    """An IPv6 host (``--host ::`` for every address) was given to gRPC unbracketed, which bound
    nothing and stopped the gateway."""
    said = asyncio.run(_calls(_gateway(tmp_path), host, target))
    assert said[0] == (
        grpc.StatusCode.UNAUTHENTICATED, "missing API key: send Authorization: Bearer <key>"
    )  # fmt: skip
    assert said[1] == (grpc.StatusCode.PERMISSION_DENIED, "tenant 'gone' is disabled")
    assert said[2][0] == grpc.StatusCode.INVALID_ARGUMENT and "protobuf" in said[2][1]


def test_an_address_that_is_not_this_machines_is_named(tmp_path: Path) -> None:
    async def bind() -> None:
        await serve(_gateway(tmp_path), "192.0.2.1", free_port(), None)  # TEST-NET-1

    with pytest.raises(ConfigError, match=r"cannot listen on 192\.0\.2\.1:\d+: the port is taken"):
        asyncio.run(bind())


def test_a_connection_is_let_go_at_its_age_and_a_call_held_past_its_grace_is_ended(
    tmp_path: Path,
) -> None:
    """A balancer spreads connections, not calls: an exporter's connection, kept for good, never
    reached a gateway started after it. Past VIGIL_GATEWAY_GRPC_CONNECTION_AGE_SECONDS the
    client is asked for a new one (its next call makes it); a call still open is given the
    time for its message and the broker's (here 0.5 + 0.5 s), then ended."""
    env = {"VIGIL_GATEWAY_GRPC_CONNECTION_AGE_SECONDS": "1",
           "VIGIL_GATEWAY_BODY_TIMEOUT_SECONDS": "0.5",
           "VIGIL_GATEWAY_DELIVERY_TIMEOUT_SECONDS": "0.5"}  # fmt: skip
    gateway = _gateway(tmp_path, env=env)

    async def held() -> tuple[grpc.ChannelConnectivity, grpc.StatusCode, float, int]:
        port = free_port()
        serving = await serve(gateway, "127.0.0.1", port, None)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
                await watch.read()  # SERVING; the stream stays open
                opened = asyncio.get_running_loop().time()
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await asyncio.wait_for(watch.read(), 30)
                lasted = asyncio.get_running_loop().time() - opened
                state = channel.get_state(try_to_connect=False)
                again = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                return state, ended.value.code(), lasted, again.status
        finally:
            await serving.stop(None)

    state, code, lasted, again = asyncio.run(held())
    assert code == grpc.StatusCode.UNAVAILABLE
    # the age (1 s, less gRPC's jitter of up to a tenth) and the grace (1 s), from a little
    # after the connection was made; not the 30 s waited for
    assert 1.2 <= lasted < 10, lasted
    assert state == grpc.ChannelConnectivity.IDLE  # the connection was let go
    assert again == SERVING  # and a new one made


def test_an_age_longer_than_grpc_can_say_is_its_longest() -> None:
    """gRPC's options are C ints: a year's age in milliseconds stopped the gateway's start with
    an OverflowError."""
    assert _ms(365 * 86400) == 2**31 - 1 and _ms(300) == 300_000


async def until(check: Callable[[], bool], seconds: float = 10) -> None:
    """Look every 10 ms until ``check`` holds, for ``seconds`` at most (the caller's
    assertions then say what did not happen)."""
    for _ in range(int(seconds * 100)):
        if check():
            return
        await asyncio.sleep(0.01)


EXPORT = f"/{SERVICES['traces']}/Export"
KEYED = (("authorization", f"Bearer {ON}"),)


async def _serving(gateway: Gateway) -> tuple[int, Serving]:
    """The receiver on a free port, its health asking Kafka only at Checks (there is none)."""
    port = free_port()
    return port, await serve(gateway, "127.0.0.1", port, None, health_every=None)


def test_a_calls_message_is_read_only_once_the_bytes_held_have_room_for_it(
    tmp_path: Path,
) -> None:
    """gRPC read a unary call's message whole before its handler could refuse it: a burst of
    large exports was all in memory at once whatever VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT said. A
    call now waits for room for the largest message (VIGIL_GATEWAY_MAX_BYTES) before its own is
    read, and is answered UNAVAILABLE, when to retry in RetryInfo, if none comes in time."""
    gateway = _gateway(tmp_path, env={"VIGIL_GATEWAY_MAX_BYTES": "1000",
                                      "VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT": "1500"})  # fmt: skip
    held = gateway.held

    async def calls() -> tuple[grpc.aio.AioRpcError, int, float, grpc.aio.AioRpcError]:
        port, serving = await _serving(gateway)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                export = channel.unary_unary(EXPORT)
                with held.request() as other:  # another request holds 600 of the 1,500
                    assert other.take(600)
                    call = asyncio.ensure_future(export(b"\x0a\xff\xff", metadata=KEYED))
                    await until(lambda: held.waiting > 0)  # the call waits for room for 1,000
                    waiting = held.waiting
                    await asyncio.sleep(0.3)
                    assert not call.done() and held.now == 600  # its message not taken
                # the other answered: the call's message is read (and it is not protobuf)
                with pytest.raises(grpc.aio.AioRpcError) as read:
                    await call
                assert held.now == 0 and not held.waiting
                with held.request() as other:
                    assert other.take(501)
                    started = asyncio.get_running_loop().time()
                    with pytest.raises(grpc.aio.AioRpcError) as busy:
                        await export(b"\x0a\xff\xff", metadata=KEYED, timeout=10)
                    waited = asyncio.get_running_loop().time() - started
        finally:
            await serving.stop(None)
        return read.value, waiting, waited, busy.value

    read, waiting, waited, busy = asyncio.run(calls())
    assert waiting == 1
    assert read.code() == grpc.StatusCode.INVALID_ARGUMENT and "protobuf" in (read.details() or "")
    assert busy.code() == grpc.StatusCode.UNAVAILABLE
    assert "VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT" in (busy.details() or "")
    said = dict(busy.trailing_metadata() or ())
    assert RetryInfo.FromString(said[RETRY_INFO]).retry_delay.seconds == 1
    assert ROOM_WAIT <= waited < ROOM_WAIT + 5
    assert gateway.metrics.busy == 1 and held.now == 0
    assert gateway.metrics.requests[(EXPORT, 400)] == 1
    assert gateway.metrics.requests[(EXPORT, 503)] == 1


def test_a_call_without_its_message_in_time_or_over_the_limit_is_answered_and_counted(
    tmp_path: Path,
) -> None:
    """A call whose message does not come within VIGIL_GATEWAY_BODY_TIMEOUT_SECONDS is ended
    DEADLINE_EXCEEDED (HTTP's 408), one with none or two INVALID_ARGUMENT, and one over
    VIGIL_GATEWAY_MAX_BYTES is refused by gRPC (RESOURCE_EXHAUSTED, no RetryInfo) and counted
    413 among the requests, which gRPC's own refusal was not; each gives its room back."""
    gateway = _gateway(tmp_path, env={"VIGIL_GATEWAY_MAX_BYTES": "1000",
                                      "VIGIL_GATEWAY_BODY_TIMEOUT_SECONDS": "0.5"})  # fmt: skip

    async def calls() -> list[tuple[grpc.StatusCode, str]]:
        port, serving = await _serving(gateway)
        said = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                # a stream of requests from the client's side: its message can be held back
                stream = channel.stream_unary(EXPORT)

                async def late() -> AsyncIterator[bytes]:
                    await asyncio.sleep(5)
                    yield b""

                async def none() -> AsyncIterator[bytes]:
                    return
                    yield b""

                async def two() -> AsyncIterator[bytes]:
                    yield b""
                    yield b""

                unary = channel.unary_unary(EXPORT)
                for call in (stream(late(), metadata=KEYED, timeout=10),
                             stream(none(), metadata=KEYED, timeout=10),
                             stream(two(), metadata=KEYED, timeout=10),
                             unary(b"x" * 1001, metadata=KEYED, timeout=10)):  # fmt: skip
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    said.append((refused.value.code(), refused.value.details() or ""))
        finally:
            await serving.stop(None)
        return said

    late, none, two, over = asyncio.run(calls())
    assert late == (grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the call's message did not arrive within 0.5 s")  # fmt: skip
    assert none == (grpc.StatusCode.INVALID_ARGUMENT, "the call carried no message")
    assert two == (grpc.StatusCode.INVALID_ARGUMENT,
                   "the call carried more than one message: Export takes one")  # fmt: skip
    assert over[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in over[1]
    requests = gateway.metrics.requests
    assert (requests[(EXPORT, 408)], requests[(EXPORT, 400)], requests[(EXPORT, 413)]) == (1, 2, 1)
    assert gateway.held.now == 0 and not gateway.held.waiting


def test_a_call_ended_by_its_client_while_it_waits_leaves_the_room_as_it_was(
    tmp_path: Path,
) -> None:
    """A call whose deadline passes (or that its client cancels) while it waits for room stops
    waiting, and takes nothing: room held for a call that is gone would be lost for good."""
    gateway = _gateway(tmp_path, env={"VIGIL_GATEWAY_MAX_BYTES": "1000",
                                      "VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT": "1500"})  # fmt: skip
    held = gateway.held

    async def calls() -> tuple[grpc.StatusCode, list[tuple[int, int]]]:
        port, serving = await _serving(gateway)
        seen = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                export = channel.unary_unary(EXPORT)
                with held.request() as other:
                    assert other.take(600)
                    with pytest.raises(grpc.aio.AioRpcError) as ended:
                        await export(b"", metadata=KEYED, timeout=0.3)
                    await until(lambda: held.waiting == 0, 1)  # heard soon after the client
                    seen.append((held.waiting, held.now))
                seen.append((held.waiting, held.now))
        finally:
            await serving.stop(None)
        return ended.value.code(), seen

    code, seen = asyncio.run(calls())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen == [(0, 600), (0, 0)]
