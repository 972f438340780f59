-- Sluice's first schema. Points are stored narrow: a series dictionary maps
-- (device, metric) to a small integer, and each point row is only
-- (series id, time, value). See ARCHITECTURE.md, "Storage layout", for the
-- measurements behind this choice; the storage issue partitions these tables
-- by time.

CREATE TABLE series (
    id        integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id text NOT NULL,
    metric    text NOT NULL,
    UNIQUE (device_id, metric)
);

-- No foreign key to series: a per-row trigger check would halve COPY speed,
-- and only Sluice's writer inserts here, always with an id it just resolved.
CREATE TABLE points (
    series_id integer          NOT NULL,
    time      timestamptz      NOT NULL,
    value     double precision NOT NULL
);
CREATE INDEX points_series_time ON points (series_id, time);

CREATE TABLE events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time      timestamptz NOT NULL,
    device_id text,
    topic     text        NOT NULL,
    -- NULL: an unmatched message stored as received.
    rule      text,
    payload   bytea       NOT NULL
);
CREATE INDEX events_device_time ON events (device_id, time, id);
CREATE INDEX events_time ON events (time, id);

CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL,
    device_id   text,
    topic       text        NOT NULL,
    -- NULL when no rule was involved (e.g. the message could not be routed).
    rule        text,
    reason      text        NOT NULL,
    payload     bytea       NOT NULL
);
CREATE INDEX dead_letters_received_at ON dead_letters (received_at);

-- The friendly face of the narrow layout, for psql and Grafana.
CREATE VIEW points_named AS
SELECT s.device_id, s.metric, p.time, p.value
FROM points p
JOIN series s ON s.id = p.series_id;
