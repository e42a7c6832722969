-- What each event cost and whose it is (the enrich stage). cost_usd is NULL when the cost
-- cannot be known (cost_status says why: unknown_model, unconverted); price_version names the
-- catalog it was priced with, so history can be repriced.
ALTER TABLE vigil.audit_log
    ADD COLUMN IF NOT EXISTS cost_usd Nullable(Decimal(18, 9)),
    ADD COLUMN IF NOT EXISTS cost_status LowCardinality(String),
    ADD COLUMN IF NOT EXISTS price_version LowCardinality(String),
    ADD COLUMN IF NOT EXISTS owner String,
    ADD COLUMN IF NOT EXISTS team LowCardinality(String),
    ADD COLUMN IF NOT EXISTS agent_registered UInt8
