-- The ledger becomes tamper-evident and expires per tenant (pipeline/ledger.py).
-- Partitioning moves to (tenant, month) so retention drops whole partitions of one tenant, and
-- every row carries its link in a hash chain. ClickHouse cannot change a partition key in
-- place, so the unchained table of 001-004 is kept, renamed, and a new one takes its name.
-- Views read vigil.audit_log by name and so read the new table.
RENAME TABLE vigil.audit_log TO vigil.audit_log_unchained;

CREATE TABLE vigil.audit_log
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
    INDEX idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_unit_id unit_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_chain_seq chain_seq TYPE minmax GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY (tenant_id, toYYYYMM(ts))
ORDER BY (tenant_id, ts, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- The last link of every chain, kept by the insert itself. The writer starts from here (and
-- confirms against audit_log); the verifier uses it to see a chain whose tail was cut off.
CREATE TABLE vigil.audit_chain_heads
(
    tenant_id       LowCardinality(String),
    chain_partition UInt32,
    chain_month     UInt32,
    head_seq        SimpleAggregateFunction(max, UInt64),
    head_hash       AggregateFunction(argMax, String, UInt64)
)
ENGINE = AggregatingMergeTree
ORDER BY (tenant_id, chain_partition, chain_month);

CREATE MATERIALIZED VIEW vigil.audit_chain_heads_mv TO vigil.audit_chain_heads AS
SELECT
    tenant_id,
    source_partition AS chain_partition,
    toYYYYMM(ts) AS chain_month,
    max(chain_seq) AS head_seq,
    argMaxState(row_hash, chain_seq) AS head_hash
FROM vigil.audit_log
GROUP BY tenant_id, chain_partition, chain_month
