-- What each alert webhook route was owed and got (pipeline/alerting.py, Notifier): a `pending`
-- row for each alert and route it matches, stored before the alert is; then `delivered` once
-- the webhook answered 2xx, or `given_up` once VIGIL_ALERT_DELIVERY_HOURS passed without (or the
-- route is gone). An alert's state for a route is the greatest of its rows'. The worker posts
-- again, every VIGIL_ALERT_SWEEP_SECONDS, what is still pending: across restarts, nothing owed
-- is dropped. `route` is the route's `name`, or a digest of its webhook (never the URL: a
-- Slack webhook's path is a secret); `body` is the alert's JSON, on pending rows only.
CREATE TABLE IF NOT EXISTS vigil.alert_deliveries
(
    alert_id   String,
    route      LowCardinality(String),
    tenant_id  LowCardinality(String),
    fired_at   DateTime64(3, 'UTC'),
    state      Enum8('pending' = 1, 'delivered' = 2, 'given_up' = 3),
    at         DateTime64(3, 'UTC'),
    body       String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(fired_at)
ORDER BY (alert_id, route, state)
SETTINGS non_replicated_deduplication_window = 10000;
