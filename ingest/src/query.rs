//! Read queries behind the gRPC API. Every value is a bound parameter.
//!
//! Pagination is keyset-based: each query orders by a unique key and resumes
//! strictly after the last key of the previous page, so pages stay stable and
//! cheap however deep the caller goes.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

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
    /// These devices; when empty, every device whose id starts with
    /// `device_prefix`.
    pub device_ids: &'a [String],
    pub device_prefix: &'a str,
    /// Empty: every metric.
    pub metrics: &'a [String],
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Newest first (and resume before `after`) instead of oldest first.
    pub descending: bool,
    /// Resume strictly after this (time, series id), in the query's order.
    pub after: Option<(DateTime<Utc>, i32)>,
    pub limit: u32,
}

pub async fn query_points(
    pool: &PgPool,
    q: &PointsQuery<'_>,
) -> Result<Vec<StoredPoint>, sqlx::Error> {
    // Two fixed statements, one per direction: the direction decides the
    // comparison and the sort, which cannot be bound parameters.
    const ASCENDING: &str = "SELECT s.device_id, s.metric, p.time, p.value, p.series_id \
         FROM points p JOIN series s ON s.id = p.series_id \
         WHERE (cardinality($1::text[]) > 0 AND s.device_id = ANY($1) \
                OR cardinality($1::text[]) = 0 AND starts_with(s.device_id, $2)) \
           AND (cardinality($3::text[]) = 0 OR s.metric = ANY($3)) \
           AND p.time >= $4 AND p.time < $5 \
           AND ($6::timestamptz IS NULL OR (p.time, p.series_id) > ($6, $7::integer)) \
         ORDER BY p.time, p.series_id \
         LIMIT $8";
    const DESCENDING: &str = "SELECT s.device_id, s.metric, p.time, p.value, p.series_id \
         FROM points p JOIN series s ON s.id = p.series_id \
         WHERE (cardinality($1::text[]) > 0 AND s.device_id = ANY($1) \
                OR cardinality($1::text[]) = 0 AND starts_with(s.device_id, $2)) \
           AND (cardinality($3::text[]) = 0 OR s.metric = ANY($3)) \
           AND p.time >= $4 AND p.time < $5 \
           AND ($6::timestamptz IS NULL OR (p.time, p.series_id) < ($6, $7::integer)) \
         ORDER BY p.time DESC, p.series_id DESC \
         LIMIT $8";
    let (after_time, after_series) = q.after.unzip();
    sqlx::query_as(if q.descending { DESCENDING } else { ASCENDING })
        .bind(q.device_ids)
        .bind(q.device_prefix)
        .bind(q.metrics)
        .bind(q.start)
        .bind(q.end)
        .bind(after_time)
        .bind(after_series)
        .bind(i64::from(q.limit))
        .fetch_all(pool)
        .await
}

/// The last point of one series.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LatestPoint {
    pub device_id: String,
    pub metric: String,
    pub time: DateTime<Utc>,
    pub value: f64,
}

pub struct LatestQuery<'a> {
    /// These devices; when empty, every device whose id starts with
    /// `device_prefix` (every device, for an empty prefix).
    pub device_ids: &'a [String],
    pub device_prefix: &'a str,
    /// Empty: every metric.
    pub metrics: &'a [String],
    /// Resume strictly after this (device, metric).
    pub after: Option<(&'a str, &'a str)>,
    pub limit: u32,
}

/// The latest point of each matching series, ordered by device and metric.
pub async fn latest_points(
    pool: &PgPool,
    q: &LatestQuery<'_>,
) -> Result<Vec<LatestPoint>, sqlx::Error> {
    let (after_device, after_metric) = q.after.unzip();
    sqlx::query_as(
        "SELECT s.device_id, s.metric, l.time, l.value \
         FROM series s JOIN series_latest l ON l.series_id = s.id \
         WHERE (cardinality($1::text[]) > 0 AND s.device_id = ANY($1) \
                OR cardinality($1::text[]) = 0 AND starts_with(s.device_id, $2)) \
           AND (cardinality($3::text[]) = 0 OR s.metric = ANY($3)) \
           AND ($4::text IS NULL OR (s.device_id, s.metric) > ($4, $5::text)) \
         ORDER BY s.device_id, s.metric \
         LIMIT $6",
    )
    .bind(q.device_ids)
    .bind(q.device_prefix)
    .bind(q.metrics)
    .bind(after_device)
    .bind(after_metric)
    .bind(i64::from(q.limit))
    .fetch_all(pool)
    .await
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredEvent {
    /// With `time`, the page key.
    pub id: i64,
    pub device_id: Option<String>,
    pub topic: String,
    pub time: DateTime<Utc>,
    pub rule: Option<String>,
    pub payload: Vec<u8>,
}

pub struct EventsQuery<'a> {
    pub device_id: Option<&'a str>,
    /// A POSIX regular expression the topic must match (see [`topic_filter_regex`]).
    pub topic_regex: Option<&'a str>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub after: Option<(DateTime<Utc>, i64)>,
    pub limit: u32,
}

pub async fn query_events(
    pool: &PgPool,
    q: &EventsQuery<'_>,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let (after_time, after_id) = q.after.unzip();
    sqlx::query_as(
        "SELECT id, device_id, topic, time, rule, payload FROM events \
             WHERE ($1::text IS NULL OR device_id = $1) \
               AND ($2::text IS NULL OR topic ~ $2) \
               AND time >= $3 AND time < $4 \
               AND ($5::timestamptz IS NULL OR (time, id) > ($5, $6::bigint)) \
             ORDER BY time, id \
             LIMIT $7",
    )
    .bind(q.device_id)
    .bind(q.topic_regex)
    .bind(q.start)
    .bind(q.end)
    .bind(after_time)
    .bind(after_id)
    .bind(i64::from(q.limit))
    .fetch_all(pool)
    .await
}

/// Translates a valid MQTT topic filter into an anchored POSIX regular
/// expression, so the database can filter stored topics the way the broker
/// routes live ones: `+` is one level, a trailing `#` is the parent level and
/// everything below it.
pub fn topic_filter_regex(filter: &str) -> String {
    let levels: Vec<&str> = filter.split('/').collect();
    let mut re = String::from("^");
    for (i, level) in levels.iter().enumerate() {
        let last = i + 1 == levels.len();
        match *level {
            "#" => {
                // `a/#` matches `a` itself too; a lone `#` matches everything.
                if i == 0 {
                    re.push_str(".*");
                } else {
                    re.truncate(re.len() - 1); // the '/' pushed after the previous level
                    re.push_str("(/.*)?");
                }
                return re + "$";
            }
            "+" => re.push_str("[^/]*"),
            literal => {
                for c in literal.chars() {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' || !c.is_ascii() {
                        re.push(c);
                    } else {
                        re.push('\\');
                        re.push(c);
                    }
                }
            }
        }
        if !last {
            re.push('/');
        }
    }
    re.push('$');
    re
}

#[cfg(test)]
mod tests {
    use super::topic_filter_regex;

    #[test]
    fn filters_become_anchored_regexes() {
        assert_eq!(topic_filter_regex("#"), "^.*$");
        assert_eq!(topic_filter_regex("a/+/c"), "^a/[^/]*/c$");
        assert_eq!(topic_filter_regex("a/#"), "^a(/.*)?$");
        assert_eq!(topic_filter_regex("a.b/c"), "^a\\.b/c$");
    }
}
