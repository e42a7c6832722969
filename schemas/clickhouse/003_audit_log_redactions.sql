-- What the redact stage found in each event: (field, type, count), never the value.
ALTER TABLE vigil.audit_log
    ADD COLUMN IF NOT EXISTS redactions Array(Tuple(field String, type String, count UInt32))
