"""An OTLP/HTTP export waits for room among the bytes the gateway holds
(VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT) before its body is read, and is answered 503 if none comes
within ``ROOM_WAIT``: the gateway served by aiohttp on 127.0.0.1, answering before Kafka would
be asked. gRPC's calls: tests/unit/test_otlp_grpc.py; the whole, with a broker:
tests/integration/test_gateway.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from pipeline.gateway import ROOM_WAIT
from pipeline.services import free_port
from tests.unit.test_otlp_grpc import ON, _gateway, until

NOT_PROTOBUF = b"\x0a\xff\xff" + b"x" * 597  # 600 bytes, read only to be refused (400)
HEADERS = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {ON}"}


def test_an_export_waits_for_room_before_its_body_is_read_or_is_told_to_retry(
    tmp_path: Path,
) -> None:
    """A burst of HTTP clients was answered 503 the moment the bytes held were full, each then
    waiting a whole second (Retry-After) and sending its body again, where room came sooner."""
    gateway = _gateway(tmp_path, env={"VIGIL_GATEWAY_MAX_BYTES": "1000",
                                      "VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT": "1000"})  # fmt: skip
    held = gateway.held

    async def exports() -> tuple[int, int, tuple[int, str | None, str], float]:
        runner = web.AppRunner(gateway.app())
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}/v1/traces"
        try:
            async with aiohttp.ClientSession() as client:
                with held.request() as other:  # another request holds 500 of the 1,000
                    assert other.take(500)
                    post = asyncio.ensure_future(client.post(url, data=NOT_PROTOBUF,
                                                             headers=HEADERS))  # fmt: skip
                    await until(lambda: held.waiting > 0)
                    waiting = held.waiting
                    await asyncio.sleep(0.3)
                    assert not post.done() and held.now == 500  # its 600 not taken
                # the other answered: the body is read (and it is not protobuf)
                async with await post as read:
                    status = read.status
                assert held.now == 0 and not held.waiting
                with held.request() as other:
                    assert other.take(401)
                    started = asyncio.get_running_loop().time()
                    async with client.post(url, data=NOT_PROTOBUF, headers=HEADERS) as refused:
                        busy = (refused.status, refused.headers.get("Retry-After"),
                                await refused.text())  # fmt: skip
                    waited = asyncio.get_running_loop().time() - started
        finally:
            await runner.cleanup()
        return waiting, status, busy, waited

    waiting, status, busy, waited = asyncio.run(exports())
    assert waiting == 1 and status == 400
    assert busy[:2] == (503, "1") and "VIGIL_GATEWAY_MAX_BYTES_IN_FLIGHT" in busy[2]
    assert ROOM_WAIT <= waited < ROOM_WAIT + 5
    assert gateway.metrics.busy == 1 and held.now == 0
    assert gateway.metrics.requests[("/v1/traces", 400)] == 1
    assert gateway.metrics.requests[("/v1/traces", 503)] == 1
