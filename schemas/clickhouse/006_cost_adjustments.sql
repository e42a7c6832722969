-- Repricing history under another catalog: the ledger itself is never changed; each difference
-- is recorded here, once per (event, catalog version).
CREATE TABLE IF NOT EXISTS vigil.cost_adjustments
(
    adjustment_id   String,
    event_id        String,
    ts              DateTime64(3, 'UTC'),
    tenant_id       LowCardinality(String),
    agent_id        LowCardinality(String),
    model           LowCardinality(String),
    old_cost_usd    Nullable(Decimal(18, 9)),
    new_cost_usd    Nullable(Decimal(18, 9)),
    delta_usd       Decimal(18, 9),
    old_version     LowCardinality(String),
    new_version     LowCardinality(String),
    computed_at     DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant_id, new_version, ts, event_id)
SETTINGS non_replicated_deduplication_window = 10000
