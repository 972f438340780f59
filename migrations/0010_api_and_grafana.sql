-- Support for the query API's JSON filter, and views for Grafana and psql.

-- An event body as jsonb, or NULL when it is not JSON. Unmatched messages
-- are stored as received, so a body can be anything; a plain cast would
-- fail the whole query on the first such row. The quick test on the first
-- byte spares the exception block (a subtransaction) for bodies that
-- cannot be a JSON object or array, and containment (`@>`) only matches
-- those kinds anyway, or a scalar against a scalar.
CREATE FUNCTION sluice_jsonb(body bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    IF length(body) = 0 OR get_byte(body, 0) NOT IN (123, 91, 34, 32, 9, 10, 13, 116, 102, 110, 45, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57) THEN
        RETURN NULL; -- not '{', '[', '"', whitespace, true/false/null or a number
    END IF;
    RETURN convert_from(body, 'UTF8')::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;

-- Events with their body as JSON (NULL when it is not), for Grafana's
-- PostgreSQL data source: `SELECT time, body->>'level' FROM events_json ...`.
CREATE VIEW events_json AS
SELECT e.id, e.time, e.device_id, e.topic, e.rule, sluice_jsonb(e.payload) AS body
FROM events e;

-- Hourly and per-minute aggregates by name, straight from the rollups:
-- the cheap source for dashboards over long ranges.
CREATE VIEW points_1m AS
SELECT s.device_id, s.metric, r.bucket AS time, r.count, r.sum / r.count AS avg,
       r.min, r.max, r.first, r.last
FROM rollup_1m r JOIN series s ON s.id = r.series_id;

CREATE VIEW points_1h AS
SELECT s.device_id, s.metric, r.bucket AS time, r.count, r.sum / r.count AS avg,
       r.min, r.max, r.first, r.last
FROM rollup_1h r JOIN series s ON s.id = r.series_id;

-- The last value of every series.
CREATE VIEW latest_points AS
SELECT s.device_id, s.metric, l.time, l.value
FROM series_latest l JOIN series s ON s.id = l.series_id;
