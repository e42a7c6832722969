-- Spend by tenant, team, agent, model and day.
CREATE VIEW IF NOT EXISTS vigil.spend_daily AS
SELECT
    toDate(ts) AS day,
    tenant_id,
    team,
    agent_id,
    model,
    count() AS events,
    sum(cost_usd) AS cost_usd,
    countIf(cost_status = 'unknown_model') AS unpriced_events
FROM vigil.audit_log
GROUP BY day, tenant_id, team, agent_id, model;

-- One row per unit of work (ticket, document, claim...): what it cost in all.
CREATE VIEW IF NOT EXISTS vigil.unit_costs AS
SELECT
    tenant_id,
    agent_id,
    unit_type,
    unit_id,
    min(ts) AS started_at,
    max(ts) AS last_at,
    count() AS events,
    sum(ifNull(cost_usd, 0)) AS cost_usd,
    countIf(cost_status = 'unknown_model') AS unpriced_events
FROM vigil.audit_log
WHERE unit_id != ''
GROUP BY tenant_id, agent_id, unit_type, unit_id;

-- Cost per unit of work, per unit type and agent: units, total, mean, p50, p95.
CREATE VIEW IF NOT EXISTS vigil.unit_cost_summary AS
SELECT
    tenant_id,
    unit_type,
    agent_id,
    count() AS units,
    sum(cost_usd) AS total_usd,
    avg(toFloat64(cost_usd)) AS mean_usd,
    quantile(0.5)(toFloat64(cost_usd)) AS p50_usd,
    quantile(0.95)(toFloat64(cost_usd)) AS p95_usd
FROM vigil.unit_costs
GROUP BY tenant_id, unit_type, agent_id
