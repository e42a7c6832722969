-- Every rejected input, with the raw bytes exactly as received and a reason a person can act on.
CREATE TABLE IF NOT EXISTS vigil.dlq
(
    dlq_id              String,
    stage               LowCardinality(String),
    reason_code         LowCardinality(String),
    reason              String,
    origin_topic        LowCardinality(String),
    origin_partition    UInt32,
    origin_offset       UInt64,
    origin_key          String,
    tenant_hint         LowCardinality(String),
    event_id_hint       String,
    payload             String,
    payload_bytes       UInt32,
    received_at         DateTime64(3, 'UTC'),
    stored_at           DateTime64(3, 'UTC'),
    INDEX idx_dlq_id dlq_id TYPE bloom_filter(0.001) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (received_at, dlq_id)
SETTINGS non_replicated_deduplication_window = 10000
