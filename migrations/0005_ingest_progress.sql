-- How far into a spool the stored data goes: the writer sets stored_seq in
-- the same transaction as the rows of the messages up to it, so after a
-- crash the spool's replay skips what is already stored even when the
-- spool's own checkpoint lagged behind. Keyed by the spool's identity, so a
-- new spool (its directory wiped) never inherits another's position.
CREATE TABLE ingest_progress (
    spool_id   text        PRIMARY KEY,
    stored_seq bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
