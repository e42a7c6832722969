-- One row per clean event, all kinds. Append-only: the pipeline only ever INSERTs here.
CREATE TABLE IF NOT EXISTS vigil.audit_log
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
    INDEX idx_event_id event_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant_id, ts, event_id)
SETTINGS non_replicated_deduplication_window = 10000
