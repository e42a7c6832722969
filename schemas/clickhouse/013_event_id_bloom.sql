-- The ledger's duplicate check (pipeline/sink.py, LedgerSink) asks for a whole batch's event ids
-- at once, 1,000 to 2,000 of them, among the granules within the dedup window. A granule's bloom
-- filter at 0.001 let at least one of 1,000 absent ids through about 67% of the time, so the
-- check read most of the window, more with every minute of it. At 0.00001 (ClickHouse caps a
-- filter's bits per row there: 0.000001 builds the same) about 10%. The filter grows by about
-- half a byte a row (docs/benchmarks.md). The events stored before it get it too; the migration
-- waits until they have.
ALTER TABLE vigil.audit_log DROP INDEX IF EXISTS idx_event_id;
ALTER TABLE vigil.audit_log ADD INDEX IF NOT EXISTS idx_event_id event_id TYPE bloom_filter(0.00001) GRANULARITY 1;
ALTER TABLE vigil.audit_log MATERIALIZE INDEX idx_event_id SETTINGS mutations_sync = 2;
