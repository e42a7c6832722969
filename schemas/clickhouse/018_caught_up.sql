-- The times before which a store worker's lag samples showed every event sent to have been
-- evaluated (pipeline/alerting.py, CaughtUp): stored before its evaluator is told of one, so a
-- rebuild of the alert state is told of the latest, and `vigil alerts backtest --since` of
-- each. `at` is the sample that showed it. Kept for 30 days, as the samples are.
CREATE TABLE IF NOT EXISTS vigil.caught_up
(
    at              DateTime64(3, 'UTC'),
    consumer_group  LowCardinality(String),
    caught_up       DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (consumer_group, caught_up)
TTL toDateTime(at) + INTERVAL 30 DAY
