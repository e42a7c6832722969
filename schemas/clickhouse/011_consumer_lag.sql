-- How far the worker's consumer group is behind each partition, sampled by the worker every
-- 30 seconds (pipeline/lag.py), for the pipeline-health dashboard. Kept for 30 days.
CREATE TABLE IF NOT EXISTS vigil.consumer_lag
(
    at              DateTime64(3, 'UTC'),
    consumer_group  LowCardinality(String),
    topic           LowCardinality(String),
    partition       UInt32,
    committed       Int64,
    end_offset      Int64,
    lag             Int64
)
ENGINE = MergeTree
ORDER BY (consumer_group, topic, partition, at)
TTL toDateTime(at) + INTERVAL 30 DAY
