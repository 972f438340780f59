//! Raw points: paged, streamed, and the latest value of each series.

use super::series_selection;
use chrono::{DateTime, TimeDelta, Utc};
use futures_core::stream::BoxStream;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

/// Which series a call selects: device ids (when not empty), else every
/// device whose id starts with `device_prefix`; and `metrics` (empty: all).
#[derive(Debug, Clone, Default)]
pub struct SeriesSelection {
    pub device_ids: Vec<String>,
    pub device_prefix: String,
    pub metrics: Vec<String>,
}

/// A series a selection matched.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SelectedSeries {
    pub id: i32,
    pub device_id: String,
    pub metric: String,
}

/// The matching series ordered by device id and metric, at most `max`
/// (ask for one more than you accept to learn that there were more).
pub async fn selected_series(
    conn: &mut PgConnection,
    selection: &SeriesSelection,
    max: u32,
) -> Result<Vec<SelectedSeries>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT s.id, s.device_id, s.metric FROM series s WHERE ",
        series_selection!(),
        " ORDER BY s.device_id, s.metric LIMIT $4"
    ))
    .bind(&selection.device_ids)
    .bind(&selection.device_prefix)
    .bind(&selection.metrics)
    .bind(i64::from(max))
    .persistent(false)
    .fetch_all(conn)
    .await
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredPoint {
    pub device_id: String,
    pub metric: String,
    pub time: DateTime<Utc>,
    pub value: f64,
    /// With `time`, the page key.
    pub series_id: i32,
}

pub struct PointsQuery<'a> {
    pub selection: &'a SeriesSelection,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Newest first (and resume before `after`) instead of oldest first.
    pub descending: bool,
    /// Resume strictly after this (time, series id), in the query's order.
    pub after: Option<(DateTime<Utc>, i32)>,
    pub limit: u32,
}

/// One page of points in time order across the selected series.
///
/// Each series is read through its own `(series_id, time)` index scan
/// limited to one page, and only those rows are sorted: a page costs at
/// most (series × page size) rows however long the range, where sorting
/// the range would cost every point in it.
pub async fn query_points(
    conn: &mut PgConnection,
    q: &PointsQuery<'_>,
) -> Result<Vec<StoredPoint>, sqlx::Error> {
    // Two fixed statements, one per direction: the direction decides the
    // comparison and the sort, which cannot be bound parameters.
    const ASCENDING: &str = concat!(
        "SELECT s.device_id, s.metric, p.time, p.value, s.id AS series_id \
         FROM series s CROSS JOIN LATERAL ( \
             SELECT time, value FROM points \
             WHERE series_id = s.id AND time >= $4 AND time < $5 \
               AND ($6::timestamptz IS NULL OR (time, s.id) > ($6, $7::integer)) \
             ORDER BY time LIMIT $8) p \
         WHERE ",
        series_selection!(),
        " ORDER BY p.time, s.id LIMIT $8"
    );
    const DESCENDING: &str = concat!(
        "SELECT s.device_id, s.metric, p.time, p.value, s.id AS series_id \
         FROM series s CROSS JOIN LATERAL ( \
             SELECT time, value FROM points \
             WHERE series_id = s.id AND time >= $4 AND time < $5 \
               AND ($6::timestamptz IS NULL OR (time, s.id) < ($6, $7::integer)) \
             ORDER BY time DESC LIMIT $8) p \
         WHERE ",
        series_selection!(),
        " ORDER BY p.time DESC, s.id DESC LIMIT $8"
    );
    // The resume position also narrows the index range: rows at the
    // position's own time are the only ones the row comparison must sort out.
    let (mut start, mut end) = (q.start, q.end);
    if let Some((time, _)) = q.after {
        if q.descending {
            end = end.min(time + TimeDelta::microseconds(1));
        } else {
            start = start.max(time);
        }
    }
    let (after_time, after_series) = q.after.unzip();
    sqlx::query_as(if q.descending { DESCENDING } else { ASCENDING })
        .bind(&q.selection.device_ids)
        .bind(&q.selection.device_prefix)
        .bind(&q.selection.metrics)
        .bind(start)
        .bind(end)
        .bind(after_time)
        .bind(after_series)
        .bind(i64::from(q.limit))
        .persistent(false)
        .fetch_all(conn)
        .await
}

