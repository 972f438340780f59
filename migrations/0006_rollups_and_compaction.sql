-- Rollups, per-partition point indexes, and per-writer progress.
--
-- 1. 1-minute and 1-hour aggregates per series. The writer merges each
--    batch's partial aggregates into them in the batch's own transaction
--    (ingest/src/rollup.rs), so they are always exactly the aggregate of the
--    stored points, late and out-of-order ones included. `first`/`last` are
--    the values at the earliest/latest time; equal times are ordered by
--    value, so the result never depends on arrival order. Both tables are
--    range-partitioned on `bucket` like points (partitions made by the
--    writer, retention by dropping them).
-- 2. The btree on points (series_id, time) moves from the partitioned parent
--    to each partition, so that compaction can replace it, partition by
--    partition, with a BRIN index once the partition's rows are sorted
--    (ingest/src/compaction.rs). A parent-level index would force the btree
--    on every partition.
-- 3. ingest_progress gains a writer shard: with several writer
--    connections, each records how far its own rows go.

CREATE FUNCTION sluice_make_partitions(parent text, width interval, times timestamptz[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    lower timestamptz;
BEGIN
    FOR lower IN SELECT DISTINCT date_bin(width, t, timestamptz '1970-01-01 00:00:00+00')
                 FROM unnest(times) AS t LOOP
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
            parent || '_p' || to_char(lower AT TIME ZONE 'UTC', 'YYYYMMDD_HH24MI'),
            parent, lower, lower + width);
    END LOOP;
END $$;

CREATE TABLE rollup_1m (
    series_id  integer          NOT NULL,
    bucket     timestamptz      NOT NULL,
    count      bigint           NOT NULL,
    sum        double precision NOT NULL,
    min        double precision NOT NULL,
    max        double precision NOT NULL,
    first_time timestamptz      NOT NULL,
    first      double precision NOT NULL,
    last_time  timestamptz      NOT NULL,
    last       double precision NOT NULL,
    PRIMARY KEY (series_id, bucket)
) PARTITION BY RANGE (bucket);

CREATE TABLE rollup_1h (
    series_id  integer          NOT NULL,
    bucket     timestamptz      NOT NULL,
    count      bigint           NOT NULL,
    sum        double precision NOT NULL,
    min        double precision NOT NULL,
    max        double precision NOT NULL,
    first_time timestamptz      NOT NULL,
    first      double precision NOT NULL,
    last_time  timestamptz      NOT NULL,
    last       double precision NOT NULL,
    PRIMARY KEY (series_id, bucket)
) PARTITION BY RANGE (bucket);

-- Points stored before this migration get their rollups now. Partition
-- widths are the defaults of ingest.partitions (7 and 30 days).
SELECT sluice_make_partitions('rollup_1m', interval '168 hours',
    array(SELECT DISTINCT date_bin('1 minute', time, timestamptz '1970-01-01 00:00:00+00') FROM points));
SELECT sluice_make_partitions('rollup_1h', interval '720 hours',
    array(SELECT DISTINCT date_bin('1 hour', time, timestamptz '1970-01-01 00:00:00+00') FROM points));
INSERT INTO rollup_1m
SELECT series_id, date_bin('1 minute', time, timestamptz '1970-01-01 00:00:00+00'),
       count(*), sum(value), min(value), max(value),
       min(time), (array_agg(value ORDER BY time, value))[1],
       max(time), (array_agg(value ORDER BY time DESC, value DESC))[1]
FROM points GROUP BY 1, 2;
INSERT INTO rollup_1h
SELECT series_id, date_bin('1 hour', time, timestamptz '1970-01-01 00:00:00+00'),
       count(*), sum(value), min(value), max(value),
       min(time), (array_agg(value ORDER BY time, value))[1],
       max(time), (array_agg(value ORDER BY time DESC, value DESC))[1]
FROM points GROUP BY 1, 2;

DROP FUNCTION sluice_make_partitions(text, interval, timestamptz[]);

-- The parent's index goes (with its per-partition children); each existing
-- partition gets its own, named after it as the writer names new ones.
DROP INDEX points_series_time;
DO $$
DECLARE
    part text;
BEGIN
    FOR part IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'points'::regclass LOOP
        EXECUTE format('CREATE INDEX %I ON %I (series_id, time)', part || '_series_time', part);
    END LOOP;
END $$;

ALTER TABLE ingest_progress ADD COLUMN shard integer NOT NULL DEFAULT 0;
ALTER TABLE ingest_progress DROP CONSTRAINT ingest_progress_pkey;
ALTER TABLE ingest_progress ADD PRIMARY KEY (spool_id, shard);
-- How many shards wrote: a replay can only trust per-shard positions
-- written by the same number of shards (the same device → shard mapping).
ALTER TABLE ingest_progress ADD COLUMN shards integer NOT NULL DEFAULT 1;
