-- Alerts as they fired (pipeline/alerts.py), once each: alert_id is derived from what fired,
-- so a re-evaluation after a restart replaces rather than repeats.
CREATE TABLE IF NOT EXISTS vigil.alerts
(
    alert_id            String,
    kind                LowCardinality(String),
    severity            LowCardinality(String),
    tenant_id           LowCardinality(String),
    team                LowCardinality(String),
    agent_id            LowCardinality(String),
    metric              LowCardinality(String),
    fired_at            DateTime64(3, 'UTC'),
    observed            Float64,
    threshold           Float64,
    predicted_breach_at Nullable(DateTime64(3, 'UTC')),
    message             String,
    stored_at           DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(fired_at)
ORDER BY (tenant_id, fired_at, alert_id);

-- One-minute rollups per (tenant, agent, model, unit type), kept by the ledger's own inserts so
-- every stored event is counted exactly once, crashes and retries included.
CREATE TABLE IF NOT EXISTS vigil.rollups_1m
(
    window_start        DateTime('UTC'),
    tenant_id           LowCardinality(String),
    agent_id            LowCardinality(String),
    model               LowCardinality(String),
    unit_type           LowCardinality(String),
    events              SimpleAggregateFunction(sum, UInt64),
    interactions        SimpleAggregateFunction(sum, UInt64),
    errors              SimpleAggregateFunction(sum, UInt64),
    input_tokens        SimpleAggregateFunction(sum, UInt64),
    output_tokens       SimpleAggregateFunction(sum, UInt64),
    cache_read_tokens   SimpleAggregateFunction(sum, UInt64),
    cache_write_tokens  SimpleAggregateFunction(sum, UInt64),
    reasoning_tokens    SimpleAggregateFunction(sum, UInt64),
    cost_usd            SimpleAggregateFunction(sum, Decimal(38, 9)),
    latency_ms          AggregateFunction(quantiles(0.5, 0.95, 0.99), Float64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(window_start)
ORDER BY (tenant_id, agent_id, model, unit_type, window_start)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS vigil.rollups_1m_mv TO vigil.rollups_1m AS
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
GROUP BY window_start, tenant_id, agent_id, model, unit_type
