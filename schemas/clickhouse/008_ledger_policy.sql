-- Which retention policy (the TTL statement built from vigil.yaml) is installed on the ledger,
-- so the worker re-applies it only when vigil.yaml changed: a MODIFY TTL rewrites TTL data.
CREATE TABLE IF NOT EXISTS vigil.ledger_policy
(
    statement_sha256 String,
    statement        String,
    applied_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
ORDER BY applied_at
