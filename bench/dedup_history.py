"""What the ledger's duplicate check costs as the ledger grows, and what two alternatives would.

Before every insert the ledger asks which of the batch's (tenant, event_id) keys are stored
already (``sink.stored_in_scopes``). This measures that question for 5,000 keys that are not
stored (the usual case: fresh events) against a ledger of growing history, spread over three
tenants and about two months, merged to one part per partition as it would be after a while.
Printed as keys/s and as a ratio against the smallest history, measured in the same run.

    .venv/bin/python -m bench.dedup_history
"""

from __future__ import annotations

import tempfile
import uuid

from bench import best_seconds
from pipeline.sink import stored_in_scopes
from pipeline.store import connect, migrate

HISTORY = (200_000, 1_000_000, 3_000_000, 7_000_000)
KEYS = 5_000
# the two ways out in docs/benchmarks.md, measured beside the check as it is: a key table
# ordered by (tenant_id, event_id) with small granules, and the check within a live batch's
# span of ts (its events of the last 10 minutes)
KEY_TABLE = (
    "CREATE TABLE vigil.bench_keys (tenant_id LowCardinality(String), event_id String) "
    "ENGINE = MergeTree ORDER BY (tenant_id, event_id) SETTINGS index_granularity = 1024"
)
LIVE_SPAN = "ts >= now64(3) - toIntervalMinute(10)"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vigil-dedup-") as tmp:
        store = connect(f"chdb://{tmp}/store")
        migrate(store)
        store.command(KEY_TABLE)
        keys = {("acme", uuid.uuid4().hex) for _ in range(KEYS)}
        stored = 0
        baseline = None
        print(f"duplicate check of {KEYS:,} fresh keys of one tenant (of three) against:")
        for total in HISTORY:
            store.command(
                "INSERT INTO vigil.audit_log (tenant_id, event_id, ts) "
                "SELECT ['acme', 'globex', 'initech'][number % 3 + 1], "
                "hex(sipHash128(number)), now64(3) - toIntervalSecond(number % 5000000) "
                f"FROM numbers({stored}, {total - stored}) "
                "SETTINGS max_partitions_per_insert_block = 0"
            )
            store.command(
                "INSERT INTO vigil.bench_keys SELECT tenant_id, event_id FROM vigil.audit_log "
                f"WHERE event_id IN (SELECT hex(sipHash128(number)) FROM numbers({stored}, "
                f"{total - stored}))"
            )
            stored = total
            store.command("OPTIMIZE TABLE vigil.audit_log FINAL")
            store.command("OPTIMIZE TABLE vigil.bench_keys FINAL")
            seconds = best_seconds(
                lambda: stored_in_scopes(store, "vigil.audit_log", "event_id", "tenant_id", keys)
            )
            rate = KEYS / seconds
            baseline = baseline or rate
            table = best_seconds(
                lambda: stored_in_scopes(store, "vigil.bench_keys", "event_id", "tenant_id", keys)
            )
            span = best_seconds(
                lambda: stored_in_scopes(
                    store, "vigil.audit_log", "event_id", "tenant_id", keys, LIVE_SPAN
                )
            )
            print(
                f"  {total:>9,} rows: {seconds * 1000:7.1f} ms, {rate:>9,.0f} keys/s, "
                f"{rate / baseline:.2f}x the {HISTORY[0]:,}-row ledger; "
                f"key table {table * 1000:.1f} ms, live span {span * 1000:.1f} ms",
                flush=True,
            )
        store.close()


if __name__ == "__main__":
    main()
