-- A page given up on can be owed again (`vigil alerts redeliver`): a new round of rows for the
-- alert and route, its `pending` row carrying the body and the time the round began. A
-- delivery's state is the greatest state of its latest round, max((round, state)), so no
-- clock order between workers matters in a round either. Rows before this migration are round 0.
ALTER TABLE vigil.alert_deliveries
    ADD COLUMN IF NOT EXISTS round UInt16 DEFAULT 0
