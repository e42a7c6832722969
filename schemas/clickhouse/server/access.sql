-- Access control for a ClickHouse server (the embedded engine has none). `vigil migrate`
-- applies this file after the numbered migrations when VIGIL_CLICKHOUSE_DSN is http(s)://,
-- and then one reader role and row policy per tenant in vigil.yaml (pipeline/access.py).
--
-- The ledger is append-only by construction: no role below may ALTER, DELETE, UPDATE,
-- TRUNCATE or DROP vigil.audit_log. Run the worker as a user granted vigil_writer only; keep
-- the administrative user that runs `vigil migrate` for migrations.
CREATE ROLE IF NOT EXISTS vigil_writer;
CREATE ROLE IF NOT EXISTS vigil_auditor;
CREATE ROLE IF NOT EXISTS vigil_reader;

-- the worker appends and reads back what it needs for idempotence, chain heads and the
-- alert state (and which alerts it has raised); it checks that the schema is
-- migrated, and changes no schema itself
GRANT SELECT ON vigil.schema_migrations TO vigil_writer;
GRANT SELECT, INSERT ON vigil.audit_log TO vigil_writer;
GRANT SELECT, INSERT ON vigil.dlq TO vigil_writer;
GRANT SELECT, INSERT ON vigil.alerts TO vigil_writer;
-- and which alerts each webhook was owed and got (pipeline/alerting.py, Notifier)
GRANT SELECT, INSERT ON vigil.alert_deliveries TO vigil_writer;
-- and the lag samples it takes, for the health dashboard
GRANT INSERT ON vigil.consumer_lag TO vigil_writer;
-- and when its lag samples found the pipeline caught up: a rebuild reads the latest
GRANT SELECT, INSERT ON vigil.caught_up TO vigil_writer;
-- the tables the ledger's materialized views fill from the writer's inserts
GRANT INSERT ON vigil.audit_chain_heads TO vigil_writer;
GRANT INSERT ON vigil.rollups_1m TO vigil_writer;
-- granted by earlier releases, whose writer read the chain heads from this table
REVOKE SELECT ON vigil.audit_chain_heads FROM vigil_writer;
-- `vigil cost reprice` records its differences, never changing the ledger
GRANT SELECT, INSERT ON vigil.cost_adjustments TO vigil_writer;

-- compliance reads every tenant; tenants' readers are limited to their rows by the policies
GRANT SELECT ON vigil.* TO vigil_auditor;
GRANT SELECT ON vigil.audit_log TO vigil_reader;
GRANT SELECT ON vigil.spend_daily TO vigil_reader;
GRANT SELECT ON vigil.unit_costs TO vigil_reader;
GRANT SELECT ON vigil.unit_cost_summary TO vigil_reader;

-- once a table has row policies, a role without one sees no rows: these see them all
CREATE ROW POLICY IF NOT EXISTS vigil_all_rows ON vigil.audit_log FOR SELECT USING 1 TO vigil_writer, vigil_auditor
