-- The last stored point of every series, kept by the writer in the same
-- transaction as the points (an upsert that only moves forward in time), so
-- "latest values" of thousands of series is one small scan instead of one
-- index descent per series and partition.
CREATE TABLE series_latest (
    series_id integer PRIMARY KEY,
    time      timestamptz NOT NULL,
    value     double precision NOT NULL
);
