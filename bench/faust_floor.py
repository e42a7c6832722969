"""The floor under any Faust agent: how fast one do-nothing agent takes a topic.

    python -m bench.faust_floor BOOTSTRAP TOPIC EVENTS

Consumes TOPIC from the start with the worker's own consumer (``WorkerApp``) and consumption
pattern (``noack_take`` in batches, every event acknowledged) and nothing else, then prints
``events_per_s=N`` and exits. ``--stock`` uses Faust's own ``faust.App`` instead.
The worker's ledger and DLQ agents read this way. Its ledger pays the floor once per clean
message, an EventBatch of many events. The raw topic holds one event per message, and the
floor there cost more than validation itself, so validate reads raw with confluent-kafka in
batches (``pipeline.batchconsumer``) instead.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Any

import faust
from faust.worker import Worker

from pipeline.worker import WorkerApp

BATCH = 5000


def main(bootstrap: str, topic: str, events: int, stock: bool = False) -> None:
    app_type = faust.App if stock else WorkerApp
    datadir = tempfile.mkdtemp(prefix="vigil-faust-floor-")
    app = app_type(
        f"bench-faust-floor-{os.getpid()}",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=datadir,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        topic_allow_declare=False,
        topic_disable_leader=True,
        stream_wait_empty=False,
    )
    source = app.topic(topic, key_type=bytes, value_type=bytes)
    seen = 0
    started = 0.0

    @app.agent(source, concurrency=1)
    async def take(stream: Any) -> None:
        nonlocal seen, started
        async for batch in stream.noack_take(BATCH, within=0.5):
            if not started:  # from the first batch: the group join is not throughput
                started = time.perf_counter()
            else:
                seen += len(batch)
            for event in batch:
                await stream.ack(event)
            if seen + BATCH >= events:
                sys.stdout.write(f"events_per_s={seen / (time.perf_counter() - started):.0f}\n")
                sys.stdout.flush()
                shutil.rmtree(datadir, ignore_errors=True)  # _exit runs no clean-up
                os._exit(0)  # the figure is out; Faust's orderly shutdown adds nothing to it

    Worker(app, loglevel="ERROR", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), stock="--stock" in sys.argv[4:])
