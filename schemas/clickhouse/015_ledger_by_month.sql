-- The ledger is partitioned by month again, as DESIGN.md has it, not by (tenant, month) (007).
-- ClickHouse writes every partition an insert touches as a part of its own: with a partition per
-- tenant, a batch of 2,000 events of 30 tenants was 30 parts, and LedgerSink.write took 4 times
-- as long as for 3 tenants (680 against 152 us of CPU an event; the duplicate check 247 against 20
-- ms, the insert 669 against 130 ms). By month, 30 tenants cost what 3 do (docs/benchmarks.md).
-- Retention stays per tenant: its TTL deletes a tenant's expired rows wherever they are
-- (pipeline/ledger.py, Retention); vigil migrate and an embedded worker install it again on the
-- new table (apply_retention).
-- ClickHouse cannot change a partition key in place: a new table takes every row, then the name;
-- the old one is kept as vigil.audit_log_by_tenant_month (drop it once `vigil audit verify` is
-- OK on the new one). The two views that the ledger's inserts feed are made again on the new
-- table; views read vigil.audit_log by name. Run it with the workers stopped: what they stored
-- during the copy would stay in the old table only.
CREATE TABLE vigil.audit_log_by_month
(
    event_id            String,
    kind                LowCardinality(String),
    ts                  DateTime64(3, 'UTC'),
    tenant_id           LowCardinality(String),
    environment         LowCardinality(String),
    agent_id            LowCardinality(String),
    trace_id            String,
    span_id             String,
    session_id          String,
    unit_type           LowCardinality(String),
    unit_id             String,
    actor_user_id       String,
    actor_role          LowCardinality(String),
    attributes          Map(String, String),
    -- interaction
    provider            LowCardinality(String),
    model               LowCardinality(String),
    operation           LowCardinality(String),
    input_tokens        UInt64,
    output_tokens       UInt64,
    cache_read_tokens   UInt64,
    cache_write_tokens  UInt64,
    reasoning_tokens    UInt64,
    latency_ms          Nullable(Float64),
    status              LowCardinality(String),
    error_type          LowCardinality(String),
    finish_reason       LowCardinality(String),
    tool_name           LowCardinality(String),
    input_text          Nullable(String),
    output_text         Nullable(String),
    reported_cost_usd   Nullable(Decimal(18, 9)),
    -- cost (category is shared with drift's categorical sample)
    amount              Nullable(Decimal(18, 9)),
    currency            LowCardinality(String),
    category            LowCardinality(String),
    description         Nullable(String),
    -- drift / eval
    metric              LowCardinality(String),
    value               Nullable(Float64),
    score               Nullable(Float64),
    threshold           Nullable(Float64),
    dataset             LowCardinality(String),
    subject_event_id    String,
    -- decision
    decision            LowCardinality(String),
    reviewer_id         String,
    reason              Nullable(String),
    -- where the row came from
    source_topic        LowCardinality(String),
    source_partition    UInt32,
    source_offset       UInt64,
    ingested_at         DateTime64(3, 'UTC'),
    redactions          Array(Tuple(field String, type String, count UInt32)),
    cost_usd            Nullable(Decimal(18, 9)),
    cost_status         LowCardinality(String),
    price_version       LowCardinality(String),
    owner               String,
    team                LowCardinality(String),
    agent_registered    UInt8,
    -- the hash chain: one chain per (tenant, clean-topic partition, month of ts)
    chain_seq           UInt64,
    prev_hash           String,
    row_hash            String,
    INDEX idx_event_id event_id TYPE bloom_filter(0.00001) GRANULARITY 1,
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_unit_id unit_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_chain_seq chain_seq TYPE minmax GRANULARITY 1,
    PROJECTION chain_ends
    (
        SELECT tenant_id, source_partition, toYYYYMM(ts), max(chain_seq), argMax(row_hash, chain_seq)
        GROUP BY tenant_id, source_partition, toYYYYMM(ts)
    )
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant_id, ts, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- the chain ends projection (014) and the event_id filter (013) are in the new table's parts
-- as they are written
INSERT INTO vigil.audit_log_by_month SELECT * FROM vigil.audit_log
SETTINGS insert_deduplicate = 0, max_partitions_per_insert_block = 0;

DROP VIEW vigil.audit_chain_heads_mv;
DROP VIEW vigil.rollups_1m_mv;
RENAME TABLE vigil.audit_log TO vigil.audit_log_by_tenant_month, vigil.audit_log_by_month TO vigil.audit_log;

CREATE MATERIALIZED VIEW vigil.audit_chain_heads_mv TO vigil.audit_chain_heads AS
SELECT
    tenant_id,
    source_partition AS chain_partition,
    toYYYYMM(ts) AS chain_month,
    max(chain_seq) AS head_seq,
    argMaxState(row_hash, chain_seq) AS head_hash
FROM vigil.audit_log
GROUP BY tenant_id, chain_partition, chain_month;

CREATE MATERIALIZED VIEW vigil.rollups_1m_mv TO vigil.rollups_1m AS
SELECT
    toStartOfMinute(ts) AS window_start,
    tenant_id,
    agent_id,
    model,
    unit_type,
    count() AS events,
    countIf(kind = 'interaction') AS interactions,
    countIf(status = 'error') AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(toDecimal128(ifNull(cost_usd, 0), 9)) AS cost_usd,
    quantilesStateIf(0.5, 0.95, 0.99)(ifNull(latency_ms, 0), latency_ms IS NOT NULL) AS latency_ms
FROM vigil.audit_log
GROUP BY window_start, tenant_id, agent_id, model, unit_type;
