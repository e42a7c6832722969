"""What the ledger's duplicate check costs as the ledger grows.

Before every insert the ledger asks which of the batch's (tenant, event_id) keys are stored
already (``sink.stored_in_scopes``), among stored events within the dedup window of the batch's
own times (``sink.DEDUP_WINDOW``). This asks it for 5,000 keys that are not stored (the usual
case: fresh events) against a ledger of growing history: three tenants at 1,000 events/s in
all, up to now, merged to one part per partition as it would be after a while. Three batches:
- live: the 5,000 keys' times within the last 5 s, the ledger's check as it runs;
- backfill: the same keys with times spread over the whole history (every window overlaps the
  next, so the check reads the tenant's whole history);
- whole history: the check as it was before the window, against every stored event.
Printed as keys/s and as a ratio against the smallest history, measured in the same run.

Then the same for the DLQ (``DlqSink``), which looks a letter's id up among the letters of its
origin topic, partition and range of offsets: 1,000 letters against a DLQ of growing size (100
letters a second from four raw partitions, each letter 25 offsets after the last of its
partition), for fresh letters, for the last 1,000 letters again (a re-read after a crash), and
against the whole DLQ as it was asked before.

    .venv/bin/python -m bench.dedup_history
"""

from __future__ import annotations

import tempfile
import time
import uuid
from functools import partial

from bench import best_seconds, use_work_dir
from pipeline.sink import (
    DEDUP_WINDOW,
    origin_condition,
    stored_in_scopes,
    ts_condition,
    ts_ranges,
)
from pipeline.store import Store, connect, migrate

HISTORY = (200_000, 1_000_000, 7_000_000, 20_000_000)
RATE = 1_000  # events/s of the history, all tenants
KEYS = 5_000
TENANTS = ("acme", "globex", "initech")
DLQ_HISTORY = (100_000, 1_000_000, 5_000_000)
LETTERS = 1_000


def main() -> None:
    print(f"temporary files in {use_work_dir()}")
    window_ms = DEDUP_WINDOW.total_seconds() * 1000
    with tempfile.TemporaryDirectory(prefix="vigil-dedup-") as tmp:
        store = connect(f"chdb://{tmp}/store")
        migrate(store)
        now_ms = int(time.time() * 1000)
        keys = {(TENANTS[0], uuid.uuid4().hex) for _ in range(KEYS)}
        live = ts_condition(ts_ranges(range(now_ms - 5_000, now_ms, 1_000), int(window_ms)))
        stored = 0
        baseline: dict[str, float] = {}
        print(
            f"duplicate check of {KEYS:,} fresh keys of one tenant (of {len(TENANTS)}, "
            f"{RATE:,} events/s in all; dedup window {DEDUP_WINDOW}) against:"
        )
        for total in HISTORY:
            store.command(
                "INSERT INTO vigil.audit_log (tenant_id, event_id, ts) "
                f"SELECT {list(TENANTS)}[number % {len(TENANTS)} + 1], hex(sipHash128(number)), "
                f"fromUnixTimestamp64Milli(toInt64({now_ms} - number * {1000 // RATE}), 'UTC') "
                f"FROM numbers({stored}, {total - stored}) "
                "SETTINGS max_partitions_per_insert_block = 0"
            )
            stored = total
            store.command("OPTIMIZE TABLE vigil.audit_log FINAL")
            span = range(now_ms - total * 1000 // RATE, now_ms, max(1, int(window_ms)))
            backfill = ts_condition(ts_ranges(span, int(window_ms)))
            figures = {}
            for name, where in (("live", live), ("backfill", backfill), ("whole", "")):
                seconds = best_seconds(
                    partial(
                        stored_in_scopes,
                        store, "vigil.audit_log", "event_id", "tenant_id", keys, "",
                        {TENANTS[0]: where} if where else None,
                    )
                )  # fmt: skip
                baseline.setdefault(name, seconds)
                figures[name] = (
                    f"{seconds * 1000:6.1f} ms ({KEYS / seconds:>7,.0f} keys/s, "
                    f"{baseline[name] / seconds:.2f}x)"
                )
            print(
                f"  {total:>10,} rows ({total / RATE / 3600:4.1f} h): live {figures['live']}; "
                f"backfill {figures['backfill']}; whole history {figures['whole']}",
                flush=True,
            )
        dlq(store, now_ms)
        store.close()


def dlq(store: Store, now_ms: int) -> None:
    stored = 0
    baseline: dict[str, float] = {}
    print(f"duplicate check of {LETTERS:,} dead letters against:")
    for total in DLQ_HISTORY:
        store.command(
            "INSERT INTO vigil.dlq (dlq_id, origin_topic, origin_partition, origin_offset, "
            "received_at) SELECT hex(sipHash128(number)), 'vigil.events.raw', number % 4, "
            "intDiv(number, 4) * 25, fromUnixTimestamp64Milli(toInt64("
            f"{now_ms - DLQ_HISTORY[-1] * 10} + number * 10), 'UTC') "
            f"FROM numbers({stored}, {total - stored})"
        )
        stored = total
        store.command("OPTIMIZE TABLE vigil.dlq FINAL")
        fresh = [(uuid.uuid4().hex, i % 4, (total // 4 + i // 4) * 25) for i in range(LETTERS)]
        last = [
            (str(i), int(p), int(o))
            for i, p, o in store.query_rows(
                "SELECT dlq_id, origin_partition, origin_offset FROM vigil.dlq "
                f"ORDER BY received_at DESC LIMIT {LETTERS}"
            )
        ]
        figures = {}
        for name, letters, by_origin in (
            ("fresh", fresh, True),
            ("re-read", last, True),
            ("whole", fresh, False),
        ):
            keys = {("", dlq_id) for dlq_id, _, _ in letters}
            where = origin_condition(("vigil.events.raw", p, o) for _, p, o in letters)
            seconds = best_seconds(
                partial(
                    stored_in_scopes,
                    store,
                    "vigil.dlq",
                    "dlq_id",
                    None,
                    keys,
                    where if by_origin else "",
                )
            )
            baseline.setdefault(name, seconds)
            figures[name] = f"{seconds * 1000:6.1f} ms ({baseline[name] / seconds:.2f}x)"
        print(
            f"  {total:>10,} letters: fresh {figures['fresh']}; re-read {figures['re-read']}; "
            f"whole DLQ {figures['whole']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
