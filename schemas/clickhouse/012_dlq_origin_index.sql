-- The DLQ's duplicate check (pipeline/sink.py, DlqSink) looks a dead letter's id up only among
-- letters from the same place: its origin topic, partition and range of offsets. A letter's id is
-- derived from that place, so every copy of it is found there. This index lets the check skip
-- the granules of other offsets, so it no longer reads the whole DLQ. The letters stored before
-- it get it too; the migration waits until they have.
ALTER TABLE vigil.dlq ADD INDEX IF NOT EXISTS idx_origin_offset origin_offset TYPE minmax GRANULARITY 1;
ALTER TABLE vigil.dlq MATERIALIZE INDEX idx_origin_offset SETTINGS mutations_sync = 2;