/// A streamed point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamedPoint {
    pub series_id: i32,
    pub time: DateTime<Utc>,
    pub value: f64,
}

// Decoded by column position: the derived `FromRow` finds every column by
// name, a lookup per column and row that was the largest single cost of
// turning a large result into messages.
impl sqlx::FromRow<'_, PgRow> for StreamedPoint {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            series_id: row.try_get(0)?,
            time: row.try_get(1)?,
            value: row.try_get(2)?,
        })
    }
}

/// Every point of `series_ids` in [start, end), series by series in
/// ascending id, each in time order; at most `limit` (None: all).
///
/// One statement over all partitions: with the ids as a constant (the
/// statement is planned for its values, see below), PostgreSQL hashes the
/// id list and reads each partition once, by its btree or, once compacted,
/// its BRIN index, then sorts within `work_mem`, spilling to disk beyond
/// it. A lateral index scan per series would return rows in order without
/// the sort, but costs a lookup per series and partition, which on
/// compacted partitions is ten times slower (BENCHMARKS.md, "Query API").
pub fn stream_points<'c>(
    conn: &'c mut PgConnection,
    series_ids: Vec<i32>,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    descending: bool,
    limit: Option<u64>,
) -> BoxStream<'c, Result<StreamedPoint, sqlx::Error>> {
    const ASCENDING: &str = "SELECT series_id, time, value FROM points \
         WHERE series_id = ANY($1) AND time >= $2 AND time < $3 \
         ORDER BY series_id, time LIMIT $4";
    const DESCENDING: &str = "SELECT series_id, time, value FROM points \
         WHERE series_id = ANY($1) AND time >= $2 AND time < $3 \
         ORDER BY series_id, time DESC LIMIT $4";
    sqlx::query_as(if descending { DESCENDING } else { ASCENDING })
        .bind(series_ids)
        .bind(start)
        .bind(end)
        .bind(limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX)))
        .persistent(false)
        .fetch(conn)
}

/// The last point of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct LatestPoint {
    pub device_id: String,
    pub metric: String,
    pub time: DateTime<Utc>,
    pub value: f64,
}

/// By position, as [`StreamedPoint`].
impl sqlx::FromRow<'_, PgRow> for LatestPoint {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            device_id: row.try_get(0)?,
            metric: row.try_get(1)?,
            time: row.try_get(2)?,
            value: row.try_get(3)?,
        })
    }
}

pub struct LatestQuery<'a> {
    /// Empty device ids and prefix: every device.
    pub selection: &'a SeriesSelection,
    /// Resume strictly after this (device, metric).
    pub after: Option<(&'a str, &'a str)>,
    pub limit: u32,
}

/// The latest point of each matching series, ordered by device and metric.
pub async fn latest_points(
    conn: &mut PgConnection,
    q: &LatestQuery<'_>,
) -> Result<Vec<LatestPoint>, sqlx::Error> {
    let (after_device, after_metric) = q.after.unzip();
    sqlx::query_as(concat!(
        // `s` for the selection: series_latest carries the series' names,
        // and its (device_id, metric) index yields the rows in page order.
        "SELECT s.device_id, s.metric, s.time, s.value FROM series_latest s WHERE ",
        series_selection!(),
        " AND ($4::text IS NULL OR (s.device_id, s.metric) > ($4, $5::text)) \
         ORDER BY s.device_id, s.metric \
         LIMIT $6"
    ))
    .bind(&q.selection.device_ids)
    .bind(&q.selection.device_prefix)
    .bind(&q.selection.metrics)
    .bind(after_device)
    .bind(after_metric)
    .bind(i64::from(q.limit))
    .persistent(false)
    .fetch_all(conn)
    .await
}
