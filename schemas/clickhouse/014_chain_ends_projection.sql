-- Where each chain ends, kept inside every part of the ledger. The writer asks where the chains
-- of a batch end before it links the batch (pipeline/ledger.py, chain_heads). It read the heads
-- table (007) and then confirmed it against audit_log, since an insert can land in audit_log and
-- fail in the heads table's view. The confirmation read every granule whose chain_seq range
-- reached the lowest head of the batch's chains; a granule mixes chains, so a slow chain's head
-- let a fast chain's history through, about a fifth of the table a batch, and more with every
-- minute (docs/benchmarks.md). A projection is written with its part, in the same insert, so it
-- cannot miss one: one query of it replaces both. The heads table stays for the verifier.
-- The parts stored before it get it too; the migration waits until they have.
ALTER TABLE vigil.audit_log ADD PROJECTION IF NOT EXISTS chain_ends
(
    SELECT tenant_id, source_partition, toYYYYMM(ts), max(chain_seq), argMax(row_hash, chain_seq)
    GROUP BY tenant_id, source_partition, toYYYYMM(ts)
);
ALTER TABLE vigil.audit_log MATERIALIZE PROJECTION chain_ends SETTINGS mutations_sync = 2;
