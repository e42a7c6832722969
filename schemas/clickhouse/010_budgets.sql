-- The budgets of vigil.yaml, as the dashboards need them next to the spend (burn-down against
-- the limit). `vigil migrate` and the worker replace the rows whenever they start.
CREATE TABLE IF NOT EXISTS vigil.budgets
(
    tenant_id   LowCardinality(String),
    team        LowCardinality(String),
    agent_id    LowCardinality(String),
    period      LowCardinality(String),
    limit_usd   Float64
)
ENGINE = MergeTree
ORDER BY (tenant_id, team, agent_id, period)
