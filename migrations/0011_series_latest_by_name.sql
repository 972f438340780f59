-- LatestPoints answers in (device_id, metric) order. Reading that order
-- from series_latest itself (an index scan) instead of joining `series` and
-- sorting every row of the selection takes a 10,000-series call from about
-- 15 ms to 5 ms of PostgreSQL time (BENCHMARKS.md, "Query API"). The names
-- never change for a series id, so the copy cannot drift.
ALTER TABLE series_latest ADD COLUMN device_id text, ADD COLUMN metric text;
UPDATE series_latest l SET device_id = s.device_id, metric = s.metric
FROM series s WHERE s.id = l.series_id;
ALTER TABLE series_latest ALTER COLUMN device_id SET NOT NULL,
                          ALTER COLUMN metric SET NOT NULL;
CREATE UNIQUE INDEX series_latest_by_name ON series_latest (device_id, metric);
-- Every batch rewrites the row of each series it touched. Free room on the
-- page lets PostgreSQL do that as a heap-only update, pruned in place, so
-- the table stays small without waiting for vacuum.
ALTER TABLE series_latest SET (fillfactor = 50);

CREATE OR REPLACE VIEW latest_points AS
SELECT device_id, metric, time, value FROM series_latest;
