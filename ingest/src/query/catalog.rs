//! Which devices and series hold points in a time range.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SeriesName {
    pub device_id: String,
    pub metric: String,
}

// One index probe per candidate series (`EXISTS` stops at the first point),
// so the cost follows the number of series, not of points in the range.

/// Devices whose id starts with `prefix` and that have a point in
/// [start, end), ordered by id, after `after`, at most `limit`.
pub async fn devices_with_data(
    conn: &mut PgConnection,
    prefix: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT s.device_id FROM series s \
         WHERE starts_with(s.device_id, $1) \
           AND ($4::text IS NULL OR s.device_id > $4) \
           AND EXISTS (SELECT 1 FROM points p \
                       WHERE p.series_id = s.id AND p.time >= $2 AND p.time < $3) \
         ORDER BY s.device_id \
         LIMIT $5",
    )
    .bind(prefix)
    .bind(start)
    .bind(end)
    .bind(after)
    .bind(i64::from(limit))
    .persistent(false)
    .fetch_all(conn)
    .await
}

/// Series of the given devices (or, when `device_ids` is empty, of devices
/// whose id starts with `prefix`) that have a point in [start, end),
/// ordered by device id and metric, after `after`, at most `limit`.
pub async fn series_with_data(
    conn: &mut PgConnection,
    device_ids: &[String],
    prefix: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    after: Option<(&str, &str)>,
    limit: u32,
) -> Result<Vec<SeriesName>, sqlx::Error> {
    let (after_device, after_metric) = after.unzip();
    sqlx::query_as(
        "SELECT s.device_id, s.metric FROM series s \
         WHERE (cardinality($1::text[]) > 0 AND s.device_id = ANY($1) \
                OR cardinality($1::text[]) = 0 AND starts_with(s.device_id, $2)) \
           AND ($5::text IS NULL OR (s.device_id, s.metric) > ($5, $6::text)) \
           AND EXISTS (SELECT 1 FROM points p \
                       WHERE p.series_id = s.id AND p.time >= $3 AND p.time < $4) \
         ORDER BY s.device_id, s.metric \
         LIMIT $7",
    )
    .bind(device_ids)
    .bind(prefix)
    .bind(start)
    .bind(end)
    .bind(after_device)
    .bind(after_metric)
    .bind(i64::from(limit))
    .persistent(false)
    .fetch_all(conn)
    .await
}
